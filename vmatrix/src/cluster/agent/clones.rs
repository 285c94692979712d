//! The agent's clones (issue 11; docs/clones.md, "Clones through the manager"): it keeps a
//! clone base warm for every VM whose primary runs here and the manager asks for one, starts
//! one `vmatrix clone-vm` process per clone assigned to this host, stops the ones no longer
//! assigned (a load balancer's driver drained them first: the manager keeps a draining clone
//! assigned until then), and reports both.
//!
//! **The base.** Made from what this host runs of the VM when the manager lists it in
//! `bases`: its backup's export (`PUT /snapshot` on the backup's control socket: no pause) or
//! its primary's own snapshot (one capture pause), frozen with `clone::base::prepare` (a full
//! snapshot is used in place: nothing is copied); or, for a VM listed in `fetch`, copied from
//! another host's agent (`base_share`: QUIC, mutual TLS, every CRC checked). Each on a thread
//! of its own so the supervisor's rounds (status polls, reports, promotions) never wait for it.
//! It is refreshed every `refresh` (default 60 s) and whenever the term changes; a new clone
//! starts from the newest base; a running clone keeps the base it started from, which is
//! removed once no clone uses it and a newer one exists (or the VM wants none here). The
//! newest base of each VM is published to this host's base server.
//!
//! **Processes.** Each clone is its own process with its own tap (`vx<n>`, created as a port
//! of `--clone-bridge` with one `ip -batch` for every tap a round needs and kept for reuse),
//! control socket, console and disk delta under `<state>/clones/`. A record
//! (`<name>.rec`: pid, VM, tap, base, term) lets a restarted agent adopt it. A clone that
//! exits is reported, and started again after a second while it is still assigned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use failover::model::{Assignments, BaseFetch, BaseObservation, CloneAssignment, CloneObservation};

use super::base_share::{Published, Served};
use super::clone_io::{
    copy_base, ensure_taps, free_tap, make_base, note_stop, remove_dir, signal, CloneProc,
};
use super::standby;
use crate::control::client::Client;

/// How long a clone that exited waits before it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(1);
/// How long a clone's status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a clone may take to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Clones started by one thread each, at most (spawning waits for the child's exec).
const SPAWNERS: usize = 4;
/// How long a starting standby is waited for, by a clone or at all.
const STANDBY_PATIENCE: Duration = Duration::from_secs(2);
/// After a standby of a VM failed, how long none is started for it.
const STANDBY_BACKOFF: Duration = Duration::from_secs(10);
/// After a base of a VM could not be made (its primary stalled, its backup re-syncing), how
/// long before the next attempt.
const BASE_BACKOFF: Duration = Duration::from_secs(1);

#[path = "clones_adopt.rs"]
mod adopt;

/// Whether a standby took a clone over.
enum Taken {
    /// It did.
    Yes,
    /// One is starting: the clone waits for it.
    Wait,
    /// None can: start the clone.
    No,
}

/// The agent's clone settings.
#[derive(Debug, Clone)]
pub struct CloneConfig {
    /// `<state>/clones`.
    pub dir: PathBuf,
    /// The vmatrix binary.
    pub exe: PathBuf,
    /// The bridge the clones' taps join (the guests' LAN on this host).
    pub bridge: String,
    /// A base older than this is replaced by a fresh one.
    pub refresh: Duration,
    /// Standby clones kept per VM wanting clones here (see `standby.rs`).
    pub standby: usize,
    /// The newest base of each VM, as this host's base server serves them.
    pub published: Published,
    /// Certificate directory and this host's name (copying a base from another host).
    pub identity: (PathBuf, String),
}

/// One frozen checkpoint of a VM on this host.
pub(super) struct Base {
    /// `<dir>/<vm>/base-<id>`: `snap/` (the snapshot), `base/` (the clone base), `term`.
    pub(super) dir: PathBuf,
    pub(super) term: u64,
    pub(super) made: Instant,
}

