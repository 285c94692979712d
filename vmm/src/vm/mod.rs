//! A VM: KVM handles, guest memory, devices and the vCPU thread. Built fresh from a
//! [`VmConfig`] (this file) or from a snapshot (`restore.rs`); snapshots are taken in
//! `snapshot.rs`.

mod clone;
mod epoch_pre;
mod pause;
mod replicate;
mod restore;
mod snapshot;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::bus::Bus;
use crate::devices::platform::Platform;
use crate::devices::serial::{ConsoleOut, Serial};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetStats, RxThread, Tap};
use crate::dirty::{ChangeTracker, Consumer, DirtyPages, Pending};
use crate::events::GuestEvents;
use crate::layout::*;
use crate::memory::{self, GuestMem};
use crate::snapshot::ParentRef;
pub use crate::vcpu::VmExit;
use crate::vcpu::{self, Control};
use crate::vcpu_state;
use crate::{boot, loader, Error, Result};
pub use clone::{CloneDisk, CloneParts};
pub use replicate::{CaptureKind, Changes, DiskCapture, EpochCapture};
pub use restore::{RestoreConfig, RestoreParts};
pub use snapshot::{SnapshotKind, SnapshotStats};

/// Everything needed to build a VM.
pub struct VmConfig {
    /// Path of the guest ELF.
    pub guest_elf: PathBuf,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Raw disk file for virtio-blk, if any.
    pub disk: Option<PathBuf>,
    /// Existing tap interface for virtio-net, if any.
    pub tap: Option<String>,
    /// MAC address of the guest NIC.
    pub mac: [u8; 6],
    /// Config string handed to the guest through the platform device.
    pub guest_config: String,
    /// Where the guest console goes.
    pub console: ConsoleOut,
    /// Enable KVM dirty-page logging on guest RAM.
    pub dirty_log: bool,
    /// Generation id reported by the platform device.
    pub generation: u64,
}

type NetDev = Arc<Mutex<MmioTransport<Net<Tap>>>>;
type BlkDev = Arc<Mutex<MmioTransport<Block>>>;

/// The devices of a VM, typed (the buses hold the same objects as trait objects).
pub(crate) struct Devices {
    pub serial: Arc<Mutex<Serial>>,
    pub platform: Arc<Mutex<Platform>>,
    pub net: Option<NetDev>,
    pub blk: Option<BlkDev>,
}

/// A built (and possibly running) VM.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMem,
    mem_size: u64,
    dirty_log: bool,
    /// KVM's dirty log and what each consumer of changes has not been handed yet; one lock,
    /// held for a whole harvest and its fan-out (see [`Vm::take_changes`]).
    tracking: Mutex<Tracking>,
    msr_indices: Vec<u32>,
    control: Arc<Control>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: Devices,
    rx: Mutex<Option<RxThread>>,
    vcpu: Arc<Mutex<VcpuFd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The snapshot a diff is relative to. Held for a whole snapshot (one at a time); taken
    /// before `tracking`.
    last_snapshot: Mutex<Option<ParentRef>>,
    /// Dirty pages copied during a pause, written out after the resume.
    staging: Mutex<Vec<u8>>,
    /// Page buffers of earlier captures given back (`recycle_capture`): a capture's pages are
    /// copied into one of them, already faulted in, instead of a fresh allocation whose first
    /// touch of every page (~2-8 µs each here) would lengthen the pause.
    capture_pool: Mutex<Vec<Vec<u8>>>,
    /// Whether pooled capture buffers are locked in RAM (`Vm::set_lock_buffers`), and the
    /// (address, length) of those locked so far.
    locked_buffers: Mutex<Option<Vec<(usize, usize)>>>,
    /// The CPUs the vCPU thread is pinned to (`Vm::pin_vcpu`), for a thread started later.
    vcpu_cpus: Mutex<Option<Vec<usize>>>,
    /// Pages of the current epoch copied before its pause ([`Vm::precopy_epoch`]).
    epoch_pre: Mutex<epoch_pre::EpochPre>,
    /// Held by every capture and pre-copy for replication, so that one never overlaps another
    /// (a capture left running by an ended session and the next session's, for example); holds
    /// the last epoch capture's page count (whether the next one's pause may be boosted).
    captures: Mutex<usize>,
    /// Bytes of the last epoch capture's encoded state: the next one's buffer is made that
    /// size at once (growing it step by step was 5 of a pause's ~20 allocations).
    state_len: std::sync::atomic::AtomicUsize,
    /// The vCPU's TSC frequency, read at the first capture (`vcpu_state::capture`).
    tsc_khz: Arc<std::sync::OnceLock<Option<u32>>>,
    /// Runs once, right before the first guest instruction may run ([`Vm::gate_start`]).
    start_gate: Mutex<Option<StartGate>>,
}

