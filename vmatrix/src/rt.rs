//! A tokio runtime of its own for one long-running async task (the primary's epoch loop, a
//! backup), on a named thread, so it never competes with another task's executor.

use std::future::Future;
use std::thread::JoinHandle;

/// Runs `fut` to completion on a one-worker runtime in a new thread called `name`.
pub fn spawn<F>(name: &str, fut: F) -> std::io::Result<JoinHandle<()>>
where
    F: Future<Output = ()> + Send + 'static,
{
    spawn_pinned(name, None, fut)
}

/// [`spawn`] with every thread of the runtime (its worker, its blocking pool) pinned to `cpus`
/// if given (`vmm::affinity`); a pin the host refuses is logged and the thread runs unpinned.
pub fn spawn_pinned<F>(
    name: &str,
    cpus: Option<Vec<usize>>,
    fut: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: Future<Output = ()> + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || match runtime_pinned(cpus) {
            // (On this thread, not on the worker beside the QUIC tasks: tried, it made the
            // acknowledgement's trip shorter for small checkpoints, but the loop's inline work —
            // a busy epoch's encoding — then held up QUIC; docs/BENCHMARKS.md.)
            Ok(rt) => rt.block_on(fut),
            Err(e) => eprintln!("vmatrix: cannot start a tokio runtime: {e}"),
        })
}

/// A one-worker multi-thread runtime with timers and I/O.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_pinned(None)
}

/// [`runtime`] whose threads are pinned to `cpus`, if given.
fn runtime_pinned(cpus: Option<Vec<usize>>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(1).enable_all();
    if let Some(cpus) = cpus {
        b.on_thread_start(move || {
            if let Err(e) = vmm::affinity::pin(0, &cpus) {
                tracing::warn!("cannot pin a replication thread to CPUs {cpus:?}: {e}");
            }
        });
    }
    b.build()
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