impl Base {
    pub(super) fn base_dir(&self) -> PathBuf {
        self.dir.join("base")
    }
}

/// A base being made: (VM, term) and its thread.
type Making = (u64, JoinHandle<anyhow::Result<Base>>);

/// The clones of this host.
pub struct Clones {
    cfg: CloneConfig,
    procs: BTreeMap<String, CloneProc>,
    bases: BTreeMap<String, Vec<Base>>,
    making: BTreeMap<String, Making>,
    /// Clones assigned here that cannot start (no base of their VM here): name → why.
    blocked: BTreeMap<String, (String, String)>,
    /// Standby clones: (file stem, process, started).
    standby: Vec<(String, CloneProc, Instant)>,
    /// The number of the next standby.
    standby_seq: u64,
    /// When a standby of a VM last failed (none is started for [`STANDBY_BACKOFF`] after).
    standby_failed: BTreeMap<String, Instant>,
    /// When making or copying a base of a VM last failed, and why (none is tried for
    /// [`BASE_BACKOFF`] after; cleared by a success).
    base_failed: BTreeMap<String, (Instant, String)>,
    /// When a copy of a base of a VM last began (see `keep_copy_warm`).
    copied_at: BTreeMap<String, Instant>,
}

/// A live primary or backup on this host a clone base is made from (`PUT /snapshot`): its
/// control socket and term.
pub struct LocalSource {
    /// Control socket.
    pub control: PathBuf,
    /// Its term.
    pub term: u64,
}

impl Clones {
    /// The clones of this host; adopts the clone processes and bases an earlier agent left.
    pub fn new(cfg: CloneConfig) -> Clones {
        let mut c = Clones {
            cfg,
            procs: BTreeMap::new(),
            bases: BTreeMap::new(),
            making: BTreeMap::new(),
            blocked: BTreeMap::new(),
            standby: Vec::new(),
            // (Never a number an earlier agent used: a clone that was a standby is known by its
            // standby name's control socket in its command line.)
            standby_seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            standby_failed: BTreeMap::new(),
            base_failed: BTreeMap::new(),
            copied_at: BTreeMap::new(),
        };
        if let Err(e) = std::fs::create_dir_all(&c.cfg.dir) {
            tracing::warn!("creating {}: {e}", c.cfg.dir.display());
        }
        c.adopt();
        c.publish();
        c
    }

    /// One round: bases, starts, stops; `sources` are what this host can make bases from.
    pub fn round(&mut self, want: &Assignments, sources: &BTreeMap<String, LocalSource>) {
        self.collect_bases();
        for vm in &want.bases {
            if let Some(p) = sources.get(vm) {
                self.keep_base_warm(vm, p);
            }
        }
        for f in &want.fetch {
            let mem_mib = want.clones.iter().find(|c| c.vm == f.vm).map(|c| c.mem_mib);
            self.keep_copy_warm(f, mem_mib);
        }
        self.stop_unassigned(want);
        self.start_assigned(want);
        self.keep_standby(want);
        self.poll();
        self.remove_unused_bases(want);
        self.publish();
    }

    /// Tells the base server the newest base of each VM.
    fn publish(&self) {
        let served: BTreeMap<String, Served> = self
            .bases
            .iter()
            .filter_map(|(vm, b)| b.last().map(|b| (vm, b)))
            .map(|(vm, b)| {
                let s = Served {
                    term: b.term,
                    snap: b.dir.join("snap"),
                    made: b.made,
                };
                (vm.clone(), s)
            })
            .collect();
        *self.cfg.published.lock().expect("published bases") = served;
    }