/// Work that must be done before the guest runs, or the guest must not run at all.
pub type StartGate = Box<dyn FnOnce() -> std::result::Result<(), String> + Send>;

/// The dirty-tracking state of a VM.
struct Tracking {
    kvm: crate::dirty_log::KvmDirtyLog,
    ring: Option<Arc<crate::dirty_ring::DirtyRing>>,
    changes: ChangeTracker,
}

/// Longest wait at the start for the tap to carry frames ([`Tap::wait_carrier`]).
const TAP_CARRIER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Environment variable naming another KVM device node (default `/dev/kvm`).
pub const KVM_DEVICE_ENV: &str = "VMATRIX_KVM_DEVICE";

/// Opens `/dev/kvm` (or `$VMATRIX_KVM_DEVICE`) with a clear error when it is missing or not
/// permitted.
pub fn open_kvm() -> Result<Kvm> {
    let path = std::env::var(KVM_DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".to_string());
    let cpath =
        std::ffi::CString::new(path.clone()).map_err(|_| Error::KvmMissing(path.clone()))?;
    match Kvm::new_with_path(cpath) {
        Ok(k) => Ok(k),
        Err(e) if e.errno() == libc::ENOENT => Err(Error::KvmMissing(path)),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(Error::KvmPermission(path))
        }
        Err(e) => Err(Error::Kvm {
            op: "open /dev/kvm",
            err: e,
        }),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits (at most [`TAP_CARRIER_WAIT`]) until the VM's tap carries frames, so that nothing the
/// guest sends first (a restored guest's gratuitous ARP) is dropped; starts anyway after that.
fn wait_for_tap(n: &NetDev) {
    let n = lock(n);
    let tap = n.device().backend();
    let t0 = std::time::Instant::now();
    match tap.wait_carrier(TAP_CARRIER_WAIT) {
        true if t0.elapsed().as_micros() > 500 => {
            tracing::info!("{} carries frames after {:?}", tap.name(), t0.elapsed())
        }
        true => {}
        false => tracing::warn!(
            "{} does not carry frames {TAP_CARRIER_WAIT:?} after it was opened (down, or its \
             bridge port is not forwarding): starting anyway",
            tap.name()
        ),
    }
}

/// Opens a disk image read-write with a clear error.
pub(crate) fn open_disk(p: &PathBuf) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|err| Error::Disk {
            path: p.clone(),
            err,
        })
}

/// KVM objects of a VM whose guest RAM is `mem`.
pub(crate) struct KvmParts {
    pub kvm: Kvm,
    pub vm_fd: VmFd,
    pub vcpu: VcpuFd,
    pub msr_indices: Vec<u32>,
    pub dirty: crate::dirty_log::KvmDirtyLog,
    /// The vCPU's dirty ring, where it replaces the bitmap (`crate::dirty_ring`).
    pub ring: Option<Arc<crate::dirty_ring::DirtyRing>>,
    /// KVM copies the vCPU's registers, special registers and events into the shared run
    /// page at every exit (`KVM_CAP_SYNC_REGS`): a capture reads them there.
    pub sync_regs: bool,
}

