//! The vCPU thread: `KVM_RUN` in a loop, exits dispatched to the port and MMIO buses, and the
//! pause/resume/stop protocol.
//!
//! Pausing is counted (a user's pause and a checkpoint's pause may overlap; the vCPU runs only
//! when every pause has been resumed). The first pause interrupts any platform-device wait, then kicks
//! the vCPU: it sets `kvm_run.immediate_exit = 1` and sends `SIGRTMIN` to the vCPU thread. If the
//! thread is inside `KVM_RUN` the signal makes it return `EINTR`; if it is between runs (for
//! example finishing an MMIO exit), the next `KVM_RUN` completes the pending access and returns
//! `EINTR` at once. Either way the vCPU parks only at an instruction boundary with no exit half
//! done, which is what a state capture needs.
//!
//! **A pause at guest output** ([`Control::pause_at_output`]): when the replication loop would
//! capture as soon as guest output starts waiting, it arms the VM; the vCPU thread, handling
//! the exit that holds the epoch's first frame, then takes a pause itself (no signal: its next
//! `KVM_RUN` returns at once) while the loop wakes up. The capture that comes adopts that pause
//! instead of kicking; one that does not come within [`PRE_PAUSE_MAX`] lets the vCPU run on.
//! Before it parks in such a pause, the vCPU thread also reads its own state (the
//! [`StateHook`]: the ioctls a capture needs beyond the run page), while the loop is still
//! waking up; a capture that finds the vCPU parked since then uses it instead of the ioctls.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::Bus;
use crate::events::GuestEvents;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote its exit register (0 = clean shutdown, otherwise a guest panic code).
    GuestExit(u64),
    /// The guest faulted (triple fault, `hlt`, unexpected exit); `rip` is where it stopped.
    GuestFault {
        /// Guest instruction pointer at the fault.
        rip: u64,
        /// What happened.
        what: String,
    },
    /// The host asked the VM to stop.
    Stopped,
    /// KVM itself failed.
    Error(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestExit(0) => write!(f, "guest shut down cleanly"),
            VmExit::GuestExit(c) => write!(f, "guest stopped with exit code {c:#x}"),
            VmExit::GuestFault { rip, what } => write!(f, "guest fault at rip {rip:#x}: {what}"),
            VmExit::Stopped => write!(f, "stopped by the host"),
            VmExit::Error(e) => write!(f, "KVM error: {e}"),
        }
    }
}

/// Run-state of the vCPU as seen by the controller.
#[derive(Debug, Default)]
struct CtlState {
    /// Outstanding pauses; the vCPU runs only at zero.
    pauses: u32,
    paused: bool,
    stop: Option<VmExit>,
    exited: Option<VmExit>,
    /// Since when the vCPU holds a pause it took at guest output, not yet adopted by a
    /// capture (it counts in `pauses`).
    pre_pause: Option<Instant>,
    /// Counts the vCPU's returns from `park_if_asked`: state read at a park is current while
    /// the vCPU is parked and this has not moved.
    park_gen: u64,
}

/// Reads a vCPU's state on its own thread (`synced`: the run page holds its registers); set by
/// the VM that owns the vCPU.
pub type StateHook =
    Box<dyn Fn(&VcpuFd, bool) -> Option<crate::vcpu_state::VcpuState> + Send + Sync>;

/// Longest a pause taken at guest output waits for the capture it was taken for: then the
/// vCPU runs on (the capture, when it comes, pauses as usual). The default of
/// [`Control::set_pre_pause_max`].
pub const PRE_PAUSE_MAX: Duration = Duration::from_millis(2);

thread_local! {
    /// On a vCPU thread, the address of its VM's control block: a pause that thread takes
    /// itself needs no signal.
    static ON_VCPU: Cell<usize> = const { Cell::new(0) };
}

/// Interrupts a vCPU thread out of `KVM_RUN`.
struct Kicker {
    immediate_exit: *mut u8,
    thread: libc::pthread_t,
    /// Its kernel thread id (for its scheduling priority).
    tid: i32,
}

// SAFETY: `immediate_exit` points into the vCPU's `kvm_run` mapping, which lives as long as
// the `VcpuFd`; the vCPU thread keeps the `VcpuFd` alive until after it has marked itself
// exited under the control lock, and `kick` only runs under that lock while not exited.
unsafe impl Send for Kicker {}