    /// Gives newly assigned clones the ready standbys of their VM's newest base (a few ms
    /// each, bounded): called first in a round, before anything slow. Spawning the others
    /// waits for [`Clones::round`], after the supervisor's own actions (a promotion must not
    /// wait for clone processes to be spawned).
    pub fn start_new(&mut self, want: &Assignments) {
        self.collect_bases();
        for a in &want.clones {
            if self.procs.contains_key(&a.name) {
                continue;
            }
            let Some(base) = self
                .bases
                .get(&a.vm)
                .and_then(|b| b.last())
                .map(Base::base_dir)
            else {
                continue;
            };
            let _ = self.take_standby(a, &base, &[]);
        }
    }

    /// Bases whose thread finished.
    fn collect_bases(&mut self) {
        let done: Vec<String> = self
            .making
            .iter()
            .filter(|(_, (_, h))| h.is_finished())
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in done {
            let Some((term, h)) = self.making.remove(&vm) else {
                continue;
            };
            match h.join() {
                Ok(Ok(b)) => {
                    self.base_failed.remove(&vm);
                    tracing::info!(
                        "{vm}: clone base of term {term} ready in {}",
                        b.dir.display()
                    );
                    self.bases.entry(vm).or_default().push(b);
                }
                Ok(Err(e)) => {
                    tracing::warn!("{vm}: making a clone base: {e:#} (again in {BASE_BACKOFF:?})");
                    self.base_failed
                        .insert(vm, (Instant::now(), format!("{e:#}")));
                }
                Err(_) => tracing::warn!("{vm}: the clone base's thread panicked"),
            }
        }
    }

    /// Starts making a base of `vm` if it has none of the source's term, or only an old one.
    fn keep_base_warm(&mut self, vm: &str, p: &LocalSource) {
        if !self.may_make(vm) {
            return;
        }
        let fresh = self
            .bases
            .get(vm)
            .and_then(|b| b.last())
            .is_some_and(|b| b.term == p.term && b.made.elapsed() < self.cfg.refresh);
        if fresh {
            return;
        }
        let dir = self.new_base_dir(vm);
        let (control, term, vm2) = (p.control.clone(), p.term, vm.to_string());
        self.make_on_thread(vm, term, move || make_base(&vm2, &control, term, dir));
    }

    /// Starts copying a base of `f.vm` from another host if it has none, or one older than
    /// `refresh` (a copy is as old as its source's base: it counts from when that was made)
    /// or of an older term than the best source's — but, once it has one, not within
    /// `refresh / 2` of the last copy's start: a source whose own base is old, or a fallback
    /// source of an older term, would otherwise be copied again and again.
    fn keep_copy_warm(&mut self, f: &BaseFetch, mem_mib: Option<u64>) {
        let Some(best) = f.sources.first() else {
            return;
        };
        if !self.may_make(&f.vm) {
            return;
        }
        let have = self.bases.get(&f.vm).and_then(|b| b.last());
        let stale = have.is_none_or(|b| b.term < best.term || b.made.elapsed() >= self.cfg.refresh);
        let gap = (self.cfg.refresh / 2).max(BASE_BACKOFF);
        let recent = self.copied_at.get(&f.vm).is_some_and(|t| t.elapsed() < gap);
        if !stale || (have.is_some() && recent) {
            return;
        }
        self.copied_at.insert(f.vm.clone(), Instant::now());
        let dir = self.new_base_dir(&f.vm);
        let (sources, vm2, id) = (f.sources.clone(), f.vm.clone(), self.cfg.identity.clone());
        self.make_on_thread(&f.vm, best.term, move || {
            copy_base(&vm2, &sources, &id, mem_mib, dir)
        });
    }

    /// Whether this host is told to copy a base of `vm`.
    fn awaits_copy(&self, want: &Assignments, vm: &str) -> bool {
        want.fetch.iter().any(|f| f.vm == vm)
    }

    /// Whether a base of `vm` may be started now: none is being made, and the last try did
    /// not fail within [`BASE_BACKOFF`].
    fn may_make(&self, vm: &str) -> bool {
        let failed = self.base_failed.get(vm);
        !self.making.contains_key(vm) && failed.is_none_or(|(t, _)| t.elapsed() >= BASE_BACKOFF)
    }

