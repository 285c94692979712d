//! The guest's TCP peers, learnt from the frames it sends, so that a VM resumed from a
//! checkpoint in a new VMM (failover, planned migration, restore) makes its clients retransmit
//! at once instead of after their retransmission timeout.
//!
//! The problem: a request a client sent while the old primary was dying (or paused for a
//! handover) is lost with it. The client retransmits only when its RTO fires: 200 ms at the
//! least on Linux, doubled at every further miss, so a failover of 100 ms looked like 400-900 ms
//! to clients. FT-TCP's remedy is to keep the connection's state outside the failed host; ours
//! works for any guest and needs nothing from it:
//!
//! - Every TCP segment the guest transmits updates a small table keyed by the connection's four
//!   addresses: the next sequence number the guest will send, the last acknowledgement and
//!   window it sent, and the Ethernet header. The table is device state: it is captured in the
//!   same pause as guest memory, so it always matches the guest's TCP state in that checkpoint.
//! - When the VM starts from a checkpoint, [`TcpPeers::nudge_frames`] makes [`NUDGE_COPIES`]
//!   pure ACKs per connection from it, exactly what the guest last said. A client with data in
//!   flight counts them as duplicate ACKs and fast-retransmits its lost segment (RFC 5681, 3.2).
//!   They carry nothing the committed checkpoint does not hold, so they need no output commit.
//! - Fast retransmit on duplicate ACKs needs a connection without SACK (with SACK, Linux waits
//!   for SACK blocks that a lost request can never produce). So the SACK-permitted option is
//!   turned into two no-ops in every SYN the guest receives (its checksum fixed): the guest's
//!   connections do not negotiate SACK. For a request/response service this costs nothing; for
//!   bulk transfers over lossy links it is a trade-off, stated in docs/failover.md.
//! - A connection leaves the table when either side sends FIN or RST or a new SYN reuses its
//!   addresses; at most [`MAX_PEERS`] are kept, the least recently used dropped first.
//!
//! Every frame is parsed defensively (lengths, versions, fragments): anything that is not a
//! well-formed unfragmented IPv4 TCP segment is left alone and passed through unchanged.

use serde::{Deserialize, Serialize};

/// Connections tracked at most.
pub const MAX_PEERS: usize = 256;
/// Pure ACKs sent per connection on a nudge: three duplicates trigger fast retransmit, and the
/// first may count as a window update if the client never saw the guest's last frame.
pub const NUDGE_COPIES: usize = 4;

const ETH: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const PROTO_TCP: u8 = 6;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK_PERMITTED: u8 = 4;

/// One connection of the guest: what its next pure ACK looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Ethernet header of the guest's last segment (destination, source, type).
    pub eth: [u8; ETH],
    /// The guest's address and port.
    pub local: ([u8; 4], u16),
    /// The peer's address and port.
    pub remote: ([u8; 4], u16),
    /// Next sequence number the guest sends.
    pub seq: u32,
    /// Last acknowledgement number the guest sent.
    pub ack: u32,
    /// Last window the guest advertised (as on the wire, unscaled).
    pub window: u16,
    /// Recency, for eviction.
    pub used: u64,
}

/// The table of connections (device state of the virtio-net device).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpPeers {
    peers: Vec<Peer>,
    clock: u64,
}

/// The fields of a TCP segment that matter here, with offsets into its frame.
struct Segment {
    tcp: usize,
    tcp_len: usize,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// Parses an unfragmented IPv4 TCP segment in an Ethernet frame; `None` for anything else.
fn parse(f: &[u8]) -> Option<Segment> {
    if f.len() < ETH + 20 || f[12..14] != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = ETH;
    let (version, ihl) = (f[ip] >> 4, usize::from(f[ip] & 0x0f) * 4);
    let total = usize::from(be16(f, ip + 2));
    let fragmented = be16(f, ip + 6) & 0x3fff != 0;
    if version != 4 || ihl < 20 || f[ip + 9] != PROTO_TCP || fragmented {
        return None;
    }
    if total < ihl + 20 || ip + total > f.len() {
        return None;
    }
    let tcp = ip + ihl;
    let doff = usize::from(f[tcp + 12] >> 4) * 4;
    let tcp_len = total - ihl;
    if doff < 20 || doff > tcp_len {
        return None;
    }
    Some(Segment {
        tcp,
        tcp_len,
        src: addr(f, ip + 12),
        dst: addr(f, ip + 16),
        sport: be16(f, tcp),
        dport: be16(f, tcp + 2),
        seq: be32(f, tcp + 4),
        ack: be32(f, tcp + 8),
        flags: f[tcp + 13],
        window: be16(f, tcp + 14),
        payload: tcp_len - doff,
    })
}

/// Adds `data` to a ones' complement sum (RFC 1071).
fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The TCP checksum of `segment` (header with its checksum field zeroed, and payload).
fn tcp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut acc = sum(0, &src);
    acc = sum(acc, &dst);
    acc += u32::from(PROTO_TCP) + segment.len() as u32;
    fold(sum(acc, segment))
}

/// Rewrites the TCP checksum of the segment at `s` in `f`.
fn fix_tcp_checksum(f: &mut [u8], s: &Segment) {
    let seg = s.tcp..s.tcp + s.tcp_len;
    f[s.tcp + 16..s.tcp + 18].fill(0);
    let c = tcp_checksum(s.src, s.dst, &f[seg]);
    f[s.tcp + 16..s.tcp + 18].copy_from_slice(&c.to_be_bytes());
}

