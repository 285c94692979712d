//! Framing of `snapshot.bin` and the typed errors of every snapshot part.
//!
//! ```text
//! 0   magic    8 bytes  "VMXSNAP\0"
//! 8   version  u32 LE   FORMAT_VERSION (only this version is read; see docs/snapshot.md)
//! 12  body_len u64 LE   at most MAX_META_LEN
//! 20  body     postcard encoding of SnapshotMeta
//! ..  crc32    u32 LE   over every byte before it
//! ```

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// File magic.
pub const MAGIC: &[u8; 8] = b"VMXSNAP\0";
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;
/// Largest metadata body accepted (a 3 GiB diff lists at most 786k pages: 6 MiB).
pub const MAX_META_LEN: u64 = 64 << 20;
const HEADER_LEN: usize = 20;

/// Which file of a snapshot an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `snapshot.bin`.
    Meta,
    /// `memory.bin`.
    Memory,
    /// `disk.img`.
    Disk,
    /// `disk.delta`.
    DiskDelta,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Meta => "snapshot.bin",
            Part::Memory => "memory.bin",
            Part::Disk => "disk.img",
            Part::DiskDelta => "disk.delta",
        })
    }
}

/// Why a snapshot cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system error.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// A part is missing.
    #[error("{part} is missing in {dir}: not a complete snapshot")]
    Missing {
        /// The part.
        part: Part,
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// A part is shorter than it says.
    #[error("{part} is truncated: {got} bytes, expected {expected}")]
    Truncated {
        /// The part.
        part: Part,
        /// Expected length.
        expected: u64,
        /// Actual length.
        got: u64,
    },
    /// Not a vmatrix snapshot.
    #[error("{part} has a bad magic: not a vmatrix snapshot")]
    BadMagic {
        /// The part.
        part: Part,
    },
    /// A format version this build does not read.
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    Version {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A length field beyond the limits.
    #[error("{part}: length {len} exceeds the limit {max}")]
    TooLarge {
        /// The part.
        part: Part,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Checksum mismatch.
    #[error("{part} is corrupt: CRC32 {computed:#010x} does not match the stored {stored:#010x}")]
    Crc {
        /// The part.
        part: Part,
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The body does not decode, or its contents are inconsistent.
    #[error("{part} is invalid: {why}")]
    Invalid {
        /// The part.
        part: Part,
        /// What is wrong.
        why: String,
    },
    /// A diff chain that does not link up.
    #[error("snapshot chain is broken: {0}")]
    Chain(String),
    /// Taking a snapshot failed in the VMM.
    #[error("cannot take snapshot: {0}")]
    Capture(String),
    /// A device state does not fit its device.
    #[error(transparent)]
    Restore(#[from] crate::persist::RestoreError),
}

impl SnapshotError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.into();
        move |err| SnapshotError::Io { path, err }
    }
}

/// Encodes `meta` with header and CRC.
pub fn encode<T: Serialize>(meta: &T) -> Result<Vec<u8>, SnapshotError> {
    let body = postcard::to_stdvec(meta).map_err(|e| SnapshotError::Invalid {
        part: Part::Meta,
        why: format!("encoding: {e}"),
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks header, limits and CRC, then decodes the body. Never panics on any input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    let part = Part::Meta;
    if bytes.len() < 8 {
        return Err(SnapshotError::Truncated {
            part,
            expected: HEADER_LEN as u64 + 4,
            got: bytes.len() as u64,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic { part });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            part,
            expected: HEADER_LEN as u64 + 4,
            got: bytes.len() as u64,
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut lb = [0u8; 8];
    lb.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(lb);
    if len > MAX_META_LEN {
        return Err(SnapshotError::TooLarge {
            part,
            len,
            max: MAX_META_LEN,
        });
    }
    let total = HEADER_LEN as u64 + len + 4;
    if (bytes.len() as u64) < total {
        return Err(SnapshotError::Truncated {
            part,
            expected: total,
            got: bytes.len() as u64,
        });
    }
    if bytes.len() as u64 > total {
        return Err(SnapshotError::Invalid {
            part,
            why: format!("{} trailing bytes", bytes.len() as u64 - total),
        });
    }
    let end = HEADER_LEN + len as usize;
    let stored = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(SnapshotError::Crc {
            part,
            stored,
            computed,
        });
    }
    postcard::from_bytes(&bytes[HEADER_LEN..end]).map_err(|e| SnapshotError::Invalid {
        part,
        why: format!("decoding: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_every_corruption_is_typed() {
        let v: Vec<u64> = (0..100).collect();
        let enc = encode(&v).unwrap();
        assert_eq!(decode::<Vec<u64>>(&enc).unwrap(), v);
        for cut in 0..enc.len() {
            assert!(
                decode::<Vec<u64>>(&enc[..cut]).is_err(),
                "truncated at {cut}"
            );
        }
        for i in 0..enc.len() {
            for bit in 0..8 {
                let mut c = enc.clone();
                c[i] ^= 1 << bit;
                assert!(decode::<Vec<u64>>(&c).is_err(), "bit {bit} of byte {i}");
            }
        }
        let mut c = enc.clone();
        c[8] = 9;
        assert!(matches!(
            decode::<Vec<u64>>(&c),
            Err(SnapshotError::Version { found: 9, .. })
        ));
        let mut c = enc.clone();
        c[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Vec<u64>>(&c),
            Err(SnapshotError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Vec<u64>>(&bytes);
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = decode::<Vec<u64>>(&b);
        }
    }
}