    fn new_base_dir(&self, vm: &str) -> PathBuf {
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        self.cfg.dir.join(vm).join(format!("base-{id}"))
    }

    fn make_on_thread(
        &mut self,
        vm: &str,
        term: u64,
        f: impl FnOnce() -> anyhow::Result<Base> + Send + 'static,
    ) {
        match std::thread::Builder::new()
            .name(format!("base-{vm}"))
            .spawn(f)
        {
            Ok(h) => {
                self.making.insert(vm.to_string(), (term, h));
            }
            Err(e) => tracing::warn!("{vm}: no thread for a clone base: {e}"),
        }
    }

    /// Drains and stops every clone not assigned here any more (all signalled at once).
    fn stop_unassigned(&mut self, want: &Assignments) {
        let gone: Vec<String> = self
            .procs
            .keys()
            .filter(|n| !want.clones.iter().any(|c| &c.name == *n))
            .cloned()
            .collect();
        let mut stopping = Vec::new();
        for name in gone {
            let Some(mut c) = self.procs.remove(&name) else {
                continue;
            };
            if c.alive() {
                note_stop(&name, &c);
                signal(c.pid, rustix::process::Signal::TERM);
                stopping.push((name, c));
            } else {
                self.forget(&name);
            }
        }
        let until = Instant::now() + STOP_GRACE;
        for (name, mut c) in stopping {
            while c.alive() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
            if c.alive() {
                tracing::warn!("clone {name} did not stop within {STOP_GRACE:?}; killing it");
                c.kill();
            }
            tracing::info!("stopped clone {name}");
            self.forget(&name);
        }
        self.blocked
            .retain(|n, _| want.clones.iter().any(|c| &c.name == n));
    }

    fn forget(&self, name: &str) {
        for ext in ["rec", "sock", "delta"] {
            let _ = std::fs::remove_file(self.cfg.dir.join(format!("{name}.{ext}")));
        }
    }

    /// Starts the assigned clones that do not run (a dead one after [`RESTART_AFTER`]).
    fn start_assigned(&mut self, want: &Assignments) {
        let mut todo: Vec<(&CloneAssignment, PathBuf, u64)> = Vec::new();
        for a in &want.clones {
            if let Some(c) = self.procs.get_mut(&a.name) {
                if c.alive() || c.exited_at.is_some_and(|t| t.elapsed() < RESTART_AFTER) {
                    continue;
                }
            }
            match self.bases.get(&a.vm).and_then(|b| b.last()) {
                Some(b) => {
                    self.blocked.remove(&a.name);
                    todo.push((a, b.base_dir(), b.term));
                }
                // Being made or copied, or to be copied once a source holds one (the first base
                // of a VM being made elsewhere), with no try failed since the last success: it
                // waits, and is not reported. Once a try failed it is reported blocked, also
                // while the next try runs (a dead report for long has the manager place it
                // elsewhere: tries that keep failing must not hide it).
                None if !self.base_failed.contains_key(&a.vm)
                    && (self.making.contains_key(&a.vm) || self.awaits_copy(want, &a.vm)) =>
                {
                    self.blocked.remove(&a.name);
                }
                // Nothing to make one from here (the backup re-syncing, the primary gone) or
                // the last try failed: reported, so the manager places the clone elsewhere.
                None => {
                    let last = self.base_failed.get(&a.vm).map(|(_, e)| e.as_str());
                    let why = format!(
                        "no clone base of {} on this host, and none can be made or copied now{}",
                        a.vm,
                        last.map_or(String::new(), |e| format!(" (last try: {e})"))
                    );
                    self.blocked.insert(a.name.clone(), (a.vm.clone(), why));
                }
            }
        }
        // A standby of the clone's base takes it over; one still starting is waited for (a
        // fresh process would take as long to build); the rest are started.
        let mut waiting: Vec<PathBuf> = Vec::new();
        let todo: Vec<_> = todo
            .into_iter()
            .filter(|(a, base, _)| match self.take_standby(a, base, &waiting) {
                Taken::Yes => false,
                Taken::Wait => {
                    waiting.push(base.clone());
                    false
                }
                Taken::No => true,
            })
            .collect();
        if todo.is_empty() {
            return;
        }
        let mut used = self.taps_in_use();
        let mut plans = Vec::new();
        for (a, base, term) in todo {
            let tap = match self.procs.get(&a.name) {
                Some(c) => c.tap.clone(),
                None => free_tap(&used),
            };
            used.push(tap.clone());
            plans.push((a.clone(), base, term, tap));
        }
        let taps: Vec<String> = plans.iter().map(|p| p.3.clone()).collect();
        if let Err(e) = ensure_taps(&taps, &self.cfg.bridge) {
            tracing::error!("clone taps: {e:#}");
            return;
        }
        for (name, r) in self.spawn_all(plans) {
            match r {
                Ok(c) => {
                    self.procs.insert(name, c);
                }
                Err(e) => tracing::error!("starting clone {name}: {e:#}"),
            }
        }
    }

