//! A tokio runtime of its own for one long-running async task (the primary's epoch loop, a
//! backup), started from a named thread, so it never competes with another task's executor;
//! the task itself runs on the runtime's one worker thread, beside the QUIC tasks it spawns
//! ([`block_on_worker`]).

use std::future::Future;
use std::thread::JoinHandle;

/// How the threads of a runtime run.
#[derive(Debug, Clone, Default)]
pub struct Threads {
    /// Pinned to these CPUs (`vmm::affinity`); a pin the host refuses is logged and the thread
    /// runs unpinned.
    pub cpus: Option<Vec<usize>>,
    /// At real-time priority (`vmm::rt::make_current_realtime`); refused, logged, ordinary.
    pub realtime: bool,
}

/// Runs `fut` to completion on a one-worker runtime in a new thread called `name`, the
/// runtime's threads (its worker, its blocking pool) set up as `threads` says.
pub fn spawn_with<F>(name: &str, threads: Threads, fut: F) -> std::io::Result<JoinHandle<()>>
where
    F: Future<Output = ()> + Send + 'static,
{
    std::thread::Builder::new().name(name.to_string()).spawn({
        // (Its threads carry its name, for `top -H` and `/proc/<pid>/task`: at most 15
        // bytes on Linux.)
        let thread_name: String = format!("{name}-rt").chars().take(15).collect();
        move || match runtime_with(threads, Some(thread_name)) {
            Ok(rt) => block_on_worker(&rt, fut),
            Err(e) => eprintln!("vmatrix: cannot start a tokio runtime: {e}"),
        }
    })
}

/// Runs `fut` to completion on `rt`'s worker thread, beside the tasks it spawns (QUIC
/// connections, readers, writers), rather than on the calling thread as `block_on` would: a
/// hand-over between the loop and those tasks is then a task switch, not a wake-up of another
/// thread. The loop must then keep each of its steps short — the primary's driver encodes a
/// bounded amount per step (`primary::driver`) — or it holds up the QUIC tasks (measured:
/// docs/BENCHMARKS.md, "Where a protected reply's time goes").
pub fn block_on_worker<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match rt.block_on(rt.spawn(fut)) {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the runtime's task was cancelled: {e}"),
    }
}

/// A one-worker multi-thread runtime with timers and I/O.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with(Threads::default(), None)
}

/// [`runtime`] whose threads are set up as `threads` says.
pub fn runtime_with(
    threads: Threads,
    name: Option<String>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(1).enable_all();
    if let Some(n) = name {
        b.thread_name(n);
    }
    if threads.cpus.is_some() || threads.realtime {
        b.on_thread_start(move || {
            if let Some(cpus) = &threads.cpus {
                if let Err(e) = vmm::affinity::pin(0, cpus) {
                    tracing::warn!("cannot pin a replication thread to CPUs {cpus:?}: {e}");
                }
            }
            if threads.realtime {
                if let Err(e) = vmm::rt::make_current_realtime() {
                    tracing::warn!("no real-time priority for a replication thread: {e}");
                }
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
