//! virtio-net state: MAC, counters, whether the device was waiting for receive buffers, and
//! the guest's TCP connections (for the nudge after a restore, see `tcp_peers.rs`).
//! The tap is a host resource and comes back through `Args` (possibly a different tap).

use serde::{Deserialize, Serialize};

use super::device::{Net, NetBackend, NetStats};
use super::tcp_peers::TcpPeers;
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
    /// The guest's TCP connections as of the capture.
    pub tcp_peers: TcpPeers,
}

impl<B: NetBackend> Persist for Net<B> {
    type State = NetPersist;
    type Args = B;

    fn save(&self) -> NetPersist {
        NetPersist {
            mac: self.mac(),
            stats: self.stats(),
            rx_has_buffers: self.rx_has_buffers(),
            tcp_peers: self.tcp_peers().clone(),
        }
    }

    fn restore(backend: B, st: &NetPersist) -> Result<Self, RestoreError> {
        if st.mac[0] & 1 != 0 {
            return Err(RestoreError::new("virtio-net", "multicast MAC address"));
        }
        st.tcp_peers
            .validate()
            .map_err(|why| RestoreError::new("virtio-net", why))?;
        let mut n = Net::new(backend, st.mac);
        n.restore_counters(st.stats, st.rx_has_buffers);
        n.restore_peers(st.tcp_peers.clone());
        Ok(n)
    }
}