    /// Makes a ready standby of `base` the clone `a`, if there is one. A standby of `base`
    /// still starting (for less than [`STANDBY_PATIENCE`]) and not yet promised to another
    /// clone of this round (`waiting`: one entry per promise) is waited for.
    fn take_standby(&mut self, a: &CloneAssignment, base: &Path, waiting: &[PathBuf]) -> Taken {
        let Some(i) = self
            .standby
            .iter()
            .position(|(_, s, _)| s.running && s.base == base)
        else {
            let starting = self
                .standby
                .iter()
                .filter(|(_, s, t)| {
                    !s.running
                        && s.exit.is_none()
                        && s.base == base
                        && t.elapsed() < STANDBY_PATIENCE
                })
                .count();
            let promised = waiting.iter().filter(|b| *b == base).count();
            return match starting > promised {
                true => Taken::Wait,
                false => Taken::No,
            };
        };
        let (stem, s, _) = self.standby.remove(i);
        match standby::activate(&self.cfg.dir, &stem, s, a) {
            Ok(c) => {
                self.procs.insert(a.name.clone(), c);
                Taken::Yes
            }
            Err(failed) => {
                let (e, s) = *failed;
                tracing::warn!("{e:#}; starting {} the usual way", a.name);
                // (Killed and reaped before its tap can be given to another.)
                standby::discard(&self.cfg.dir, &stem, s);
                let _ = std::fs::remove_file(self.cfg.dir.join(format!("{}.rec", a.name)));
                Taken::No
            }
        }
    }

    /// Taps of the clones and the standbys.
    fn taps_in_use(&self) -> Vec<String> {
        self.procs
            .values()
            .chain(self.standby.iter().map(|(_, s, _)| s))
            .map(|c| c.tap.clone())
            .collect()
    }