impl Kicker {
    fn kick(&self) {
        // SAFETY: see the `Send` impl: the pointer is valid while the thread has not exited,
        // which the caller guarantees by holding the control lock. The byte is only ever
        // accessed atomically by us and read by KVM on entry.
        unsafe { AtomicU8::from_ptr(self.immediate_exit).store(1, Ordering::SeqCst) };
        // SAFETY: `thread` is the pthread handle of a thread that has not been joined yet.
        unsafe { libc::pthread_kill(self.thread, SIGRTMIN()) };
    }

    /// The kick for the vCPU's own thread, between runs: its next `KVM_RUN` returns at once.
    fn arm(&self) {
        // SAFETY: as in `kick`: called under the control lock while the thread has not exited.
        unsafe { AtomicU8::from_ptr(self.immediate_exit).store(1, Ordering::SeqCst) };
    }
}

/// Shared control block between the VM's owner and its vCPU thread.
pub struct Control {
    state: Mutex<CtlState>,
    cv: Condvar,
    stop_flag: AtomicBool,
    events: Arc<GuestEvents>,
    kicker: Mutex<Option<Kicker>>,
    /// Real-time priority for the pause path (off unless the VM's owner turns it on).
    pub(crate) boost: crate::rt::PauseBoost,
    /// The vCPU's dirty ring, collected by its thread when it fills (`crate::dirty_ring`).
    ring: std::sync::OnceLock<Arc<crate::dirty_ring::DirtyRing>>,
    /// KVM copies registers, special registers and events to the run page at every exit.
    sync_regs: AtomicBool,
    /// A `KVM_RUN` has returned since the vCPU was set up: the run page's copy is its state
    /// (until then it holds nothing; the VMM sets state only before the vCPU thread starts).
    synced: AtomicBool,
    /// Take a pause at the next guest output that starts waiting ([`Control::pause_at_output`]).
    output_armed: AtomicBool,
    /// Pauses taken at guest output: (taken, adopted by a capture, ended unadopted, captures
    /// that used the state read at the park).
    output_pauses: [AtomicU64; 4],
    /// Reads the vCPU's state before it parks in a pause taken at guest output.
    state_hook: OnceLock<StateHook>,
    /// How long a pause taken at guest output waits to be adopted, µs.
    pre_pause_max_us: AtomicU64,
    /// What the hook read, and the `park_gen` it was read at.
    parked_state: Mutex<Option<(u64, crate::vcpu_state::VcpuState)>>,
    /// Runs on the vCPU thread before the guest's first instruction in this process (the
    /// clock page's anchor, `crate::pvclock`).
    first_run: Mutex<Option<FirstRun>>,
}

/// See [`Control::set_first_run`].
pub type FirstRun = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Pauses the vCPU took at guest output ([`Control::pause_at_output`]) since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputPauses {
    /// Taken.
    pub taken: u64,
    /// Adopted by a pause (the capture they were taken for, or any other that came first).
    pub adopted: u64,
    /// Ended after [`PRE_PAUSE_MAX`] without one.
    pub expired: u64,
    /// Captures that used the state the vCPU read before parking in one.
    pub state_reads: u64,
}

impl Control {
    /// A control block for a VM whose devices signal through `events`.
    pub fn new(events: Arc<GuestEvents>) -> Self {
        Control {
            state: Mutex::new(CtlState::default()),
            cv: Condvar::new(),
            stop_flag: AtomicBool::new(false),
            events,
            kicker: Mutex::new(None),
            boost: crate::rt::PauseBoost::default(),
            ring: std::sync::OnceLock::new(),
            sync_regs: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            output_armed: AtomicBool::new(false),
            output_pauses: Default::default(),
            state_hook: OnceLock::new(),
            parked_state: Mutex::new(None),
            pre_pause_max_us: AtomicU64::new(PRE_PAUSE_MAX.as_micros() as u64),
            first_run: Mutex::new(None),
        }
    }

