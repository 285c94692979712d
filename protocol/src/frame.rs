//! Framing: every message travels as one frame.
//!
//! ```text
//! 0..4   magic "VMXR"
//! 4      frame version (FRAME_VERSION)
//! 5      message type
//! 6..8   reserved, zero
//! 8..12  payload length, u32 LE, at most MAX_PAYLOAD
//! 12..   payload (postcard encoding of the message body)
//! ..+4   CRC32 of header and payload, u32 LE
//! ```
//! [`FrameReader`] cuts a byte stream (a QUIC stream) into frames, refusing oversize lengths
//! before buffering them.

use crate::error::ProtocolError;

/// Magic at the start of every frame.
pub const MAGIC: [u8; 4] = *b"VMXR";
/// Version of the frame layout itself.
pub const FRAME_VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 12;
/// Trailer (CRC) length.
pub const TRAILER_LEN: usize = 4;
/// Largest payload of one frame: a page batch of 256 raw pages plus its run list.
pub const MAX_PAYLOAD: usize = 1 << 20 | 64 << 10;

/// Builds a frame around `payload`.
pub fn encode(msg_type: u8, payload: &[u8]) -> Vec<u8> {
    encode_with_crc(msg_type, payload).0
}

/// Builds a frame and also returns its CRC (over header and payload) and that length, which
/// checkpoints combine into their end-to-end CRC without hashing the data again.
pub fn encode_with_crc(msg_type: u8, payload: &[u8]) -> (Vec<u8>, u32, u64) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    f.extend_from_slice(&MAGIC);
    f.push(FRAME_VERSION);
    f.push(msg_type);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    let covered = f.len() as u64;
    f.extend_from_slice(&crc.to_le_bytes());
    (f, crc, covered)
}

/// Checks a header; returns the message type and the payload length.
fn check_header(h: &[u8]) -> Result<(u8, usize), ProtocolError> {
    if h.len() < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            need: HEADER_LEN,
            have: h.len(),
        });
    }
    if h[0..4] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    if h[4] != FRAME_VERSION {
        return Err(ProtocolError::FrameVersion(h[4]));
    }
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(ProtocolError::Reserved(reserved));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Oversize {
            len: len as u64,
            max: MAX_PAYLOAD as u64,
        });
    }
    Ok((h[5], len))
}

/// Serializes `value` (postcard) straight into a new frame: no intermediate payload buffer.
/// `size_hint` is the expected payload length (the frame is allocated once when it is right).
/// Returns the frame, its CRC and the length the CRC covers.
pub fn encode_value<T: serde::Serialize>(
    msg_type: u8,
    value: &T,
    size_hint: usize,
) -> (Vec<u8>, u32, u64) {
    let mut f = Vec::with_capacity(HEADER_LEN + size_hint.min(MAX_PAYLOAD) + TRAILER_LEN);
    f.extend_from_slice(&MAGIC);
    f.push(FRAME_VERSION);
    f.push(msg_type);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    // Serializing plain data into a Vec cannot fail.
    let mut f = postcard::serialize_with_flavor(value, VecFlavor(f)).unwrap_or_default();
    let len = f.len().saturating_sub(HEADER_LEN) as u32;
    if f.len() < HEADER_LEN {
        f.resize(HEADER_LEN, 0);
    }
    f[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&f);
    let covered = f.len() as u64;
    f.extend_from_slice(&crc.to_le_bytes());
    (f, crc, covered)
}