    /// Keeps `cfg.standby` standbys of the newest base of every VM wanting clones here, and
    /// no other (dead ones, those of an older base or of a VM wanting none here are removed).
    fn keep_standby(&mut self, want: &Assignments) {
        let wanted =
            |vm: &str| want.bases.iter().any(|b| b == vm) || want.clones.iter().any(|c| c.vm == vm);
        let targets: Vec<(String, PathBuf, u64)> = self
            .bases
            .iter()
            .filter(|(vm, _)| wanted(vm))
            .filter_map(|(vm, b)| b.last().map(|b| (vm.clone(), b.base_dir(), b.term)))
            .collect();
        for (stem, s, t) in std::mem::take(&mut self.standby) {
            // (One that never got ready, its socket still missing, is given up.)
            let stuck = !s.running && !s.control.exists() && t.elapsed() >= STANDBY_PATIENCE;
            let failed = stuck || s.exit.is_some();
            let target = targets.iter().any(|(vm, b, _)| *vm == s.vm && *b == s.base);
            if !failed && target {
                self.standby.push((stem, s, t));
                continue;
            }
            if failed {
                // Not again for a while (a standby that cannot start would be respawned every
                // round), and its log kept for a look.
                tracing::warn!(
                    "standby clone {stem} of {} failed ({}): none for {STANDBY_BACKOFF:?}; its log \
                     is standby-failed-{}.log",
                    s.vm,
                    s.exit.as_deref().unwrap_or("never ready"),
                    s.vm
                );
                let log = self.cfg.dir.join(format!("{stem}.log"));
                let _ = std::fs::rename(
                    log,
                    self.cfg.dir.join(format!("standby-failed-{}.log", s.vm)),
                );
                self.standby_failed.insert(s.vm.clone(), Instant::now());
            }
            standby::discard(&self.cfg.dir, &stem, s);
        }
        for (vm, base, term) in targets {
            let backoff = self
                .standby_failed
                .get(&vm)
                .is_some_and(|t| t.elapsed() < STANDBY_BACKOFF);
            let have = self
                .standby
                .iter()
                .filter(|(_, s, _)| s.base == base)
                .count();
            if !backoff && have < self.cfg.standby {
                self.spawn_standbys(&vm, &base, term, self.cfg.standby - have);
            }
        }
    }

    /// Starts `n` standbys of `vm` from `base` (of `term`).
    fn spawn_standbys(&mut self, vm: &str, base: &Path, term: u64, n: usize) {
        for _ in 0..n {
            let tap = free_tap(&self.taps_in_use());
            if let Err(e) = ensure_taps(std::slice::from_ref(&tap), &self.cfg.bridge) {
                tracing::error!("standby clone tap: {e:#}");
                return;
            }
            let stem = standby::stem(self.standby_seq);
            self.standby_seq += 1;
            let made = standby::spawn(&self.cfg.dir, &self.cfg.exe, (vm, base, term), &tap, &stem);
            match made {
                Ok(s) => self.standby.push((stem, s, Instant::now())),
                Err(e) => {
                    tracing::warn!("{vm}: starting a standby clone: {e:#}");
                    self.standby_failed.insert(vm.to_string(), Instant::now());
                }
            }
        }
    }