/// Creates the KVM VM, registers `mem` as slots 0 and 1 (`crate::layout::ram_ranges`) and creates vCPU 0 with the host's CPUID.
pub(crate) fn create_kvm_vm(
    kvm: Kvm,
    mem: &GuestMem,
    mem_size: u64,
    dirty_log: bool,
) -> Result<KvmParts> {
    vcpu_state::check_xsave_size(&kvm)?;
    let msr_indices = vcpu_state::msr_indices(&kvm)?;
    let vm_fd = kvm.create_vm().map_err(Error::kvm("create_vm"))?;
    // The ring (before any vCPU exists) or hot-page dirty logging (before the slot exists).
    let ring_bytes = match dirty_log && crate::dirty_ring::preferred() {
        true => crate::dirty_ring::enable(&vm_fd),
        false => None,
    };
    let dirty = match (dirty_log, ring_bytes) {
        (true, None) => {
            let mut log = crate::dirty_log::KvmDirtyLog::new(&vm_fd);
            log.prepare(mem_size);
            log
        }
        _ => Default::default(),
    };
    for (slot, r) in crate::layout::ram_ranges(mem_size).iter().enumerate() {
        let whole = mem.find_region(GuestAddress(r.gpa)).map(|g| g.len());
        if whole != Some(r.len) {
            return Err(Error::MemoryMap(format!(
                "guest RAM at {:#x} is not one region of {} bytes",
                r.gpa, r.len
            )));
        }
        let host = mem
            .get_host_address(GuestAddress(r.gpa))
            .map_err(|e| Error::MemoryMap(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: r.gpa,
            memory_size: r.len,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `r.len` bytes owned by `mem` (one
        // region per RAM range), which the `Vm` keeps alive for as long as the KVM VM exists.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(Error::kvm("set_user_memory_region"))?;
    }
    let mut vcpu = vm_fd.create_vcpu(0).map_err(Error::kvm("create_vcpu"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("get_supported_cpuid"))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("set_cpuid2"))?;
    vcpu.set_kvm_immediate_exit(0);
    // Three ioctls fewer in every checkpoint's pause (~8-16 µs each on this host).
    let sync_regs = kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
    if sync_regs {
        use kvm_ioctls::SyncReg;
        for r in [
            SyncReg::Register,
            SyncReg::SystemRegister,
            SyncReg::VcpuEvents,
        ] {
            vcpu.set_sync_valid_reg(r);
        }
    }
    let pages = mem_size / crate::layout::PAGE_SIZE;
    let ring = ring_bytes
        .map(|b| crate::dirty_ring::DirtyRing::map(&vm_fd, &vcpu, b, pages).map(Arc::new))
        .transpose()?;
    Ok(KvmParts {
        kvm,
        vm_fd,
        vcpu,
        msr_indices,
        dirty,
        ring,
        sync_regs,
    })
}

impl Vm {
    /// Builds the VM: checks every host resource first, then creates KVM objects, loads the
    /// guest and wires the devices. The vCPU does not run until [`Vm::start`].
    pub fn new(cfg: VmConfig) -> Result<Vm> {
        let kvm = open_kvm()?;
        let elf = std::fs::read(&cfg.guest_elf).map_err(|err| Error::GuestRead {
            path: cfg.guest_elf.clone(),
            err,
        })?;
        let mem_size = memory::check_size(cfg.mem_mib)? as u64;
        let image = loader::parse(&elf, mem_size)?;
        let disk = cfg.disk.as_ref().map(open_disk).transpose()?;
        let tap = cfg.tap.as_deref().map(Tap::open).transpose()?;

        let mem = memory::create(cfg.mem_mib)?;
        loader::load(&mem, &elf, &image).map_err(|e| Error::MemoryMap(e.to_string()))?;
        boot::write_tables(&mem)?;
        boot::write_generation(&mem, cfg.generation)?;
        let parts = create_kvm_vm(kvm, &mem, mem_size, cfg.dirty_log)?;
        boot::setup_vcpu(&parts.vcpu, image.entry)?;

        let events = Arc::new(GuestEvents::default());
        let control = Arc::new(Control::new(events.clone()));
        let devices = Devices {
            serial: Arc::new(Mutex::new(Serial::new(cfg.console.clone()))),
            platform: Arc::new(Mutex::new({
                let mut p = Platform::new(
                    events.clone(),
                    control.clone(),
                    mem.clone(),
                    mem_size,
                    cfg.guest_config.into_bytes(),
                    cfg.generation,
                );
                p.set_console(cfg.console.clone());
                p
            })),
            net: tap.map(|t| {
                Arc::new(Mutex::new(MmioTransport::new(
                    Net::new(t, cfg.mac),
                    mem.clone(),
                    events.clone(),
                )))
            }),
            blk: match disk {
                Some(f) => Some(Arc::new(Mutex::new(MmioTransport::new(
                    Block::new(f, "vmatrix-disk").map_err(|err| Error::Disk {
                        path: cfg.disk.clone().unwrap_or_default(),
                        err,
                    })?,
                    mem.clone(),
                    events.clone(),
                )))),
                None => None,
            },
        };
        Ok(Vm::assemble(
            parts,
            mem,
            mem_size,
            cfg.dirty_log,
            control,
            devices,
        ))
    }

    /// Wires devices onto the buses and wraps everything into a `Vm`.
    pub(crate) fn assemble(
        parts: KvmParts,
        mem: GuestMem,
        mem_size: u64,
        dirty_log: bool,
        control: Arc<Control>,
        devices: Devices,
    ) -> Vm {
        let mut pio = Bus::default();
        pio.insert(u64::from(SERIAL_PORT), 8, devices.serial.clone());
        let mut mmio = Bus::default();
        mmio.insert(PLATFORM_ADDR, MMIO_WINDOW, devices.platform.clone());
        if let Some(n) = &devices.net {
            mmio.insert(virtio_slot(0), MMIO_WINDOW, n.clone());
        }
        if let Some(b) = &devices.blk {
            mmio.insert(virtio_slot(1), MMIO_WINDOW, b.clone());
        }
        control.set_ring(parts.ring.clone());
        control.set_sync_regs(parts.sync_regs);
        let tsc_khz = Arc::new(std::sync::OnceLock::new());
        // The guest's clock page, anchored to this host's TSC before the guest's first
        // instruction in this process (`crate::pvclock`).
        // (Weak: the platform device holds the control block, which holds this.)
        let (platform, tsc) = (Arc::downgrade(&devices.platform), tsc_khz.clone());
        control.set_first_run(Box::new(move |vcpu| {
            let Some(platform) = platform.upgrade() else {
                return;
            };
            let probe = crate::pvclock::probe(vcpu);
            lock(&platform).anchor_clock(probe);
            if let Some((khz, _)) = probe {
                let _ = tsc.set(Some(khz));
            }
        }));
        let (msrs, tsc) = (parts.msr_indices.clone(), tsc_khz.clone());
        control.set_state_hook(Box::new(move |vcpu, synced| {
            crate::vcpu_state::capture(vcpu, &msrs, synced, &tsc).ok()
        }));
        Vm {
            _kvm: parts.kvm,
            vm_fd: parts.vm_fd,
            mem,
            mem_size,
            dirty_log,
            tracking: Mutex::new(Tracking {
                kvm: parts.dirty,
                ring: parts.ring,
                changes: ChangeTracker::new(crate::devices::virtio::blk::MAX_RECORDED),
            }),
            msr_indices: parts.msr_indices,
            control,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            devices,
            rx: Mutex::new(None),
            vcpu: Arc::new(Mutex::new(parts.vcpu)),
            thread: Mutex::new(None),
            last_snapshot: Mutex::new(None),
            staging: Mutex::new(Vec::new()),
            capture_pool: Mutex::new(Vec::new()),
            locked_buffers: Mutex::new(None),
            vcpu_cpus: Mutex::new(None),
            epoch_pre: Mutex::default(),
            captures: Mutex::new(0),
            state_len: Default::default(),
            tsc_khz,
            start_gate: Mutex::new(None),
        }
    }

    /// Starts the device threads and the vCPU thread.
    pub fn start(&self) -> Result<()> {
        self.start_threads(false)
    }

    /// Sets `gate` to run when the VM starts ([`Vm::start`] or [`Vm::start_paused`]), before
    /// any of its threads: if it fails, the VM does not start and the start returns the error.
    /// For what must hold before the guest can change anything (a VM started from a replica
    /// image whose disk it takes over consumes the image first).
    pub fn gate_start(&self, gate: StartGate) {
        *lock(&self.start_gate) = Some(gate);
    }

    fn start_threads(&self, paused: bool) -> Result<()> {
        let mut thread = lock(&self.thread);
        if thread.is_some() {
            return Ok(());
        }
        // (The tap first: it may take a while to carry frames, and a gate that consumes an
        // image should run as close to the first instruction as it can.)
        if let Some(n) = &self.devices.net {
            wait_for_tap(n);
        }
        if let Some(gate) = lock(&self.start_gate).take() {
            gate().map_err(|e| Error::Host(format!("before the guest starts: {e}")))?;
        }
        if let Some(n) = &self.devices.net {
            *lock(&self.rx) = Some(RxThread::spawn(n.clone(), paused)?);
        }
        let (vcpu, pio, mmio, control) = (
            self.vcpu.clone(),
            self.pio.clone(),
            self.mmio.clone(),
            self.control.clone(),
        );
        let cpus = lock(&self.vcpu_cpus).clone();
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                if let Some(c) = cpus {
                    if let Err(e) = crate::affinity::pin(0, &c) {
                        tracing::warn!("cannot pin the vCPU thread to CPUs {c:?}: {e}");
                    }
                }
                vcpu::run(vcpu, pio, mmio, control)
            })
            .map_err(|e| Error::Host(format!("spawning vCPU thread: {e}")))?;
        *thread = Some(t);
        Ok(())
    }

    /// Starts the VM parked: no guest instruction runs until [`Vm::resume`].
    pub fn start_paused(&self) -> Result<()> {
        self.control.pause_before_start();
        // The receive thread starts quiesced too: no frame may reach guest memory before resume.
        self.start_threads(true)?;
        self.control
            .wait_paused()
            .map_err(|e| Error::Host(format!("VM stopped while starting paused: {e}")))
    }

    /// Locks the page buffers that pauses copy into in RAM from now on (`crate::affinity`):
    /// a pause then never faults on one the host reclaimed. Off by default. Where locking is
    /// refused (`RLIMIT_MEMLOCK`), it turns itself off, said once in the log.
    pub fn set_lock_buffers(&self, on: bool) {
        *lock(&self.locked_buffers) = on.then(Vec::new);
    }

    /// Whether pause buffers are locked in RAM.
    pub fn lock_buffers(&self) -> bool {
        lock(&self.locked_buffers).is_some()
    }

    /// Locks `buf` if buffers are to be locked and it is not yet.
    pub(crate) fn lock_buffer(&self, buf: &[u8]) {
        let mut l = lock(&self.locked_buffers);
        let Some(seen) = l.as_mut() else {
            return;
        };
        let key = (buf.as_ptr() as usize, buf.len());
        if seen.contains(&key) {
            return;
        }
        match crate::affinity::lock(buf) {
            Ok(()) => {
                seen.push(key);
                // (Buffers that never came back: forgotten, their pages stay locked until freed.)
                if seen.len() > 8 {
                    seen.remove(0);
                }
            }
            Err(e) => {
                tracing::warn!("pause buffers cannot be locked in RAM ({e}): left unlocked");
                *l = None;
            }
        }
    }

    /// Unlocks the buffer at `addr` of `len` bytes if [`Vm::lock_buffer`] locked it (the
    /// pool drops it: a freed range may be reused at the same address, unlocked).
    pub(crate) fn unlock_buffer(&self, addr: usize, len: usize) {
        let mut l = lock(&self.locked_buffers);
        let Some(seen) = l.as_mut() else {
            return;
        };
        if let Some(i) = seen.iter().position(|&k| k == (addr, len)) {
            seen.remove(i);
            if let Err(e) = crate::affinity::unlock(addr, len) {
                tracing::debug!("munlock of a pause buffer: {e}");
            }
        }
    }

    /// Pins the vCPU thread to `cpus`: now if it runs, and a thread started later from its
    /// first instruction.
    pub fn pin_vcpu(&self, cpus: &[usize]) -> std::io::Result<()> {
        *lock(&self.vcpu_cpus) = Some(cpus.to_vec());
        match self.control.vcpu_tid() {
            Some(tid) => crate::affinity::pin(tid, cpus),
            None => Ok(()),
        }
    }

    /// Where the vCPU's dirty pages come from: `ring` (KVM's dirty ring), `bitmap+hot`
    /// (`KVM_GET_DIRTY_LOG` with manual protection and hot pages), `bitmap`, or `off`.
    pub fn dirty_source(&self) -> &'static str {
        let t = lock(&self.tracking);
        match (self.dirty_log, t.ring.is_some(), t.kvm.manual()) {
            (false, _, _) => "off",
            (true, true, _) => "ring",
            (true, false, true) => "bitmap+hot",
            (true, false, false) => "bitmap",
        }
    }

    /// Times the dirty ring filled between two harvests (0 without a ring).
    pub fn dirty_ring_full(&self) -> u64 {
        lock(&self.tracking)
            .ring
            .as_ref()
            .map_or(0, |r| r.full_count())
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Blocks until the VM stops.
    pub fn wait(&self) -> VmExit {
        let r = self.control.wait_exit();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        r
    }

    /// The control block (pause/resume/stop from other threads).
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Network counters, if the VM has a NIC.
    pub fn net_stats(&self) -> Option<NetStats> {
        self.devices.net.as_ref().map(|n| lock(n).device().stats())
    }

    /// Block requests completed, if the VM has a disk.
    pub fn blk_completed(&self) -> Option<u64> {
        self.devices
            .blk
            .as_ref()
            .map(|b| lock(b).device().completed)
    }

    /// Guest clock in ns.
    pub fn guest_clock_ns(&self) -> u64 {
        lock(&self.devices.platform).clock_ns()
    }

    /// Reads and resets the dirty pages of both sources. The VM must be paused. What it reads is
    /// also handed to every consumer of changes (replication, snapshots): it takes nothing from
    /// them.
    pub fn harvest_dirty(&self) -> Result<DirtyPages> {
        self.check_paused("harvest dirty pages")?;
        self.harvest(&mut lock(&self.tracking), false)
    }

    /// Harvests (see [`harvest`](Self::harvest)) and hands consumer `c` every change not yet
    /// handed to it: the pages dirtied and the disk writes made since its previous take (see
    /// [`ChangeTracker`]). A consumer not yet active becomes active: its first take reports
    /// the disk as wholly changed. With `running`, the guest may run (pre-copy): the pages are
    /// copied only after this returns, and a write racing the copy marks its page again.
    pub(crate) fn take_changes(&self, c: Consumer, running: bool) -> Result<Pending> {
        if !running {
            self.check_paused("capture")?;
        }
        let mut t = lock(&self.tracking);
        t.changes.activate(c);
        self.harvest(&mut t, running)?;
        Ok(t.changes.take(c))
    }

    /// [`take_changes`](Self::take_changes) of the dirty pages only, while the guest runs (a
    /// later pre-copy pass): the disk writes stay pending for the final capture.
    pub(crate) fn take_dirty_running(&self, c: Consumer) -> Result<crate::page_set::PageSet> {
        let mut t = lock(&self.tracking);
        t.changes.activate(c);
        self.harvest(&mut t, true)?;
        Ok(t.changes.take_dirty(c))
    }

    /// A capture of `c` failed after taking `taken`: they are pending again.
    pub(crate) fn give_back(&self, c: Consumer, taken: Pending) {
        lock(&self.tracking).changes.give_back(c, taken);
    }

    /// The snapshot chain continues from `parent`, which this VM equals now (it was restored
    /// from it): diffs are relative to it, and changes are tracked for them from now on.
    pub(crate) fn continue_chain(&self, parent: ParentRef) {
        let mut last = lock(&self.last_snapshot);
        let mut t = lock(&self.tracking);
        if let Some(b) = &self.devices.blk {
            // Record disk writes from now on (a fresh record: the disk equals the snapshot's).
            lock(b).with_device_unchecked(|d| d.take_writes());
        }
        t.changes.start_clean(Consumer::Snapshots);
        *last = Some(parent);
    }

    /// One harvest: reads and resets KVM's dirty log (hot pages stay set), the device bitmap
    /// and, while a consumer is active, the disk write log (which starts recording), and adds
    /// all of it to every active consumer. Callers hold `tracking` for the harvest and their
    /// take, so no harvest can slip between another's reads and its fan-out.
    fn harvest(&self, t: &mut Tracking, running: bool) -> Result<DirtyPages> {
        if !self.dirty_log {
            return Err(Error::Host("dirty logging is off for this VM".into()));
        }
        let ring = t.ring.clone();
        let dirty = crate::dirty::harvest(
            (&mut t.kvm, ring.as_deref()),
            &self.vm_fd,
            (&self.mem, self.mem_size),
            running,
        )?;
        if t.changes.any_active() {
            let disk = match &self.devices.blk {
                Some(b) => lock(b).with_device_unchecked(|d| d.take_writes()),
                None => Some(Default::default()),
            };
            t.changes.add(&dirty.union(), disk);
        }
        Ok(dirty)
    }

    /// Errs if the vCPU thread runs and the VM is not paused.
    fn check_paused(&self, what: &str) -> Result<()> {
        if self.thread_running() && !self.is_paused() {
            // (A stop ends every pause: a capture that paused first finds it running.)
            if self.control.stopping() {
                return Err(Error::Host(format!("cannot {what}: the VM is stopping")));
            }
            return Err(Error::Host(format!("the VM must be paused to {what}")));
        }
        Ok(())
    }

    /// Fault injection for tests: the next `n` guest disk writes fail with an I/O error.
    pub fn inject_disk_write_failures(&self, n: u32) -> Result<()> {
        let b = self
            .devices
            .blk
            .as_ref()
            .ok_or_else(|| Error::Host("this VM has no disk".into()))?;
        lock(b).with_device_unchecked(|d| d.fail_writes = n);
        Ok(())
    }

    /// CRC32 of all guest RAM. The VM must be paused (or not started).
    pub fn memory_checksum(&self) -> Result<u32> {
        if self.thread_running() && !self.is_paused() {
            return Err(Error::Host(
                "the VM must be paused to checksum its memory".into(),
            ));
        }
        Ok(crate::snapshot::memory::checksum(&self.mem, self.mem_size))
    }

    fn thread_running(&self) -> bool {
        lock(&self.thread).is_some() && self.control.exit_reason().is_none()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if lock(&self.thread).is_some() {
            self.control.stop();
            self.wait();
        }
        *lock(&self.rx) = None;
    }
}
