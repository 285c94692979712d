//! The virtio-mmio transport (virtio 1.x "modern", register layout version 2).
//!
//! The transport owns the generic state (status, feature negotiation, queue configuration,
//! interrupt status) and the [`Queue`]s; the device only sees queues and memory when asked to
//! process one. A device error sets `DEVICE_NEEDS_RESET`, raises a config-change interrupt and
//! freezes the device until the driver resets it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{DeviceError, VirtioDevice, F_VERSION_1};
use crate::bus::{le_value, put_le_value, BusDevice};
use crate::events::GuestEvents;
use crate::memory::GuestMem;

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Vendor id reported to the guest ("VMXS").
pub const VENDOR_ID: u32 = 0x5358_4d56;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// Guest has a driver.
    pub const DRIVER: u32 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Register offsets.
#[allow(missing_docs)]
pub mod regs {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Interrupt status bit: a buffer was used.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: configuration (or NEEDS_RESET) changed.
pub const INT_CONFIG: u32 = 2;

/// A virtio device with its transport state.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMem,
    events: Arc<GuestEvents>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    last_error: Option<DeviceError>,
}

/// Borrowed view of a transport's fields, for persistence.
pub(super) struct Parts<'a, D> {
    pub device: &'a D,
    pub queues: &'a [Queue],
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub last_error: Option<&'a DeviceError>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub(super) fn parts(&self) -> Parts<'_, D> {
        Parts {
            device: &self.device,
            queues: &self.queues,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            last_error: self.last_error.as_ref(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn from_parts(
        device: D,
        mem: GuestMem,
        events: Arc<GuestEvents>,
        queues: Vec<Queue>,
        sels: [u32; 3],
        driver_features: u64,
        regs3: [u32; 3],
        activated: bool,
        last_error: Option<DeviceError>,
    ) -> Self {
        MmioTransport {
            device,
            mem,
            events,
            queues,
            queue_sel: sels[0],
            device_features_sel: sels[1],
            driver_features_sel: sels[2],
            driver_features,
            status: regs3[0],
            interrupt_status: regs3[1],
            config_generation: regs3[2],
            activated,
            last_error,
        }
    }

    /// Wraps `device`; `events` is signalled whenever the guest should look at its queues.
    pub fn new(device: D, mem: GuestMem, events: Arc<GuestEvents>) -> Self {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            events,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            last_error: None,
        }
    }

    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&m| Queue::new(m).ok())
            .collect()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Runs `f` on the device outside of queue processing (wiring, counters).
    pub fn with_device_unchecked<R>(&mut self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.device)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The error that froze the device, if any.
    pub fn last_error(&self) -> Option<&DeviceError> {
        self.last_error.as_ref()
    }

    /// True once the driver set DRIVER_OK and the device has not failed.
    pub fn is_active(&self) -> bool {
        self.activated && self.status & status::NEEDS_RESET == 0
    }

    /// Runs `f` on the device with its queues (for device threads such as network RX), then
    /// raises the used-buffer interrupt if `f` used any buffer, or freezes the device on error.
    pub fn with_device<F>(&mut self, f: F) -> Result<bool, DeviceError>
    where
        F: FnOnce(&mut D, &mut [Queue], &GuestMem) -> Result<bool, DeviceError>,
    {
        if !self.is_active() {
            return Ok(false);
        }
        let r = f(&mut self.device, &mut self.queues, &self.mem);
        self.after_processing(r)
    }

    fn after_processing(&mut self, r: Result<bool, DeviceError>) -> Result<bool, DeviceError> {
        match r {
            Ok(true) => {
                self.interrupt_status |= INT_VRING;
                self.events.signal();
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                tracing::error!(
                    "virtio device type {}: {e}; device needs reset",
                    self.device.device_type()
                );
                self.status |= status::NEEDS_RESET;
                self.interrupt_status |= INT_CONFIG;
                self.last_error = Some(e.clone());
                self.events.signal();
                Err(e)
            }
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.is_active() || index as usize >= self.queues.len() {
            return;
        }
        let r = self
            .device
            .process_queue(index as u16, &mut self.queues, &self.mem);
        let _ = self.after_processing(r);
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(&self.device);
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.activated = false;
        self.last_error = None;
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & !status::NEEDS_RESET;
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok =
                self.driver_features & !offered == 0 && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                tracing::warn!(
                    "virtio: driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                v &= !status::FEATURES_OK;
            }
        }
        if v & status::DRIVER_OK != 0 && !self.activated {
            if v & status::FEATURES_OK == 0 {
                tracing::warn!("virtio: DRIVER_OK without FEATURES_OK");
                v |= status::FAILED;
            } else if let Some(i) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.mem))
            {
                let e = DeviceError::Queue {
                    queue: i as u16,
                    why: "ring addresses are outside guest memory or misaligned".into(),
                };
                self.status = v;
                let _ = self.after_processing(Err(e));
                return;
            } else {
                self.activated = true;
                self.device.activate();
            }
        }
        self.status = v | (self.status & status::NEEDS_RESET);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the driver is running.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC => MMIO_MAGIC,
            regs::VERSION => 2,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => self.interrupt_status,
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            regs::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            regs::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            regs::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            regs::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            regs::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            regs::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            regs::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => self.interrupt_status &= !v,
            regs::STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write to read-only/unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
        } else if data.len() == 4 {
            put_le_value(data, u64::from(self.read_reg(offset)));
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            // Neither device has writable config fields.
            return;
        }
        if data.len() == 4 {
            self.write_reg(offset, le_value(data) as u32);
        }
    }
}