    /// Spawns the clones, [`SPAWNERS`] at a time.
    fn spawn_all(
        &self,
        plans: Vec<(CloneAssignment, PathBuf, u64, String)>,
    ) -> Vec<(String, anyhow::Result<CloneProc>)> {
        let per = plans.len().div_ceil(SPAWNERS).max(1);
        std::thread::scope(|s| {
            let hs: Vec<_> = plans
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(a, base, term, tap)| {
                                (a.name.clone(), self.spawn(a, base, *term, tap))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    fn spawn(
        &self,
        a: &CloneAssignment,
        base: &Path,
        term: u64,
        tap: &str,
    ) -> anyhow::Result<CloneProc> {
        let d = &self.cfg.dir;
        let control = d.join(format!("{}.sock", a.name));
        let delta = d.join(format!("{}.delta", a.name));
        let _ = std::fs::remove_file(&control);
        let _ = std::fs::remove_file(&delta);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(format!("{}.log", a.name)))?;
        let mut cmd = Command::new(&self.cfg.exe);
        cmd.args(["--log", "info", "clone-vm", "--base"])
            .arg(base)
            .args(["--name", &a.name, "--tap", tap])
            .args(["--guest-config", &a.guest_config, "--delta"])
            .arg(&delta)
            .arg("--control")
            .arg(&control)
            .arg("--console-log")
            .arg(d.join(format!("{}.console", a.name)));
        // Its own process group: a signal meant for the agent never reaches it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.env(
            crate::clone::vm::SPAWNED_ENV,
            crate::clone::vm::unix_ns().to_string(),
        );
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning vmatrix clone-vm")?;
        let pid = child.id();
        let rec = format!("{pid} {} {tap} {} {term}\n", a.vm, base.display());
        let recfile = d.join(format!("{}.rec", a.name));
        if let Err(e) = std::fs::write(&recfile, rec) {
            tracing::warn!("recording clone {}: {e}", a.name);
        }
        tracing::info!(
            "started clone {} of {} (pid {pid}, tap {tap})",
            a.name,
            a.vm
        );
        Ok(CloneProc {
            vm: a.vm.clone(),
            child: Some(child),
            pid,
            tap: tap.to_string(),
            base: base.to_path_buf(),
            base_term: term,
            control,
            exit: None,
            running: false,
            exited_at: None,
        })
    }

    /// Whether each clone runs; a clone is `running` once its control socket answers (and a
    /// standby is ready then).
    fn poll(&mut self) {
        // (A standby is ready once its control socket exists: `clone-vm` binds it when its VM
        // is built. Not asked: a status request to a process still starting could hold the
        // round up to its timeout, and a busy host missed any short one again and again.)
        for (_, s, _) in &mut self.standby {
            if s.alive() && !s.running {
                s.running = s.control.exists();
            }
        }
        for (name, c) in &mut self.procs {
            if !c.alive() {
                if c.exited_at.is_none() {
                    tracing::warn!("clone {name} exited: {}", c.exit.as_deref().unwrap_or("?"));
                    c.exited_at = Some(Instant::now());
                    c.running = false;
                }
                continue;
            }
            if !c.running {
                c.running = Client::new(&c.control, STATUS_TIMEOUT).status().is_ok();
            }
        }
    }

    /// Removes the bases no clone uses that are not the newest of a VM wanting one here.
    fn remove_unused_bases(&mut self, want: &Assignments) {
        for (vm, bases) in &mut self.bases {
            let wanted = want.bases.contains(vm) || want.clones.iter().any(|c| &c.vm == vm);
            let newest = bases.len().saturating_sub(1);
            let old = std::mem::take(bases);
            for (i, b) in old.into_iter().enumerate() {
                let used = self.procs.values().any(|c| c.base == b.base_dir())
                    || self.standby.iter().any(|(_, s, _)| s.base == b.base_dir());
                if used || (wanted && i == newest) {
                    bases.push(b);
                } else {
                    tracing::info!("{vm}: removing the unused clone base {}", b.dir.display());
                    remove_dir(&b.dir);
                }
            }
        }
        self.bases.retain(|_, b| !b.is_empty());
    }

    /// What the manager is told.
    pub fn observe(&self) -> (Vec<CloneObservation>, Vec<BaseObservation>) {
        let mut clones: Vec<CloneObservation> = self
            .procs
            .iter()
            .map(|(name, c)| CloneObservation {
                name: name.clone(),
                vm: c.vm.clone(),
                alive: c.exit.is_none(),
                running: c.running,
                exit: c.exit.clone(),
                base_term: c.base_term,
            })
            .collect();
        for (name, (vm, why)) in &self.blocked {
            clones.push(CloneObservation {
                name: name.clone(),
                vm: vm.clone(),
                alive: false,
                running: false,
                exit: Some(why.clone()),
                base_term: 0,
            });
        }
        let bases = self
            .bases
            .iter()
            .filter_map(|(vm, b)| b.last().map(|b| (vm, b)))
            .map(|(vm, b)| BaseObservation {
                vm: vm.clone(),
                term: b.term,
                age_ms: b.made.elapsed().as_millis() as u64,
            })
            .collect();
        (clones, bases)
    }

    /// Stops every clone (the agent stops with `--stop-vms-on-exit`).
    pub fn stop_all(&mut self) {
        self.stop_unassigned(&Assignments::default());
        for (stem, s, _) in std::mem::take(&mut self.standby) {
            standby::discard(&self.cfg.dir, &stem, s);
        }
    }
}
