//! The control client: one request per connection over the Unix socket (hyper's HTTP/1
//! client on a tokio `UnixStream`), all of it — connect, request, answer — within the
//! client's time limit. [`Client::send`] is async; the blocking calls ([`Client::call`] and
//! the typed ones: `vmatrix ctl`, the agent's supervisor thread) run it on a current-thread
//! runtime of their own, on a helper thread when called from inside a runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::UnixStream;

use super::types::{
    BackupFenceAnswer, BackupsAnswer, CheckpointAnswer, ErrorBody, Request, Status, StopAnswer,
};

/// Largest answer read.
const MAX_ANSWER: usize = 1 << 20;

/// Why a control request got no answer, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is missing or nobody listens on it.
    #[error("cannot connect to control socket {path}: {err}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// No complete answer within the time limit.
    #[error("{request}: no answer within {ms} ms")]
    Timeout {
        /// Which request.
        request: String,
        /// The limit.
        ms: u128,
    },
    /// The HTTP exchange failed (the process went away, say).
    #[error("{request}: {err}")]
    Http {
        /// Which request.
        request: String,
        /// Why.
        err: hyper::Error,
    },
    /// The process refused the request or it failed there: its status and message.
    #[error("{request}: {message} (HTTP {status})")]
    Refused {
        /// Which request.
        request: String,
        /// The HTTP status.
        status: StatusCode,
        /// The process's `error`.
        message: String,
    },
    /// An answer that is not the JSON expected.
    #[error("{request}: unexpected answer: {why}")]
    BadAnswer {
        /// Which request.
        request: String,
        /// What is wrong with it.
        why: String,
    },
    /// No runtime could be made for a blocking call.
    #[error("no runtime for the control request: {0}")]
    Runtime(std::io::Error),
}

/// A client of one control socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    limit: Duration,
}

