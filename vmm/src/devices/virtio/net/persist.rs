//! virtio-net state: MAC, counters and whether the device was waiting for receive buffers.
//! The tap is a host resource and comes back through `Args` (possibly a different tap).

use serde::{Deserialize, Serialize};

use super::device::{Net, NetBackend, NetStats};
use crate::persist::{Persist, RestoreError};

/// Saved network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPersist {
    /// MAC address.
    pub mac: [u8; 6],
    /// Counters.
    pub stats: NetStats,
    /// Receive buffers were available at capture.
    pub rx_has_buffers: bool,
}

impl<B: NetBackend> Persist for Net<B> {
    type State = NetPersist;
    type Args = B;

    fn save(&self) -> NetPersist {
        NetPersist {
            mac: self.mac(),
            stats: self.stats(),
            rx_has_buffers: self.rx_has_buffers(),
        }
    }

    fn restore(backend: B, st: &NetPersist) -> Result<Self, RestoreError> {
        if st.mac[0] & 1 != 0 {
            return Err(RestoreError::new("virtio-net", "multicast MAC address"));
        }
        let mut n = Net::new(backend, st.mac);
        n.restore_counters(st.stats, st.rx_has_buffers);
        Ok(n)
    }
}
