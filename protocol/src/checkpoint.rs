//! A checkpoint as data, its split into frames (`Begin`, parts, `End`), and the end-to-end
//! CRC: CRC32 over the part frames (header and payload, without their CRC trailers) in seq
//! order. Each frame's own CRC already covers exactly those bytes, so sender and receiver combine
//! the per-frame CRCs instead of hashing the data a second time; parts may arrive in any order
//! over several streams.

use serde::Serialize;

use crate::frame;
use crate::message::{Begin, Disk, End, Kind, Message, PartId, State, MAX_BATCH_PAGES, MAX_CHUNK};
use crate::page::PageData;

/// Payload budget of one page batch (keeps frames under the frame limit).
const BATCH_BYTES: usize = 1 << 20;

/// Everything one checkpoint carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Checkpoint number.
    pub epoch: u64,
    /// Sync or incremental.
    pub kind: Kind,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Encoded pages, by guest frame number (ascending, unique).
    pub pages: Vec<(u64, PageData)>,
    /// Disk writes of the epoch, in order.
    pub disk: Vec<(u64, Vec<u8>)>,
    /// State format version and bytes.
    pub state: Option<(u32, Vec<u8>)>,
}

impl Checkpoint {
    /// Payload bytes the checkpoint puts on the wire (pages, disk and state data).
    pub fn data_bytes(&self) -> u64 {
        let p: usize = self.pages.iter().map(|(_, d)| d.wire_len()).sum();
        let d: usize = self.disk.iter().map(|(_, b)| b.len()).sum();
        (p + d + self.state.as_ref().map_or(0, |s| s.1.len())) as u64
    }
}

/// CRC of a part frame (header and payload) with the length it covers, to be combined in seq
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartCrc {
    /// CRC32 of the frame's header and payload.
    pub crc: u32,
    /// Bytes covered.
    pub len: u64,
}

impl PartCrc {
    /// Of arbitrary bytes.
    pub fn of(bytes: &[u8]) -> Self {
        PartCrc {
            crc: crc32fast::hash(bytes),
            len: bytes.len() as u64,
        }
    }
}

/// A page batch serialized straight from the checkpoint, without copying page data: the same
/// serde layout as [`crate::message::Pages`].
#[derive(Serialize)]
struct PagesRef<'a> {
    id: PartId,
    runs: Vec<(u64, u32)>,
    pages: Vec<&'a PageData>,
}

/// CRC32 of the concatenation of parts, from their individual CRCs.
pub fn combine(parts: impl IntoIterator<Item = PartCrc>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.combine(&crc32fast::Hasher::new_with_initial_len(p.crc, p.len));
    }
    h.finalize()
}

/// Groups ascending gfns into (first, count) runs.
fn runs(gfns: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &g in gfns {
        match out.last_mut() {
            Some((f, c)) if *f + u64::from(*c) == g => *c += 1,
            _ => out.push((g, 1)),
        }
    }
    out
}

/// Encodes a checkpoint as frames: `Begin`, the parts, `End`. Page data is serialized once,
/// straight from `cp`, and hashed once (by the frame CRC).
pub fn encode_frames(term: u64, attempt: u32, cp: &Checkpoint) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut crcs: Vec<PartCrc> = Vec::new();
    let id = |seq: usize| PartId {
        term,
        epoch: cp.epoch,
        attempt,
        seq: seq as u32,
    };
    let push = |t: u8, p: Vec<u8>, parts: &mut Vec<Vec<u8>>, crcs: &mut Vec<PartCrc>| {
        let (f, crc, len) = frame::encode_with_crc(t, &p);
        crcs.push(PartCrc { crc, len });
        parts.push(f);
    };
    let mut i = 0;
    while i < cp.pages.len() {
        let mut j = i;
        let mut bytes = 0;
        while j < cp.pages.len()
            && j - i < MAX_BATCH_PAGES
            && bytes + cp.pages[j].1.wire_len() + 16 <= BATCH_BYTES
        {
            bytes += cp.pages[j].1.wire_len() + 16;
            j += 1;
        }
        let gfns: Vec<u64> = cp.pages[i..j].iter().map(|p| p.0).collect();
        let batch = PagesRef {
            id: id(parts.len()),
            runs: runs(&gfns),
            pages: cp.pages[i..j].iter().map(|p| &p.1).collect(),
        };
        let hint = bytes + 24 * batch.runs.len() + 64;
        let (f, crc, len) = frame::encode_value(4, &batch, hint);
        crcs.push(PartCrc { crc, len });
        parts.push(f);
        i = j;
    }
    for (offset, data) in &cp.disk {
        for (k, chunk) in data.chunks(MAX_CHUNK).enumerate() {
            let d = Message::Disk(Disk {
                id: id(parts.len()),
                offset: offset + (k * MAX_CHUNK) as u64,
                data: chunk.to_vec(),
            });
            push(5, d.payload(), &mut parts, &mut crcs);
        }
    }
    if let Some((format, data)) = &cp.state {
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[][..]]
        } else {
            data.chunks(MAX_CHUNK).collect()
        };
        for chunk in chunks {
            let st = Message::State(State {
                id: id(parts.len()),
                format: *format,
                data: chunk.to_vec(),
            });
            push(6, st.payload(), &mut parts, &mut crcs);
        }
    }
    let crc = combine(crcs);
    let mut out = Vec::with_capacity(parts.len() + 2);
    out.push(
        Message::Begin(Begin {
            term,
            epoch: cp.epoch,
            attempt,
            kind: cp.kind,
            parts: parts.len() as u32,
            mem_size: cp.mem_size,
        })
        .encode(),
    );
    out.extend(parts);
    out.push(
        Message::End(End {
            term,
            epoch: cp.epoch,
            attempt,
            crc,
        })
        .encode(),
    );
    out
}

/// The same checkpoint as decoded messages (tests and tools).
pub fn to_messages(term: u64, attempt: u32, cp: &Checkpoint) -> Vec<Message> {
    encode_frames(term, attempt, cp)
        .iter()
        .filter_map(|f| Message::decode(f).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_crc_equals_crc_of_concatenation() {
        let a = b"first part".to_vec();
        let b = vec![7u8; 5000];
        let mut all = a.clone();
        all.extend_from_slice(&b);
        assert_eq!(
            combine([PartCrc::of(&a), PartCrc::of(&b)]),
            crc32fast::hash(&all)
        );
        assert_eq!(combine([]), crc32fast::hash(&[]));
    }

    #[test]
    fn splits_into_bounded_parts() {
        let cp = Checkpoint {
            epoch: 3,
            kind: Kind::Incremental,
            mem_size: 1 << 30,
            pages: (0..600)
                .map(|g| (g * 2, PageData::Raw(vec![1; 4096])))
                .collect(),
            disk: vec![(512, vec![2; 3 << 20])],
            state: Some((1, vec![3; 100])),
        };
        let m = to_messages(1, 0, &cp);
        assert!(
            matches!(m[0], Message::Begin(Begin { parts, .. }) if parts as usize == m.len() - 2)
        );
        assert!(matches!(m.last(), Some(Message::End(_))));
        for msg in &m {
            assert!(msg.encode().len() <= crate::frame::MAX_PAYLOAD + 16);
            assert_eq!(Message::decode(&msg.encode()).unwrap(), *msg);
        }
    }
}