    /// Sets what the vCPU thread does once, before the guest's first instruction in this
    /// process — after any pause the VM starts in (`pause_before_start`), so memory read while
    /// paused is still the memory restored.
    pub(crate) fn set_first_run(&self, f: FirstRun) {
        *self.first_run.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    fn take_first_run(&self) -> Option<FirstRun> {
        self.first_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// How long a pause taken at guest output waits for its capture ([`PRE_PAUSE_MAX`]).
    pub(crate) fn set_pre_pause_max(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.pre_pause_max_us.store(us, Ordering::Relaxed);
    }

    /// Sets how the vCPU reads its own state before parking at guest output (once).
    pub(crate) fn set_state_hook(&self, hook: StateHook) {
        let _ = self.state_hook.set(hook);
    }

    /// vCPU side, about to park: if the pause is one taken at guest output (a capture is on
    /// its way), read the state now, while the capturing thread wakes up.
    fn read_state_if_pre_paused(&self, vcpu: &VcpuFd) {
        let gen = {
            let s = self.lock();
            if s.pre_pause.is_none() {
                return;
            }
            s.park_gen
        };
        let Some(hook) = self.state_hook.get() else {
            return;
        };
        let state = hook(vcpu, self.regs_in_run_page());
        *self.parked_state.lock().unwrap_or_else(|p| p.into_inner()) = state.map(|st| (gen, st));
    }

    /// The state the vCPU read before it parked, if it has stayed parked since (a pause is
    /// held by the caller); taken, so it is used once.
    pub(crate) fn take_parked_state(&self) -> Option<crate::vcpu_state::VcpuState> {
        let s = self.lock();
        let mut slot = self.parked_state.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some((gen, st)) if s.paused && gen == s.park_gen => {
                self.output_pauses[3].fetch_add(1, Ordering::Relaxed);
                Some(st)
            }
            _ => None,
        }
    }

    /// Counts of pauses taken at guest output.
    pub fn output_pauses(&self) -> OutputPauses {
        let [t, a, e, r] = &self.output_pauses;
        OutputPauses {
            taken: t.load(Ordering::Relaxed),
            adopted: a.load(Ordering::Relaxed),
            expired: e.load(Ordering::Relaxed),
            state_reads: r.load(Ordering::Relaxed),
        }
    }

    /// Arms (or disarms) the pause at guest output: see the module's documentation.
    pub(crate) fn arm_output_pause(&self, on: bool) {
        self.output_armed.store(on, Ordering::SeqCst);
    }

    /// Guest output started waiting: if armed (once per arming), pause the vCPU now, before
    /// the capture that the output wakes up comes to pause it. Only when no other pause is
    /// held or asked for. Called from a device exit: on the vCPU's own thread the pause takes
    /// no signal (its next `KVM_RUN` returns at once); from another thread it kicks.
    pub(crate) fn pause_at_output(&self) -> bool {
        if !self.output_armed.swap(false, Ordering::SeqCst) {
            return false;
        }
        let mut s = self.lock();
        if s.pauses > 0 || s.stop.is_some() || s.exited.is_some() {
            return false;
        }
        s.pauses = 1;
        s.pre_pause = Some(Instant::now());
        self.output_pauses[0].fetch_add(1, Ordering::Relaxed);
        self.events.set_interrupted(true);
        match ON_VCPU.with(Cell::get) == std::ptr::from_ref(self) as usize {
            true => {
                if let Some(k) = self
                    .kicker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    k.arm();
                }
            }
            false => self.kick(&s),
        }
        true
    }

    /// KVM keeps the vCPU's registers in its run page (see `KvmParts::sync_regs`).
    pub(crate) fn set_sync_regs(&self, on: bool) {
        self.sync_regs.store(on, Ordering::SeqCst);
    }

    /// Whether the run page holds the vCPU's registers, special registers and events as of
    /// its last exit (the vCPU must be parked or stopped for them to be current).
    pub(crate) fn regs_in_run_page(&self) -> bool {
        self.sync_regs.load(Ordering::SeqCst) && self.synced.load(Ordering::SeqCst)
    }

    /// The vCPU's dirty ring, if it has one (set once, when the VM is assembled).
    pub(crate) fn set_ring(&self, ring: Option<Arc<crate::dirty_ring::DirtyRing>>) {
        if let Some(r) = ring {
            let _ = self.ring.set(r);
        }
    }

    /// The vCPU exited because its dirty ring is full: collect it (the next harvest returns
    /// those pages) so that it can run on.
    fn ring_full(&self) -> Owned {
        match self.ring.get().map(|r| r.collect_full()) {
            Some(Ok(_)) => Owned::Done,
            Some(Err(e)) => Owned::Error(format!("collecting the full dirty ring: {e}")),
            None => Owned::Unexpected("dirty ring full without a ring".into()),
        }
    }

