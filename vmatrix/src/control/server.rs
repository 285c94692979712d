//! The control server: HTTP/1.1 + JSON on a Unix socket (axum's router, hyper serving each
//! connection), on a thread of its own with a small tokio runtime, so the synchronous VM
//! processes need no runtime of theirs.
//!
//! Protections: at most [`MAX_CLIENTS`] connections are served at a time (more are answered
//! 503); a client must send its request head within [`REQUEST_TIMEOUT`] (else it is
//! disconnected) and its body within as long again (else 408), so a client that connects and
//! says nothing never delays another; a body larger than [`MAX_BODY`] is refused (413); one
//! request per connection. Requests are executed one at a time, in the order their bodies
//! arrive, by one executor thread (an execution may block: a snapshot, a promotion), except
//! `GET /status`, which has an executor thread of its own: the agent's status polls are how it
//! tells a hung VM process (the manager fails a primary that stops answering), so they never
//! wait behind a long request.

use std::future::poll_fn;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper::body::Body as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::types::{ControlError, ErrorBody, ErrorKind, Request};

/// Longest time a client may take to send its request head, and then its body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at the same time.
pub const MAX_CLIENTS: usize = 32;
/// Largest request body.
pub const MAX_BODY: usize = 16 << 10;
/// Largest request head (hyper's read buffer; its minimum is 8 KiB).
const MAX_HEAD: usize = 16 << 10;

/// Executes one request (on an executor thread: `GET /status` on its own, concurrently with
/// the others).
pub type Handler = Arc<dyn Fn(Request) -> Result<Value, ControlError> + Send + Sync>;

/// The outcome of one request.
type Outcome = Result<Value, ControlError>;

/// A request on its way to the executor, with where its answer goes.
type Job = (Request, oneshot::Sender<Outcome>);

/// Resources served with GET (no body).
const GET_PATHS: [&str; 2] = ["/status", "/checksum"];
/// Resources served with PUT (a JSON body; see `Request::from_put`).
const PUT_PATHS: [&str; 9] = [
    "/state",
    "/snapshot",
    "/stop",
    "/faults/disk",
    "/backups",
    "/fence",
    "/handover",
    "/promote",
    "/identity",
];

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
        };
        (self.kind.status(), Json(body)).into_response()
    }
}

/// A control socket being served.
pub struct Served {
    clients: Arc<AtomicUsize>,
}

impl Served {
    /// Waits (at most `timeout`) until no client is being served: a process about to exit
    /// calls it so that the answer to the request that ended it (`stop`, `fence`, `promote`)
    /// is written first.
    pub fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Counts a connection while it is served.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Listens on `path` (replacing a stale socket) and answers each request with `handler`.
pub fn serve(
    path: &Path,
    handler: impl Fn(Request) -> Result<Value, ControlError> + Send + Sync + 'static,
) -> anyhow::Result<Served> {
    serve_with(path, handler, false)
}

/// [`serve`], with `PUT /snapshot` on an executor of its own when `own_snapshots`: a backup's
/// export takes long and must not hold its `fence` or `promote` (a failover) back.
pub fn serve_with(
    path: &Path,
    handler: impl Fn(Request) -> Result<Value, ControlError> + Send + Sync + 'static,
    own_snapshots: bool,
) -> anyhow::Result<Served> {
    let handler: Handler = Arc::new(handler);
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = StdUnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    // Only its owner (root, the agent) may connect: whoever can connect can stop the VM.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting control socket {}", path.display()))?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("control runtime")?;
    let (jobs, queue) = mpsc::channel::<Job>(MAX_CLIENTS);
    let (status, status_queue) = mpsc::channel::<Job>(MAX_CLIENTS);
    let h = handler.clone();
    std::thread::Builder::new()
        .name("control-exec".into())
        .spawn(move || execute_all(queue, h))
        .context("spawning the control executor")?;
    let snapshots = match own_snapshots {
        true => {
            let (tx, rx) = mpsc::channel::<Job>(MAX_CLIENTS);
            let h = handler.clone();
            std::thread::Builder::new()
                .name("control-snap".into())
                .spawn(move || execute_all(rx, h))
                .context("spawning the snapshot executor")?;
            Some(tx)
        }
        false => None,
    };
    std::thread::Builder::new()
        .name("control-status".into())
        .spawn(move || execute_all(status_queue, handler))
        .context("spawning the status executor")?;
    let queues = Queues {
        jobs,
        status,
        snapshots,
    };
    let clients = Arc::new(AtomicUsize::new(0));
    let served = Served {
        clients: clients.clone(),
    };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            rt.block_on(async move {
                match UnixListener::from_std(listener) {
                    Ok(l) => accept_all(l, router(queues), clients).await,
                    Err(e) => tracing::error!("control socket: {e}"),
                }
            })
        })
        .context("spawning the control thread")?;
    Ok(served)
}

