//! Persistence of the virtio-mmio transport: negotiated features, status, interrupt status and
//! every queue's addresses and indices, wrapped around the device's own state.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::MmioTransport;
use super::{DeviceError, VirtioDevice};
use crate::events::GuestEvents;
use crate::memory::GuestMem;
use crate::persist::{Persist, RestoreError};

/// One virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePersist {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Size chosen by the driver.
    pub size: u16,
    /// Driver marked the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueuePersist {
    fn from(q: QueueState) -> Self {
        QueuePersist {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueuePersist> for QueueState {
    fn from(q: &QueuePersist) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// Transport plus device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportPersist<S> {
    /// The device's own state.
    pub device: S,
    /// Queues in device order.
    pub queues: Vec<QueuePersist>,
    /// QueueSel register.
    pub queue_sel: u32,
    /// DeviceFeaturesSel register.
    pub device_features_sel: u32,
    /// DriverFeaturesSel register.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Status register.
    pub status: u32,
    /// InterruptStatus register.
    pub interrupt_status: u32,
    /// ConfigGeneration register.
    pub config_generation: u32,
    /// DRIVER_OK processed.
    pub activated: bool,
    /// Why the device is frozen, if it is.
    pub frozen: Option<String>,
}

/// Host resources of a restored transport.
pub struct TransportArgs<A> {
    /// The device's own resources.
    pub device: A,
    /// Guest memory of the new VM.
    pub mem: GuestMem,
    /// Event counter of the new VM.
    pub events: Arc<GuestEvents>,
}

impl<D> Persist for MmioTransport<D>
where
    D: VirtioDevice + Persist,
{
    type State = TransportPersist<D::State>;
    type Args = TransportArgs<D::Args>;

    fn save(&self) -> Self::State {
        let p = self.parts();
        TransportPersist {
            device: p.device.save(),
            queues: p
                .queues
                .iter()
                .map(|q| QueuePersist::from(q.state()))
                .collect(),
            queue_sel: p.queue_sel,
            device_features_sel: p.device_features_sel,
            driver_features_sel: p.driver_features_sel,
            driver_features: p.driver_features,
            status: p.status,
            interrupt_status: p.interrupt_status,
            config_generation: p.config_generation,
            activated: p.activated,
            frozen: p.last_error.map(|e| e.to_string()),
        }
    }

    fn restore(a: Self::Args, st: &Self::State) -> Result<Self, RestoreError> {
        let device = D::restore(a.device, &st.device)?;
        if st.queues.len() != device.queue_max_sizes().len() {
            return Err(RestoreError::new(
                "virtio transport",
                format!(
                    "{} queues saved, device has {}",
                    st.queues.len(),
                    device.queue_max_sizes().len()
                ),
            ));
        }
        let mut queues = Vec::with_capacity(st.queues.len());
        for (i, q) in st.queues.iter().enumerate() {
            let queue = Queue::try_from(QueueState::from(q))
                .map_err(|e| RestoreError::new("virtio transport", format!("queue {i}: {e}")))?;
            if st.activated && queue.ready() && !queue.is_valid(&a.mem) {
                return Err(RestoreError::new(
                    "virtio transport",
                    format!("queue {i}: rings outside guest memory"),
                ));
            }
            queues.push(queue);
        }
        Ok(MmioTransport::from_parts(
            device,
            a.mem,
            a.events,
            queues,
            [st.queue_sel, st.device_features_sel, st.driver_features_sel],
            st.driver_features,
            [st.status, st.interrupt_status, st.config_generation],
            st.activated,
            st.frozen.clone().map(|why| DeviceError::Frozen { why }),
        ))
    }
}
