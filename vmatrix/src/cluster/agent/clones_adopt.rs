//! The agent's clones: adopting what an earlier agent left (bases, clone processes,
//! standbys). See `clones.rs`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::super::clone_io::{remove_dir, CloneProc};
use super::super::standby;
use super::{Base, Clones};

impl Clones {
    /// Clone processes that run, for their cgroups: (name, VM, pid).
    pub fn running_pids(&self) -> Vec<(String, String, u32)> {
        self.procs
            .iter()
            .filter(|(_, c)| c.exit.is_none())
            .map(|(n, c)| (n.clone(), c.vm.clone(), c.pid))
            .collect()
    }

    /// Where the clones' files are.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Bases, clone processes and standbys left by an earlier agent: bases and clones are
    /// adopted (bases in the order they were made: their names hold the time), standbys killed
    /// — after the clones, so that one a clone record claims is not.
    pub(super) fn adopt(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.cfg.dir) else {
            return;
        };
        let mut standbys = Vec::new();
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                self.adopt_bases(&p);
            } else if p.extension().is_some_and(|x| x == "rec") {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if standby::is_standby(&name) {
                    standbys.push((name, p));
                    continue;
                }
                match self.adopt_proc(&name, &p) {
                    Some(c) => {
                        tracing::info!("adopted clone {name} (pid {})", c.pid);
                        self.procs.insert(name, c);
                    }
                    None => {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
        let claimed: Vec<u32> = self.procs.values().map(|c| c.pid).collect();
        for (name, p) in standbys {
            standby::kill_leftover(&self.cfg.dir, &name, &p, &claimed);
        }
    }

    /// The whole bases of one VM's directory, oldest first; half-made ones removed.
    fn adopt_bases(&mut self, vm_dir: &Path) {
        let vm = vm_dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(vm_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|b| b.path())
            .collect();
        // (`base-<µs since the epoch>`: the same number of digits for centuries.)
        dirs.sort();
        for b in dirs {
            let term = std::fs::read_to_string(b.join("term"))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            match term {
                Some(term) if b.join("base/clone-base.bin").exists() => {
                    self.bases.entry(vm.clone()).or_default().push(Base {
                        dir: b,
                        term,
                        made: Instant::now(),
                    });
                }
                // Half made when the agent stopped.
                _ => remove_dir(&b),
            }
        }
    }

    fn adopt_proc(&self, name: &str, rec: &Path) -> Option<CloneProc> {
        let text = std::fs::read_to_string(rec).ok()?;
        let f: Vec<&str> = text.split_whitespace().collect();
        // (A sixth field: the standby it was, whose control socket its command line names.)
        let (pid, vm, tap, base, term, was) = match f.as_slice() {
            [p, v, t, b, tm] => (p, v, t, b, tm, None),
            [p, v, t, b, tm, w] => (p, v, t, b, tm, Some(*w)),
            _ => return None,
        };
        let pid: u32 = pid.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let named = match was {
            Some(w) => {
                let sock = self.cfg.dir.join(format!("{w}.sock"));
                args.contains(&sock.as_os_str().as_encoded_bytes())
            }
            None => args.contains(&name.as_bytes()),
        };
        let ours = args.contains(&&b"clone-vm"[..]) && named;
        // (An earlier agent that died in the middle of a standby's takeover may not have
        // renamed its socket yet.)
        let mut control = self.cfg.dir.join(format!("{name}.sock"));
        if let Some(w) = was.filter(|_| !control.exists()) {
            control = self.cfg.dir.join(format!("{w}.sock"));
        }
        ours.then(|| CloneProc {
            vm: vm.to_string(),
            child: None,
            pid,
            tap: tap.to_string(),
            base: PathBuf::from(base),
            base_term: term.parse().unwrap_or(0),
            control,
            exit: None,
            running: false,
            exited_at: None,
        })
    }
}