/// Executes requests one at a time, in the order they were queued.
fn execute_all(mut queue: mpsc::Receiver<Job>, handler: Handler) {
    while let Some((req, answer)) = queue.blocking_recv() {
        let name = req.name();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(req)))
            .unwrap_or_else(|_| Err(ControlError::failed(format!("{name} panicked"))));
        let _ = answer.send(outcome);
    }
}

/// Where requests go: `GET /status` to its own executor, `PUT /snapshot` to its own if it has
/// one, everything else to the other.
#[derive(Clone)]
pub struct Queues {
    jobs: mpsc::Sender<Job>,
    status: mpsc::Sender<Job>,
    snapshots: Option<mpsc::Sender<Job>>,
}

/// The routes: every resource of every kind of process (each process refuses with 404 the
/// requests it does not serve), JSON errors for unknown paths and methods.
pub fn router(queues: Queues) -> Router {
    let mut r = Router::new();
    for p in GET_PATHS {
        r = r.route(p, get(get_resource));
    }
    for p in PUT_PATHS {
        r = r.route(p, put(put_resource));
    }
    r.fallback(|uri: Uri| async move {
        ControlError::not_found(format!(
            "no resource {}: GET /status, /checksum; PUT /state, /snapshot, /stop, \
             /faults/disk, /backups, /fence, /handover, /promote, /identity",
            uri.path()
        ))
    })
    .method_not_allowed_fallback(|uri: Uri| async move {
        let path = uri.path();
        let method = if GET_PATHS.contains(&path) {
            "GET"
        } else {
            "PUT"
        };
        ControlError::new(
            ErrorKind::MethodNotAllowed,
            format!("{path} is served with {method} only"),
        )
    })
    .with_state(queues)
}

async fn get_resource(State(q): State<Queues>, uri: Uri) -> Response {
    match uri.path() {
        "/checksum" => reply(run(&q.jobs, Request::Checksum).await),
        _ => reply(run(&q.status, Request::Status).await),
    }
}

async fn put_resource(
    State(Queues {
        jobs, snapshots, ..
    }): State<Queues>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let outcome = async {
        let bytes = read_body(&headers, body).await?;
        let req = Request::from_put(uri.path(), &bytes)?;
        match (&req, &snapshots) {
            (Request::Snapshot { .. }, Some(q)) => run(q, req).await,
            _ => run(&jobs, req).await,
        }
    };
    reply(outcome.await)
}