impl Client {
    /// A client of `socket` whose requests each take at most `limit`.
    pub fn new(socket: impl AsRef<Path>, limit: Duration) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
            limit,
        }
    }

    /// Sends `req`; its JSON answer.
    pub async fn send(&self, req: &Request) -> Result<Value, ClientError> {
        let name = req.name();
        match tokio::time::timeout(self.limit, self.exchange(req)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                request: name,
                ms: self.limit.as_millis(),
            }),
        }
    }

    /// [`Client::send`], blocking.
    pub fn send_blocking(&self, req: &Request) -> Result<Value, ClientError> {
        let run = || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ClientError::Runtime)?;
            rt.block_on(self.send(req))
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return run();
        }
        // Inside a runtime a second one cannot block this thread: use a helper thread.
        std::thread::scope(|s| {
            s.spawn(run).join().unwrap_or_else(|_| {
                Err(ClientError::Runtime(std::io::Error::other(
                    "the control request's thread panicked",
                )))
            })
        })
    }

    /// Sends `req` (blocking) and decodes its answer as `T`.
    pub fn call<T: DeserializeOwned>(&self, req: &Request) -> Result<T, ClientError> {
        let v = self.send_blocking(req)?;
        serde_json::from_value(v).map_err(|e| ClientError::BadAnswer {
            request: req.name(),
            why: e.to_string(),
        })
    }

    /// `GET /status`.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.call(&Request::Status)
    }

    /// `PUT /stop`.
    pub fn stop(&self) -> Result<StopAnswer, ClientError> {
        self.call(&Request::Stop)
    }

    /// `PUT /backups` (a primary).
    pub fn set_backups(&self, backups: Vec<String>) -> Result<BackupsAnswer, ClientError> {
        self.call(&Request::Backups(backups))
    }

    /// `PUT /handover` (a primary).
    pub fn handover(&self) -> Result<CheckpointAnswer, ClientError> {
        self.call(&Request::Handover)
    }

    /// `PUT /fence` to a backup.
    pub fn fence_backup(&self, term: u64) -> Result<BackupFenceAnswer, ClientError> {
        self.call(&Request::Fence(term))
    }

    /// `PUT /promote` (a backup).
    pub fn promote(&self, term: u64) -> Result<CheckpointAnswer, ClientError> {
        self.call(&Request::Promote(term))
    }

    /// One connection, one request, its answer.
    async fn exchange(&self, req: &Request) -> Result<Value, ClientError> {
        let name = req.name();
        let http = |err| ClientError::Http {
            request: name.clone(),
            err,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|err| ClientError::Connect {
                    path: self.socket.clone(),
                    err,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let (method, path) = req.route();
        let body = req
            .body()
            .map(|b| serde_json::to_vec(&b).expect("plain data"))
            .unwrap_or_default();
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a valid request");
        let answer = async move {
            let resp = sender.send_request(request).await?;
            // No second request: the connection may end once the answer is in.
            drop(sender);
            let (parts, body) = resp.into_parts();
            let bytes = axum::body::to_bytes(Body::new(body), MAX_ANSWER).await;
            Ok::<_, hyper::Error>((parts.status, bytes))
        };
        let (answer, _) = tokio::join!(answer, conn);
        let (status, bytes) = answer.map_err(http)?;
        let bytes = bytes.map_err(|e| ClientError::BadAnswer {
            request: name.clone(),
            why: format!("reading it: {e}"),
        })?;
        decode(&name, status, &bytes)
    }
}

/// The JSON of a 2xx answer, or the error it carries.
fn decode(request: &str, status: StatusCode, body: &[u8]) -> Result<Value, ClientError> {
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
        return Err(ClientError::Refused {
            request: request.to_string(),
            status,
            message,
        });
    }
    serde_json::from_slice(body).map_err(|e| ClientError::BadAnswer {
        request: request.to_string(),
        why: format!("not JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::super::server;
    use super::super::types::{ControlError, RunState, SnapshotKind};
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn every_request_reaches_the_handler_as_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        server::serve(
            &path,
            Box::new(move |r: Request| {
                s.lock().unwrap().push(r.clone());
                match r {
                    Request::Promote(_) => Err(ControlError::conflict("nothing to promote")),
                    _ => Ok(serde_json::json!({ "ok": true })),
                }
            }),
        )
        .unwrap();
        let c = Client::new(&path, Duration::from_secs(5));
        let all = vec![
            Request::Status,
            Request::Checksum,
            Request::SetState(RunState::Paused),
            Request::Snapshot {
                kind: SnapshotKind::Diff,
                dir: "/tmp/x y".into(),
            },
            Request::Stop,
            Request::DiskFaults(2),
            Request::Backups(vec![]),
            Request::Fence(9),
            Request::Handover,
            Request::Identity {
                name: "web-c0".into(),
                config: "ip=10.0.0.9/24".into(),
            },
        ];
        for r in &all {
            assert_eq!(
                c.send_blocking(r).unwrap(),
                serde_json::json!({ "ok": true })
            );
        }
        match c.promote(3) {
            Err(ClientError::Refused {
                status, message, ..
            }) => {
                assert_eq!(status, StatusCode::CONFLICT);
                assert_eq!(message, "nothing to promote");
            }
            other => panic!("{other:?}"),
        }
        let mut want = all;
        want.push(Request::Promote(3));
        assert_eq!(*seen.lock().unwrap(), want);
        // Inside a runtime too.
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async { assert!(c.send_blocking(&Request::Status).is_ok()) });
        // And the answer that is not what the typed call expects.
        match c.status() {
            Err(ClientError::BadAnswer { why, .. }) => assert!(why.contains("role"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_socket_and_a_silent_server_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let c = Client::new(dir.path().join("none.sock"), Duration::from_millis(200));
        let e = c.send_blocking(&Request::Status).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        // A listener that never answers.
        let path = dir.path().join("mute.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c = Client::new(&path, Duration::from_millis(200));
        let t0 = std::time::Instant::now();
        let e = c.send_blocking(&Request::Status).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
        assert_eq!(e.to_string(), "GET /status: no answer within 200 ms");
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
