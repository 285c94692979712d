//! A VM: KVM handles, guest memory, devices and the vCPU thread, assembled from a [`VmConfig`].

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::bus::Bus;
use crate::devices::platform::Platform;
use crate::devices::serial::{ConsoleOut, Serial};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetStats, RxThread, Tap};
use crate::events::GuestEvents;
use crate::layout::*;
use crate::memory::{self, GuestMem};
pub use crate::vcpu::VmExit;
use crate::vcpu::{self, Control};
use crate::{boot, loader, Error, Result};

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

/// A built (and possibly running) VM.
pub struct Vm {
    _kvm: Kvm,
    _vm_fd: VmFd,
    mem: GuestMem,
    control: Arc<Control>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    net: Option<NetDev>,
    rx: Option<RxThread>,
    blk: Option<BlkDev>,
    vcpu: Option<VcpuFd>,
    thread: Option<JoinHandle<VcpuFd>>,
}

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

impl Vm {
    /// Builds the VM: checks every host resource first, then creates KVM objects, loads the
    /// guest and wires the devices. The vCPU does not run until [`Vm::start`].
    pub fn new(cfg: VmConfig) -> Result<Vm> {
        let kvm = open_kvm()?;
        let elf = std::fs::read(&cfg.guest_elf).map_err(|err| Error::GuestRead {
            path: cfg.guest_elf.clone(),
            err,
        })?;
        let mem_size = cfg.mem_mib.saturating_mul(1 << 20);
        memory::check_size(cfg.mem_mib)?;
        let image = loader::parse(&elf, mem_size)?;
        let disk =
            match &cfg.disk {
                Some(p) => Some(OpenOptions::new().read(true).write(true).open(p).map_err(
                    |err| Error::Disk {
                        path: p.clone(),
                        err,
                    },
                )?),
                None => None,
            };
        let tap = cfg.tap.as_deref().map(Tap::open).transpose()?;

        let mem = memory::create(cfg.mem_mib)?;
        let vm_fd = kvm.create_vm().map_err(Error::kvm("create_vm"))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::MemoryMap(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if cfg.dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `mem_size` bytes owned by `mem`,
        // which this `Vm` keeps alive for as long as the KVM VM exists.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(Error::kvm("set_user_memory_region"))?;

        loader::load(&mem, &elf, &image).map_err(|e| Error::MemoryMap(e.to_string()))?;
        boot::write_tables(&mem)?;

        let mut vcpu = vm_fd.create_vcpu(0).map_err(Error::kvm("create_vcpu"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("get_supported_cpuid"))?;
        vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("set_cpuid2"))?;
        boot::setup_vcpu(&vcpu, image.entry)?;
        vcpu.set_kvm_immediate_exit(0);

        let events = Arc::new(GuestEvents::default());
        let control = Arc::new(Control::new(events.clone()));

        let mut pio = Bus::default();
        pio.insert(
            u64::from(SERIAL_PORT),
            8,
            Arc::new(Mutex::new(Serial::new(cfg.console.clone()))),
        );

        let mut mmio = Bus::default();
        let platform = Platform::new(
            events.clone(),
            control.clone(),
            mem.clone(),
            mem_size,
            cfg.guest_config.into_bytes(),
            cfg.generation,
        );
        mmio.insert(PLATFORM_ADDR, MMIO_WINDOW, Arc::new(Mutex::new(platform)));

        let net = tap.map(|t| {
            Arc::new(Mutex::new(MmioTransport::new(
                Net::new(t, cfg.mac),
                mem.clone(),
                events.clone(),
            )))
        });
        if let Some(n) = &net {
            mmio.insert(virtio_slot(0), MMIO_WINDOW, n.clone());
        }
        let blk = match disk {
            Some(f) => {
                let b = Block::new(f, "vmatrix-disk").map_err(|err| Error::Disk {
                    path: cfg.disk.clone().unwrap_or_default(),
                    err,
                })?;
                Some(Arc::new(Mutex::new(MmioTransport::new(
                    b,
                    mem.clone(),
                    events.clone(),
                ))))
            }
            None => None,
        };
        if let Some(b) = &blk {
            mmio.insert(virtio_slot(1), MMIO_WINDOW, b.clone());
        }

        Ok(Vm {
            _kvm: kvm,
            _vm_fd: vm_fd,
            mem,
            control,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            net,
            rx: None,
            blk,
            vcpu: Some(vcpu),
            thread: None,
        })
    }

    /// Starts the device threads and the vCPU thread.
    pub fn start(&mut self) -> Result<()> {
        let Some(vcpu) = self.vcpu.take() else {
            return Ok(());
        };
        if let Some(n) = &self.net {
            self.rx = Some(RxThread::spawn(n.clone())?);
        }
        let (pio, mmio, control) = (self.pio.clone(), self.mmio.clone(), self.control.clone());
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu::run(vcpu, pio, mmio, control))
            .map_err(|e| Error::Host(format!("spawning vCPU thread: {e}")))?;
        self.thread = Some(t);
        Ok(())
    }

    /// Pauses the vCPU and quiesces device threads. On return nothing writes guest memory.
    pub fn pause(&self) -> std::result::Result<(), VmExit> {
        self.control.pause()?;
        if let (Some(rx), Some(n)) = (&self.rx, &self.net) {
            rx.quiesce(n);
        }
        Ok(())
    }

    /// Resumes a paused VM.
    pub fn resume(&self) {
        if let Some(rx) = &self.rx {
            rx.resume();
        }
        self.control.resume();
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Blocks until the VM stops.
    pub fn wait(&mut self) -> VmExit {
        let r = self.control.wait_exit();
        if let Some(t) = self.thread.take() {
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

    /// Network counters, if the VM has a NIC.
    pub fn net_stats(&self) -> Option<NetStats> {
        self.net
            .as_ref()
            .map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).device().stats())
    }
}

impl Vm {
    /// Block requests completed, if the VM has a disk.
    pub fn blk_completed(&self) -> Option<u64> {
        self.blk.as_ref().map(|b| {
            b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .device()
                .completed
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.control.stop();
            self.wait();
        }
        self.rx = None;
    }
}
