//! Where the manager keeps its state: a [`Store`] trait with a crash-safe file store (the
//! embedded default) and an in-memory one for simulations.
//!
//! The file is `vmatrix-manager-state <version> <crc32 hex> <length>\n` followed by the JSON of
//! [`ClusterState`]. A save writes a temporary file, fsyncs it, renames it over the old one and
//! fsyncs the directory, so a crash at any point leaves either the old or the new state, whole.
//! A load checks the header, the length and the CRC before parsing, and refuses anything else
//! with a typed error (a manager never starts from a state it cannot trust).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::model::ClusterState;
use crate::FailoverError;

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;
/// Largest state file accepted.
pub const MAX_STATE: usize = 64 << 20;
const MAGIC: &str = "vmatrix-manager-state";

/// Durable storage of the manager's state. `save` returns only once the state is durable.
pub trait Store {
    /// The last saved state (empty if none was ever saved).
    fn load(&mut self) -> Result<ClusterState, FailoverError>;
    /// Replaces the state durably.
    fn save(&mut self, state: &ClusterState) -> Result<(), FailoverError>;
}

/// Keeps the state in memory (simulations; "durable" means it survives a simulated restart).
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    /// The saved state.
    pub state: ClusterState,
    /// Saves so far.
    pub saves: u64,
}

impl Store for MemStore {
    fn load(&mut self) -> Result<ClusterState, FailoverError> {
        Ok(self.state.clone())
    }
    fn save(&mut self, state: &ClusterState) -> Result<(), FailoverError> {
        self.state = state.clone();
        self.saves += 1;
        Ok(())
    }
}

/// The embedded store: one file, replaced atomically.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// A store at `path` (its directory must exist).
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> FailoverError {
    FailoverError::Store(format!("{what} {}: {e}", path.display()))
}

/// Encodes a state as the file's bytes.
pub fn encode_state(state: &ClusterState) -> Result<Vec<u8>, FailoverError> {
    let body =
        serde_json::to_vec_pretty(state).map_err(|e| FailoverError::Encode(e.to_string()))?;
    let mut out = format!(
        "{MAGIC} {STATE_VERSION} {:08x} {}\n",
        crc32fast::hash(&body),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes the file's bytes, checking header, version, length and CRC.
pub fn decode_state(bytes: &[u8]) -> Result<ClusterState, FailoverError> {
    let bad = |why: String| FailoverError::BadState(why);
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .filter(|&n| n < 128)
        .ok_or_else(|| bad("no header line".into()))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("header is not text".into()))?;
    let f: Vec<&str> = header.split(' ').collect();
    if f.len() != 4 || f[0] != MAGIC {
        return Err(bad(format!(
            "not a vmatrix manager state (header '{header}')"
        )));
    }
    let version: u32 = f[1].parse().map_err(|_| bad("bad version".into()))?;
    if version != STATE_VERSION {
        return Err(bad(format!(
            "state version {version}, this build reads {STATE_VERSION}"
        )));
    }
    let crc = u32::from_str_radix(f[2], 16).map_err(|_| bad("bad crc field".into()))?;
    let len: usize = f[3].parse().map_err(|_| bad("bad length field".into()))?;
    let body = &bytes[nl + 1..];
    if len > MAX_STATE || body.len() != len {
        return Err(bad(format!("length {} but header says {len}", body.len())));
    }
    let got = crc32fast::hash(body);
    if got != crc {
        return Err(FailoverError::Crc { want: crc, got });
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))
}

impl Store for FileStore {
    fn load(&mut self) -> Result<ClusterState, FailoverError> {
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ClusterState::default())
            }
            Err(e) => return Err(io_err(&self.path, "reading", e)),
            Ok(m) if m.len() as usize > MAX_STATE + 128 => {
                return Err(FailoverError::BadState(format!(
                    "{} is {} bytes (at most {MAX_STATE})",
                    self.path.display(),
                    m.len()
                )))
            }
            Ok(_) => {}
        }
        let bytes = std::fs::read(&self.path).map_err(|e| io_err(&self.path, "reading", e))?;
        decode_state(&bytes).map_err(|e| match e {
            FailoverError::BadState(w) => {
                FailoverError::BadState(format!("{}: {w}", self.path.display()))
            }
            other => other,
        })
    }

    fn save(&mut self, state: &ClusterState) -> Result<(), FailoverError> {
        let bytes = encode_state(state)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, "creating", e))?;
        f.write_all(&bytes)
            .map_err(|e| io_err(&tmp, "writing", e))?;
        f.sync_all().map_err(|e| io_err(&tmp, "syncing", e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|e| io_err(&self.path, "renaming onto", e))?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "syncing directory", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Phase, VmRecord, VmSpec};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.vms.insert(
            "web".into(),
            VmRecord {
                spec: VmSpec {
                    name: "web".into(),
                    mem_mib: 64,
                    disk_mib: 64,
                    guest_config: "port=7000".into(),
                    backups: 1,
                    hosts: vec![],
                    port: 7100,
                },
                term: 4,
                phase: Phase::Running,
                primary: Some("a".into()),
                started: true,
                backups: vec![],
                handover_to: None,
                retries: 0,
                clones: Default::default(),
                limits: Default::default(),
            },
        );
        s
    }

    #[test]
    fn saves_and_loads() {
        let d = tempfile::tempdir().unwrap();
        let mut st = FileStore::new(d.path().join("state"));
        assert_eq!(st.load().unwrap(), ClusterState::default());
        st.save(&state()).unwrap();
        assert_eq!(
            FileStore::new(d.path().join("state")).load().unwrap(),
            state()
        );
    }

    #[test]
    fn corruption_and_truncation_are_refused() {
        let bytes = encode_state(&state()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_state(&bytes[..n]).is_err(), "truncated at {n}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_state(&b).is_err(), "flipped byte {i}");
        }
    }
}