fn reply(outcome: Outcome) -> Response {
    match outcome {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Hands `req` to the executor and waits for its answer.
async fn run(jobs: &mpsc::Sender<Job>, req: Request) -> Outcome {
    let gone = || ControlError::new(ErrorKind::Busy, "the process is stopping");
    let (tx, rx) = oneshot::channel();
    jobs.send((req, tx)).await.map_err(|_| gone())?;
    rx.await.unwrap_or_else(|_| Err(gone()))
}

/// The whole body, at most [`MAX_BODY`] bytes, within [`REQUEST_TIMEOUT`].
async fn read_body(headers: &HeaderMap, mut body: Body) -> Result<Bytes, ControlError> {
    let too_large = || {
        ControlError::new(
            ErrorKind::TooLarge,
            format!("the request body exceeds {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut buf = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            let frame =
                frame.map_err(|e| ControlError::bad_request(format!("reading the body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > MAX_BODY {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(ControlError::new(
                ErrorKind::Timeout,
                format!(
                    "the request body did not arrive within {} ms",
                    REQUEST_TIMEOUT.as_millis()
                ),
            ))
        })
}

/// Accepts connections for ever, each served by a task of its own.
async fn accept_all(listener: UnixListener, app: Router, clients: Arc<AtomicUsize>) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (counter, app, head_timeout) = if clients.fetch_add(1, Ordering::SeqCst) < MAX_CLIENTS {
            (clients.clone(), app.clone(), REQUEST_TIMEOUT)
        } else {
            clients.fetch_sub(1, Ordering::SeqCst);
            // Told so, briefly; beyond as many again, closed at once.
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                busy.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            (busy.clone(), busy_router(), Duration::from_millis(100))
        };
        let slot = Slot(counter);
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            if let Err(e) = conn.await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

/// What a client beyond [`MAX_CLIENTS`] is answered.
fn busy_router() -> Router {
    Router::new().fallback(|| async {
        ControlError::new(
            ErrorKind::Busy,
            format!("busy: {MAX_CLIENTS} clients being served"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Raw HTTP: the status code and the body.
    fn raw(path: &Path, request: &str) -> (u16, String) {
        let mut s = UnixStream::connect(path).unwrap();
        // A server may answer (413) and close before the whole body is sent.
        if let Err(e) = s.write_all(request.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        let mut reply = Vec::new();
        // After such an early answer, the unread body is reported as a reset once it is read.
        if let Err(e) = s.read_to_end(&mut reply) {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let code = reply[9..12].parse().unwrap();
        let body = reply.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    fn put(path: &Path, resource: &str, body: &str) -> (u16, String) {
        raw(
            path,
            &format!(
                "PUT {resource} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    }

    fn echo_server() -> (tempfile::TempDir, std::path::PathBuf, Served) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let served = serve(
            &path,
            Box::new(|r| match r {
                Request::Handover => Err(ControlError::conflict("not protected")),
                r => Ok(serde_json::json!({ "got": r.name() })),
            }),
        )
        .unwrap();
        (dir, path, served)
    }

    #[test]
    fn answers_json_with_typed_status_codes() {
        let (_d, path, _s) = echo_server();
        let (code, body) = raw(&path, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((code, body.as_str()), (200, r#"{"got":"GET /status"}"#));
        let (code, body) = put(&path, "/fence", r#"{"term":3}"#);
        assert_eq!((code, body.as_str()), (200, r#"{"got":"PUT /fence"}"#));
        let (code, body) = put(&path, "/fence", r#"{"term":"#);
        assert_eq!(code, 400, "{body}");
        assert!(
            body.starts_with(r#"{"error":"invalid JSON body: "#),
            "{body}"
        );
        let (code, body) = put(&path, "/handover", "");
        assert_eq!((code, body.as_str()), (409, r#"{"error":"not protected"}"#));
        let (code, body) = raw(&path, "GET /reboot HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, 404, "{body}");
        assert!(body.contains("no resource /reboot"), "{body}");
        let (code, body) = raw(&path, "DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, 405, "{body}");
        assert!(body.contains("/status is served with GET only"), "{body}");
        let big = format!(r#"{{"backups":["{}"]}}"#, "b".repeat(MAX_BODY));
        let (code, body) = put(&path, "/backups", &big);
        assert_eq!(code, 413, "{body}");
        assert!(body.contains("exceeds"), "{body}");
    }

    /// A control socket whose handler blocks in the requests `blocks` picks (saying so on
    /// `entered`) until `release`; others are echoed.
    struct Blocking {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        entered: std::sync::mpsc::Receiver<()>,
        release: std::sync::mpsc::Sender<()>,
        _served: Served,
    }

    impl Blocking {
        fn serve(blocks: fn(&Request) -> bool, own_snapshots: bool) -> Blocking {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ctl.sock");
            let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let (entered_tx, released) = (
                std::sync::Mutex::new(entered_tx),
                std::sync::Mutex::new(released),
            );
            let handler = move |r: Request| {
                if blocks(&r) {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    released.lock().unwrap().recv().unwrap();
                }
                Ok(serde_json::json!({ "got": r.name() }))
            };
            let served = serve_with(&path, handler, own_snapshots).unwrap();
            Blocking {
                _dir: dir,
                path,
                entered,
                release,
                _served: served,
            }
        }
    }

    /// The agent's status polls are its hung-process detector: they never queue behind a
    /// request that blocks (a promotion, a snapshot, a handover).
    #[test]
    fn status_is_answered_while_another_request_blocks() {
        let b = Blocking::serve(|r| matches!(r, Request::Promote(_)), false);
        let (path, entered, release) = (b.path.clone(), &b.entered, &b.release);
        let p = path.clone();
        let promote = std::thread::spawn(move || put(&p, "/promote", r#"{"term":2}"#));
        entered.recv().unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .expect("GET /status answered while PUT /promote blocks");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        release.send(()).unwrap();
        assert_eq!(promote.join().unwrap().0, 200);
    }

    /// A backup's export (`serve_with(.., true)`) never holds a `fence` or `promote` back: a
    /// failover does not wait for a clone base.
    #[test]
    fn a_backups_long_snapshot_does_not_hold_a_promotion() {
        let b = Blocking::serve(|r| matches!(r, Request::Snapshot { .. }), true);
        let (path, entered, release) = (b.path.clone(), &b.entered, &b.release);
        let p = path.clone();
        let snap =
            std::thread::spawn(move || put(&p, "/snapshot", r#"{"kind":"full","dir":"/tmp/x"}"#));
        entered.recv().unwrap();
        for (what, body) in [("/fence", r#"{"term":2}"#), ("/promote", r#"{"term":2}"#)] {
            let (code, got) = put(&path, what, body);
            assert_eq!(code, 200, "{what} answered while an export runs: {got}");
        }
        release.send(()).unwrap();
        assert_eq!(snap.join().unwrap().0, 200);
    }

    #[test]
    fn a_silent_client_does_not_delay_others() {
        let (_d, path, _s) = echo_server();
        let mut silent = UnixStream::connect(&path).unwrap();
        // A client that sends its head a byte now and then is cut off at the same deadline.
        let mut dribbler = UnixStream::connect(&path).unwrap();
        dribbler.write_all(b"GET /sta").unwrap();
        // One that sends its head but not the body it announced.
        let mut no_body = UnixStream::connect(&path).unwrap();
        no_body
            .write_all(b"PUT /fence HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let (code, _) = raw(&path, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, 200);
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        // The silent ones are disconnected after the timeout; the body-less one is told 408.
        let mut got = String::new();
        silent.set_read_timeout(Some(REQUEST_TIMEOUT * 3)).unwrap();
        silent.read_to_string(&mut got).unwrap();
        assert!(t0.elapsed() < REQUEST_TIMEOUT + Duration::from_millis(500));
        dribbler
            .set_read_timeout(Some(REQUEST_TIMEOUT * 3))
            .unwrap();
        let _ = dribbler.read_to_string(&mut got);
        let mut got = String::new();
        no_body.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");
        assert!(got.contains("did not arrive within 2000 ms"), "{got}");
    }

    #[test]
    fn clients_beyond_the_limit_are_told_busy() {
        let (_d, path, served) = echo_server();
        let held: Vec<_> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let (code, body) = raw(&path, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("busy: 32 clients being served"), "{body}");
        drop(held);
        served.wait_idle(Duration::from_secs(1));
        let (code, _) = raw(&path, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, 200);
    }
}