/// Turns every SACK-permitted option of the segment into two no-ops. Returns true if it did.
fn strip_sack_permitted(f: &mut [u8], s: &Segment) -> bool {
    let end = s.tcp + usize::from(f[s.tcp + 12] >> 4) * 4;
    let mut i = s.tcp + 20;
    let mut changed = false;
    while i < end {
        match f[i] {
            OPT_END => break,
            OPT_NOP => i += 1,
            kind => {
                let Some(&len) = f.get(i + 1).filter(|_| i + 1 < end) else {
                    break;
                };
                let len = usize::from(len);
                if len < 2 || i + len > end {
                    break;
                }
                if kind == OPT_SACK_PERMITTED && len == 2 {
                    f[i] = OPT_NOP;
                    f[i + 1] = OPT_NOP;
                    changed = true;
                }
                i += len;
            }
        }
    }
    if changed {
        fix_tcp_checksum(f, s);
    }
    changed
}

impl TcpPeers {
    /// Connections tracked.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True if no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The tracked connections.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Forgets every connection (a clone must never speak for its parent's connections).
    pub fn clear(&mut self) {
        self.peers.clear();
    }

    /// Checks a table read from a snapshot or a checkpoint (untrusted bytes).
    pub fn validate(&self) -> Result<(), String> {
        if self.peers.len() > MAX_PEERS {
            return Err(format!(
                "{} TCP peers (at most {MAX_PEERS})",
                self.peers.len()
            ));
        }
        Ok(())
    }

    fn position(&self, local: ([u8; 4], u16), remote: ([u8; 4], u16)) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| p.local == local && p.remote == remote)
    }

    fn remove(&mut self, local: ([u8; 4], u16), remote: ([u8; 4], u16)) {
        if let Some(i) = self.position(local, remote) {
            self.peers.swap_remove(i);
        }
    }

    /// Learns from a frame the guest transmits.
    pub fn observe_tx(&mut self, f: &[u8]) {
        let Some(s) = parse(f) else { return };
        let (local, remote) = ((s.src, s.sport), (s.dst, s.dport));
        if s.flags & (FIN | RST) != 0 {
            self.remove(local, remote);
            return;
        }
        if s.flags & ACK == 0 {
            return;
        }
        self.clock += 1;
        let syn = u32::from(s.flags & SYN != 0);
        let peer = Peer {
            eth: f[..ETH].try_into().expect("parse checked the length"),
            local,
            remote,
            seq: s.seq.wrapping_add(s.payload as u32).wrapping_add(syn),
            ack: s.ack,
            window: s.window,
            used: self.clock,
        };
        match self.position(local, remote) {
            Some(i) => self.peers[i] = peer,
            None => {
                if self.peers.len() >= MAX_PEERS {
                    if let Some(oldest) = (0..self.peers.len()).min_by_key(|&i| self.peers[i].used)
                    {
                        self.peers.swap_remove(oldest);
                    }
                }
                self.peers.push(peer);
            }
        }
    }

    /// Looks at a frame on its way into the guest: an RST or a new SYN ends the connection's
    /// entry, and a SYN loses its SACK-permitted option. Returns true if the frame was changed.
    pub fn observe_rx(&mut self, f: &mut [u8]) -> bool {
        let Some(s) = parse(f) else { return false };
        let (local, remote) = ((s.dst, s.dport), (s.src, s.sport));
        if s.flags & (RST | SYN) != 0 {
            self.remove(local, remote);
        }
        s.flags & SYN != 0 && strip_sack_permitted(f, &s)
    }

    /// One pure ACK per tracked connection, as the guest last sent it (send each
    /// [`NUDGE_COPIES`] times).
    pub fn nudge_frames(&self) -> Vec<Vec<u8>> {
        self.peers.iter().map(ack_frame).collect()
    }
}

/// A 54-byte Ethernet frame: IPv4 (no options, DF) and TCP (no options, ACK only).
fn ack_frame(p: &Peer) -> Vec<u8> {
    let mut f = vec![0u8; ETH + 40];
    f[..ETH].copy_from_slice(&p.eth);
    f[12..14].copy_from_slice(&ETHERTYPE_IPV4);
    let ip = ETH;
    f[ip..ip + 12].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    f[ip + 12..ip + 16].copy_from_slice(&p.local.0);
    f[ip + 16..ip + 20].copy_from_slice(&p.remote.0);
    let c = fold(sum(0, &f[ip..ip + 20]));
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let t = ip + 20;
    f[t..t + 2].copy_from_slice(&p.local.1.to_be_bytes());
    f[t + 2..t + 4].copy_from_slice(&p.remote.1.to_be_bytes());
    f[t + 4..t + 8].copy_from_slice(&p.seq.to_be_bytes());
    f[t + 8..t + 12].copy_from_slice(&p.ack.to_be_bytes());
    f[t + 12] = 5 << 4;
    f[t + 13] = ACK;
    f[t + 14..t + 16].copy_from_slice(&p.window.to_be_bytes());
    let c = tcp_checksum(p.local.0, p.remote.0, &f[t..t + 20]);
    f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    f
}

#[cfg(test)]
#[path = "tcp_peers_tests.rs"]
mod tests;