/// Postcard output into a `Vec`, copying byte strings with one `memcpy` (postcard's own
/// `Extend` flavor copies them byte by byte).
struct VecFlavor(Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Decodes one complete frame (exactly one, no trailing bytes); returns type and payload.
pub fn decode(frame: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    decode_with_crc(frame).map(|(t, p, _)| (t, p))
}

/// Like [`decode`], also returning the verified CRC of header and payload.
pub fn decode_with_crc(frame: &[u8]) -> Result<(u8, &[u8], u32), ProtocolError> {
    let (t, len) = check_header(frame)?;
    let total = HEADER_LEN + len + TRAILER_LEN;
    if frame.len() < total {
        return Err(ProtocolError::Truncated {
            need: total,
            have: frame.len(),
        });
    }
    if frame.len() > total {
        return Err(ProtocolError::Malformed {
            kind: "frame",
            why: format!("{} bytes after the frame", frame.len() - total),
        });
    }
    let body_end = HEADER_LEN + len;
    let stored = u32::from_le_bytes([
        frame[body_end],
        frame[body_end + 1],
        frame[body_end + 2],
        frame[body_end + 3],
    ]);
    let computed = crc32fast::hash(&frame[..body_end]);
    if stored != computed {
        return Err(ProtocolError::FrameCrc { stored, computed });
    }
    Ok((t, &frame[HEADER_LEN..body_end], computed))
}

/// Incremental reader of frames from a byte stream.
///
/// Every byte is copied once, from the received chunk into the frame it belongs to: once a
/// frame's header is in (and checked), its buffer is allocated at its whole length.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// The frame being filled (its capacity is its whole length once the header is known).
    cur: Vec<u8>,
    /// Its whole length, once its header has been checked.
    total: Option<usize>,
    /// Complete frames not yet returned.
    ready: std::collections::VecDeque<Vec<u8>>,
    /// A bad header: returned after the frames before it; nothing after it is read.
    failed: Option<ProtocolError>,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        FrameReader::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.failed.is_none() {
            let want = match self.total {
                Some(t) => t,
                None => HEADER_LEN,
            } - self.cur.len();
            let n = want.min(bytes.len());
            if self.cur.capacity() == 0 {
                self.cur.reserve_exact(HEADER_LEN);
            }
            self.cur.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if n < want {
                return;
            }
            match self.total {
                Some(_) => {
                    self.total = None;
                    self.ready.push_back(std::mem::take(&mut self.cur));
                }
                None => match check_header(&self.cur) {
                    Ok((_, len)) => {
                        let total = HEADER_LEN + len + TRAILER_LEN;
                        self.cur.reserve_exact(total - HEADER_LEN);
                        self.total = Some(total);
                    }
                    Err(e) => self.failed = Some(e),
                },
            }
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.cur.len() + self.ready.iter().map(Vec::len).sum::<usize>()
    }

    /// The next complete frame, if buffered. A bad header is an error at once (the length is
    /// not trusted); the CRC is checked later by [`decode`].
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if let Some(f) = self.ready.pop_front() {
            return Ok(Some(f));
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let f = encode(7, b"hello world");
        assert_eq!(decode(&f).unwrap(), (7, &b"hello world"[..]));
        for cut in 0..f.len() {
            assert!(decode(&f[..cut]).is_err());
        }
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut c = f.clone();
                c[i] ^= 1 << bit;
                assert!(decode(&c).is_err(), "flip {bit} of byte {i} accepted");
            }
        }
    }

    #[test]
    fn reader_splits_a_stream_and_refuses_huge_lengths_early() {
        let mut r = FrameReader::new();
        let a = encode(1, b"a");
        let b = encode(2, &[9u8; 1000]);
        let mut s = a.clone();
        s.extend_from_slice(&b);
        for chunk in s.chunks(7) {
            r.push(chunk);
        }
        assert_eq!(r.next_frame().unwrap().unwrap(), a);
        assert_eq!(r.next_frame().unwrap().unwrap(), b);
        assert_eq!(r.next_frame().unwrap(), None);
        let mut huge = encode(1, b"x");
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        r.push(&huge[..HEADER_LEN]);
        assert!(matches!(
            r.next_frame(),
            Err(ProtocolError::Oversize { .. })
        ));
    }

    #[test]
    fn reader_gives_the_same_frames_at_every_chunking_and_the_frames_before_a_bad_header() {
        let frames: Vec<Vec<u8>> = [0usize, 1, 11, 12, 13, 4096, 70_000]
            .iter()
            .enumerate()
            .map(|(i, &n)| encode(i as u8, &vec![i as u8 ^ 0x5a; n]))
            .collect();
        let stream = frames.concat();
        for size in [
            1,
            2,
            3,
            11,
            12,
            13,
            16,
            4095,
            1452,
            6500,
            65_536,
            stream.len(),
        ] {
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                r.push(chunk);
                while let Some(f) = r.next_frame().unwrap() {
                    assert!(f.capacity() < f.len() + 16, "one allocation per frame");
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "chunks of {size}");
            assert_eq!(r.buffered(), 0);
        }
        let mut bad = frames[..2].concat();
        bad.extend_from_slice(b"XXXXXXXXXXXXXXXXXXXX");
        bad.extend_from_slice(&frames[2]);
        let mut r = FrameReader::new();
        r.push(&bad);
        assert_eq!(r.next_frame().unwrap().unwrap(), frames[0]);
        assert_eq!(r.next_frame().unwrap().unwrap(), frames[1]);
        assert!(matches!(r.next_frame(), Err(ProtocolError::BadMagic)));
        assert!(r.next_frame().is_err(), "the error stays");
        r.push(&frames[3]);
        assert!(
            r.next_frame().is_err(),
            "nothing is read after a bad header"
        );
    }
}
