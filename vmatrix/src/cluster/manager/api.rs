//! The manager's HTTP/JSON API (axum), plain HTTP on a loopback address.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/vms` | `[VmView]` |
//! | `GET /v1/vms/{name}` | `VmView`, 404 |
//! | `POST /v1/vms` (a `VmSpec`, optionally with `"limits": Limits`) | 201 `VmView` once the record is durable; 400, 409, 503 |
//! | `PUT /v1/vms/{name}/limits` (a `Limits`: `cpu_millis`, `cpu_weight`, `memory_mib`, `io_read_bps`, `io_write_bps`; absent: 0, none) | `VmView` once durable; 400, 404 |
//! | `DELETE /v1/vms/{name}` | `{"deleted": name}`, 404 |
//! | `POST /v1/vms/{name}/failover` (optional `{"to": host}`) | `{"term": n}`, 404, 503 |
//! | `POST /v1/vms/{name}/migrate` (`{"to": host}`) | 202 `{"migrating": name, "to": host}` |
//! | `PUT /v1/vms/{name}/clones` (`{"count": n, "ip": "a.b.c.d/len", "warm": bool}`) | `VmView` once durable; 400, 404 |
//! | `PUT /v1/vms/{name}/autoscale` (`{"autoscale": AutoscaleSpec or null, "ip": ...}`) | `{"autoscale": ...}`; 400, 404 |
//! | `PUT /v1/vms/{name}/load` (`{"load": x}`) | `{"load": x}`; 400 (no autoscaling), 404 |
//! | `PUT /v1/vms/{name}/balancer` (`{"vip": "a.b.c.d:port", "lease_ms": n}`) | attaches (or renews) a load balancer's driver: `{"attached": name, "lease_ms": n}`; 400, 404 |
//! | `DELETE /v1/vms/{name}/balancer` | `{"detached": name}` (draining clones stop); 404 |
//! | `PUT /v1/vms/{name}/clones/{slot}/drained` (`{"drained": bool, "active_left": n, "waited_ms": n}`) | the draining clone of that slot is stopped: `{"stopped": clone}`; 400 (not draining, bad slot), 404 |
//! | `GET /v1/hosts` | `[HostView]` |
//! | `GET /v1/events?since=n` | events numbered above n (the last 1000 at most) |
//! | `GET /metrics` | OpenMetrics text |
//!
//! Every error is `{"error": "..."}` with its status code.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use failover::clones::{AutoscaleSpec, Balancer};
use failover::limits::Limits;
use failover::manager::{ApiError, DrainedReport, ScaleRequest};
use failover::model::VmSpec;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::core::{ApiCall, Cmd};
use super::events::{EventLog, Stamped};
use super::metrics::{Metrics, CONTENT_TYPE};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// Refuses an API address that is not loopback.
pub fn check_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve the API on {addr}: it is plain HTTP without authentication, so it \
         binds only to a loopback address (127.0.0.1, ::1); mutual TLS on the API is future work"
    )
}

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The decision loop.
    pub core: mpsc::Sender<Cmd>,
    /// The event log.
    pub events: Arc<Mutex<EventLog>>,
    /// The metrics page.
    pub metrics: Arc<Metrics>,
}

/// An error answer: `{"error": "..."}`.
#[derive(Debug)]
pub struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let status = match e {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Exists(_) => StatusCode::CONFLICT,
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        HttpError(status, e.to_string())
    }
}

type Answer<T> = Result<T, HttpError>;

/// The router.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/failover", post(failover))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/clones", put(scale))
        .route("/v1/vms/{name}/limits", put(set_limits))
        .route("/v1/vms/{name}/autoscale", put(autoscale))
        .route("/v1/vms/{name}/load", put(load))
        .route("/v1/vms/{name}/balancer", put(attach).delete(detach))
        .route("/v1/vms/{name}/clones/{slot}/drained", put(drained))
        .route("/v1/hosts", get(hosts))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(|| async { HttpError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// Asks the decision loop.
async fn ask<T>(api: &Api, call: impl FnOnce(oneshot::Sender<T>) -> ApiCall) -> Answer<T> {
    let stopping = || {
        HttpError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the manager is stopping".into(),
        )
    };
    let (tx, rx) = oneshot::channel();
    api.core
        .send(Cmd::Api(call(tx)))
        .await
        .map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())
}

/// Parses a JSON body (`None` when it is empty and `optional`).
fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    optional: bool,
) -> Answer<Option<T>> {
    let body = body.map_err(|r| HttpError(r.status(), r.body_text()))?;
    if optional && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn list_vms(State(api): State<Api>) -> Answer<impl IntoResponse> {
    Ok(Json(ask(&api, ApiCall::Vms).await?))
}

async fn get_vm(State(api): State<Api>, Path(name): Path<String>) -> Answer<impl IntoResponse> {
    match ask(&api, |tx| ApiCall::Vm(name.clone(), tx)).await? {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::NotFound(name).into()),
    }
}

