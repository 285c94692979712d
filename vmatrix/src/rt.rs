//! A tokio runtime of its own for one long-running async task (the primary's epoch loop, a
//! backup), on a named thread, so it never competes with another task's executor.

use std::future::Future;
use std::thread::JoinHandle;

/// Runs `fut` to completion on a one-worker runtime in a new thread called `name`.
pub fn spawn<F>(name: &str, fut: F) -> std::io::Result<JoinHandle<()>>
where
    F: Future<Output = ()> + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || match runtime() {
            Ok(rt) => rt.block_on(fut),
            Err(e) => eprintln!("vmatrix: cannot start a tokio runtime: {e}"),
        })
}

/// A one-worker multi-thread runtime with timers and I/O.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending::<()>().await,
    }
}