    /// The vCPU thread's kernel id, once it runs.
    pub(crate) fn vcpu_tid(&self) -> Option<i32> {
        self.kicker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|k| k.tid)
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self, s: &CtlState) {
        if s.exited.is_none() {
            if let Some(k) = self
                .kicker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                k.kick();
            }
        }
    }

    /// Ends a guest's wait in the VMM (a device event).
    pub(crate) fn wake_guest(&self) {
        self.events.signal();
    }

    /// Asks the vCPU to stop with `reason` (the first reason wins).
    fn request_stop(&self, reason: VmExit) {
        let mut s = self.lock();
        if s.stop.is_none() {
            s.stop = Some(reason);
        }
        self.stop_flag.store(true, Ordering::SeqCst);
        self.events.set_interrupted(true);
        self.kick(&s);
        self.cv.notify_all();
    }

    /// True once the VM has been asked to stop (its vCPU leaves any pause to end).
    pub fn stopping(&self) -> bool {
        self.stop_flag.load(Ordering::SeqCst)
    }

    /// Called by the platform device when the guest writes its exit register.
    pub fn request_guest_exit(&self, code: u64) {
        self.request_stop(VmExit::GuestExit(code));
    }

    /// Stops the VM from the host side.
    pub fn stop(&self) {
        self.request_stop(VmExit::Stopped);
    }

    /// Pauses the vCPU and returns once it is parked at an instruction boundary. Returns the
    /// exit reason instead if the VM has already stopped.
    pub fn pause(&self) -> Result<(), VmExit> {
        let mut s = self.lock();
        if let Some(e) = &s.exited {
            return Err(e.clone());
        }
        // A pause the vCPU took at guest output is adopted: it is this one, and the vCPU parks
        // (or has parked) without a kick.
        let adopted = s.pauses > 0 && s.pre_pause.take().is_some();
        // Any pause ends the arming: what was armed for is decided again after it.
        self.output_armed.store(false, Ordering::SeqCst);
        match adopted {
            true => _ = self.output_pauses[1].fetch_add(1, Ordering::Relaxed),
            false => s.pauses += 1,
        }
        if s.pauses == 1 && !adopted {
            // The kick first: a vCPU woken from a platform wait by the interrupt below then
            // parks at its next KVM_RUN. Woken first, it ran the guest again (which waited
            // again, was interrupted again, ...) and, woken on this thread's CPU, preempted
            // this thread before it could kick: idle pauses took 2-5 ms on a quiet 2-CPU host
            // (until the scheduler moved one of them), 0.2-0.7 ms with the kick first.
            self.kick(&s);
            self.events.set_interrupted(true);
        }
        while !s.paused && s.exited.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match &s.exited {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// [`pause`](Self::pause) for a short capture by this thread, which ends it with
    /// [`resume_boosted`](Self::resume_boosted): where the pause path runs at real-time
    /// priority (`crate::rt`), this thread — and the vCPU thread, if this pause is the one
    /// that parks it — are raised first, so neither waits for a neighbour's time slice.
    pub fn pause_boosted(&self) -> Result<crate::rt::Boosted, VmExit> {
        let tids: Vec<i32> = {
            let s = self.lock();
            let vcpu = self
                .vcpu_tid()
                // (A pause the vCPU took at guest output is the one this pause adopts; a vCPU
                // already parked in it needs no boost: it is lowered before it runs again.)
                .filter(|_| {
                    s.exited.is_none() && (s.pauses == 0 || (s.pre_pause.is_some() && !s.paused))
                });
            // This thread first: a vCPU running guest code, raised while this thread is still
            // ordinary, preempts it if they share a CPU — and a guest that never waits (a
            // CPU-bound one) then keeps it off that CPU until the scheduler moves it: pauses
            // of 60-110 ms beside a busy neighbour (the 1,000 pages per epoch rows of
            // docs/BENCHMARKS.md). Two threads at the same FIFO priority do not preempt
            // each other.
            [crate::rt::gettid()].into_iter().chain(vcpu).collect()
        };
        let b = self.boost.raise(&tids);
        match self.pause() {
            Ok(()) => Ok(b),
            Err(e) => {
                self.lower_boosted(b);
                Err(e)
            }
        }
    }

    /// Lowers what a [`pause_boosted`](Self::pause_boosted) raised; a vCPU thread that exited
    /// meanwhile is not touched (its id may be another thread's by now).
    pub(crate) fn lower_boosted(&self, b: crate::rt::Boosted) {
        let s = self.lock();
        let me = crate::rt::gettid();
        self.boost
            .lower_if(b, |tid| tid == me || s.exited.is_none());
    }

    /// Ends a [`pause_boosted`](Self::pause_boosted): the vCPU thread is lowered first (it
    /// runs guest code again at its ordinary priority), then the pause ends; returns whether
    /// the vCPU runs, and what is left boosted — this thread, which the caller lowers with
    /// [`lower_boosted`](Self::lower_boosted) once the pause is over (lowered before the
    /// resume, it could be preempted by any ordinary thread between the two: resumes of 0.5-0.7
    /// ms beside a busy neighbour).
    pub fn resume_boosted(&self, b: crate::rt::Boosted) -> (bool, crate::rt::Boosted) {
        let me = crate::rt::gettid();
        let (mine, vcpu) = b.split(me);
        self.lower_boosted(vcpu);
        (self.resume(), mine)
    }

    /// Makes the vCPU park as soon as it starts (restore with `--paused`).
    pub fn pause_before_start(&self) {
        let mut s = self.lock();
        s.pauses += 1;
        self.events.set_interrupted(true);
    }

    /// Waits until a pause requested with `pause_before_start` has taken effect.
    pub fn wait_paused(&self) -> Result<(), VmExit> {
        let mut s = self.lock();
        while !s.paused && s.exited.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match &s.exited {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Ends one pause; the vCPU runs again when no pause is left. Returns true if it does.
    pub fn resume(&self) -> bool {
        let mut s = self.lock();
        s.pauses = s.pauses.saturating_sub(1);
        let run = s.pauses == 0;
        if run {
            // (A resume with no pause of its own must not leave a pause at output to adopt.)
            s.pre_pause = None;
        }
        if run && s.stop.is_none() {
            self.events.set_interrupted(false);
        }
        // Woken after the lock is released: the vCPU does not wake only to block on it (and
        // preempt this thread in between).
        drop(s);
        self.cv.notify_all();
        run
    }

    /// True while the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// The exit reason once the vCPU thread has ended.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.lock().exited.clone()
    }

    /// Blocks until the vCPU thread has ended and returns why.
    pub fn wait_exit(&self) -> VmExit {
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.exited {
                return e.clone();
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// vCPU side after `EINTR`: park while a pause is wanted. Returns a stop reason if the vCPU
    /// must end.
    fn park_if_asked(&self) -> Option<VmExit> {
        let mut s = self.lock();
        if s.pauses > 0 && s.stop.is_none() {
            s.paused = true;
            self.cv.notify_all();
            while s.pauses > 0 && s.stop.is_none() {
                let Some(since) = s.pre_pause else {
                    s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                    continue;
                };
                let max = Duration::from_micros(self.pre_pause_max_us.load(Ordering::Relaxed));
                let left = max.saturating_sub(since.elapsed());
                if left.is_zero() {
                    // Nobody came to capture: the pause taken at guest output ends.
                    s.pre_pause = None;
                    s.pauses -= 1;
                    self.output_pauses[2].fetch_add(1, Ordering::Relaxed);
                    if s.pauses == 0 {
                        self.events.set_interrupted(false);
                    }
                    continue;
                }
                s = self
                    .cv
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            s.paused = false;
        }
        s.park_gen += 1;
        s.stop.clone()
    }

    fn mark_exited(&self, reason: VmExit) {
        let mut s = self.lock();
        s.exited = Some(reason);
        s.paused = false;
        *self.kicker.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.cv.notify_all();
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal exists only to make KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            register_signal_handler(SIGRTMIN(), kick_handler)
                .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
        })
        .clone()
}

/// An exit copied out of `kvm_run` so the vCPU can be used again while handling it.
enum Owned {
    Done,
    Fault(&'static str),
    Unexpected(String),
    FailEntry(u64),
    Intr,
    Again,
    Error(String),
}

/// Runs the vCPU until the VM stops. The thread holds the vCPU's lock while it runs and
/// releases it while parked, so a controller can read or write vCPU state during a pause. The
/// `Arc` keeps the `kvm_run` mapping alive for any kick until after the thread has exited.
pub fn run(vcpu: Arc<Mutex<VcpuFd>>, pio: Arc<Bus>, mmio: Arc<Bus>, control: Arc<Control>) {
    let reason = run_loop(&vcpu, &pio, &mmio, &control);
    control.mark_exited(reason);
}

fn lock_vcpu(v: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers the calling thread as the target of kicks for `vcpu`.
fn register_kicker(vcpu: &mut VcpuFd, control: &Control) -> Result<(), String> {
    install_kick_handler()?;
    let run = vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run;
    // SAFETY: `run` points to the live kvm_run mapping of `vcpu`; we only take the address of
    // one of its fields.
    let immediate_exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
    let kicker = Kicker {
        immediate_exit,
        // SAFETY: pthread_self has no preconditions.
        thread: unsafe { libc::pthread_self() },
        tid: crate::rt::gettid(),
    };
    *control.kicker.lock().unwrap_or_else(|p| p.into_inner()) = Some(kicker);
    Ok(())
}

fn run_loop(shared: &Mutex<VcpuFd>, pio: &Bus, mmio: &Bus, control: &Control) -> VmExit {
    let mut vcpu = lock_vcpu(shared);
    ON_VCPU.with(|c| c.set(std::ptr::from_ref(control) as usize));
    if let Err(e) = register_kicker(&mut vcpu, control) {
        return VmExit::Error(e);
    }
    // A stop or pause requested before the kicker existed must still be seen.
    vcpu.set_kvm_immediate_exit(1);
    loop {
        if control.stop_flag.load(Ordering::SeqCst) {
            if let Some(r) = control.park_if_asked() {
                return r;
            }
        }
        let owned = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                Owned::Done
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
                Owned::Done
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    tracing::debug!("unclaimed MMIO read at {addr:#x}");
                }
                Owned::Done
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    tracing::debug!("unclaimed MMIO write at {addr:#x}");
                }
                Owned::Done
            }
            Ok(VcpuExit::Shutdown) => Owned::Fault(
                "triple fault (KVM_EXIT_SHUTDOWN): the guest took an exception it cannot handle",
            ),
            Ok(VcpuExit::Hlt) => Owned::Fault("the guest executed hlt"),
            Ok(VcpuExit::FailEntry(reason, _)) => Owned::FailEntry(reason),
            Ok(VcpuExit::InternalError) => Owned::Fault("KVM internal error (emulation failure)"),
            Ok(VcpuExit::Intr) => Owned::Intr,
            Ok(VcpuExit::Unsupported(crate::dirty_ring::EXIT_DIRTY_RING_FULL)) => {
                control.ring_full()
            }
            Ok(other) => Owned::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => Owned::Intr,
            Err(e) if e.errno() == libc::EAGAIN => Owned::Again,
            Err(e) => Owned::Error(e.to_string()),
        };
        match owned {
            Owned::Done | Owned::Again => {}
            Owned::Intr => {
                // (This KVM_RUN completed any access in flight before returning: the run
                // page's registers are the state a capture wants.)
                control.synced.store(true, Ordering::SeqCst);
                vcpu.set_kvm_immediate_exit(0);
                control.read_state_if_pre_paused(&vcpu);
                // Release the vCPU while parked so its state can be captured or restored.
                drop(vcpu);
                let stop = control.park_if_asked();
                vcpu = lock_vcpu(shared);
                if let Some(r) = stop {
                    return r;
                }
                // (The first KVM_RUN returned at once, immediate_exit being set: the guest has
                // not run yet, and runs next.)
                if let Some(f) = control.take_first_run() {
                    f(&vcpu);
                }
            }
            Owned::Fault(what) => {
                return VmExit::GuestFault {
                    rip: rip(&vcpu),
                    what: what.to_string(),
                }
            }
            Owned::Unexpected(what) => {
                return VmExit::GuestFault {
                    rip: rip(&vcpu),
                    what: format!("unexpected VM exit {what}"),
                }
            }
            Owned::FailEntry(reason) => {
                return VmExit::Error(format!("VM entry failed, hardware reason {reason:#x}"))
            }
            Owned::Error(e) => return VmExit::Error(format!("KVM_RUN failed: {e}")),
        }
    }
}

fn rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
}