async fn create_vm(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let c: CreateBody = json_body(body, false)?.expect("required");
    let view = ask(&api, |tx| ApiCall::Create(c.spec, c.limits, tx)).await??;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Body of `POST /v1/vms`: a spec and, optionally, its limits.
#[derive(Debug, Deserialize)]
struct CreateBody {
    #[serde(flatten)]
    spec: VmSpec,
    #[serde(default)]
    limits: Limits,
}

async fn set_limits(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let l: Limits = json_body(body, false)?.expect("required");
    Ok(Json(ask(&api, |tx| ApiCall::Limits(name, l, tx)).await??))
}

async fn delete_vm(State(api): State<Api>, Path(name): Path<String>) -> Answer<impl IntoResponse> {
    ask(&api, |tx| ApiCall::Delete(name.clone(), tx)).await??;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// Body of failover (optional) and migrate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    to: Option<String>,
}

async fn failover(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let to = json_body::<To>(body, true)?.and_then(|t| t.to);
    let term = ask(&api, |tx| ApiCall::Failover(name, to, tx)).await??;
    Ok(Json(serde_json::json!({ "term": term })))
}

async fn migrate(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let to = json_body::<To>(body, false)?
        .and_then(|t| t.to)
        .ok_or_else(|| {
            HttpError(
                StatusCode::BAD_REQUEST,
                "body must be {\"to\": host}".into(),
            )
        })?;
    ask(&api, |tx| ApiCall::Migrate(name.clone(), to.clone(), tx)).await??;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "migrating": name, "to": to })),
    ))
}

async fn scale(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let req: ScaleRequest = json_body(body, false)?.expect("required");
    Ok(Json(ask(&api, |tx| ApiCall::Scale(name, req, tx)).await??))
}

/// Body of `PUT /v1/vms/{name}/autoscale`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Autoscale {
    autoscale: Option<AutoscaleSpec>,
    #[serde(default)]
    ip: Option<String>,
}

async fn autoscale(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let a: Autoscale = json_body(body, false)?.expect("required");
    let spec = a.autoscale.clone();
    ask(&api, |tx| ApiCall::Autoscale(name, a.autoscale, a.ip, tx)).await??;
    Ok(Json(serde_json::json!({ "autoscale": spec })))
}

/// Body of `PUT /v1/vms/{name}/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Load {
    load: f64,
}

async fn load(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let l: Load = json_body(body, false)?.expect("required");
    ask(&api, |tx| ApiCall::Load(name, l.load, tx)).await??;
    Ok(Json(serde_json::json!({ "load": l.load })))
}

/// Body of `PUT /v1/vms/{name}/balancer`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    vip: String,
    lease_ms: u64,
}

async fn attach(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let a: Attach = json_body(body, false)?.expect("required");
    let b = Balancer {
        vip: a.vip,
        lease_ms: a.lease_ms,
    };
    let n = name.clone();
    ask(&api, |tx| ApiCall::Attach(n, b, tx)).await??;
    Ok(Json(
        serde_json::json!({ "attached": name, "lease_ms": a.lease_ms }),
    ))
}

async fn detach(State(api): State<Api>, Path(name): Path<String>) -> Answer<impl IntoResponse> {
    ask(&api, |tx| ApiCall::Detach(name.clone(), tx)).await??;
    Ok(Json(serde_json::json!({ "detached": name })))
}

async fn drained(
    State(api): State<Api>,
    Path((name, slot)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<impl IntoResponse> {
    let slot: u32 = slot.parse().map_err(|_| {
        HttpError(
            StatusCode::BAD_REQUEST,
            format!("slot '{slot}' is not a clone's slot number"),
        )
    })?;
    let r: DrainedReport = json_body(body, false)?.expect("required");
    let n = name.clone();
    ask(&api, |tx| ApiCall::Drained(n, slot, r, tx)).await??;
    let clone = failover::clones::clone_name(&name, slot);
    Ok(Json(serde_json::json!({ "stopped": clone })))
}

async fn hosts(State(api): State<Api>) -> Answer<impl IntoResponse> {
    Ok(Json(ask(&api, ApiCall::Hosts).await?))
}

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn events(
    State(api): State<Api>,
    q: Result<Query<Since>, QueryRejection>,
) -> Answer<Json<Vec<Stamped>>> {
    let Query(q) = q.map_err(|r| HttpError(StatusCode::BAD_REQUEST, r.body_text()))?;
    let log = api.events.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Json(log.since(q.since)))
}

async fn metrics(State(api): State<Api>) -> Answer<impl IntoResponse> {
    let figures = ask(&api, ApiCall::Figures).await?;
    let events = api
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .written();
    let page = api.metrics.render(&figures, events);
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], page))
}
