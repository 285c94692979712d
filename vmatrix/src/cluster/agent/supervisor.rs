//! The agent's supervisor thread: every heartbeat it polls the VM processes, asks
//! [`failover::agent::reconcile`] what to do to match the manager's assignment, does it (on
//! the processes' control sockets: `PUT /backups`, `/handover`, `/fence`, `/promote`), and
//! publishes the report the connection task sends. It keeps running while the manager is
//! unreachable (VMs keep running), and does nothing before the first assignment arrives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failover::agent::{reconcile, Action, Applied};
use failover::model::{Assignments, BackupTarget, ProcRole, Report, VmObservation, VmSpec};

use failover::limits::UsageOf;

use super::clones::{CloneConfig, Clones, LocalSource};
use super::limiter::{Limiter, Target};
use super::procs::Proc;
use crate::control::types::Status;

/// What a supervisor needs to start VM processes.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// This host's name (certificate).
    pub host: String,
    /// Certificate directory.
    pub certs: PathBuf,
    /// Replication address backups listen on.
    pub repl_ip: String,
    /// Where VM files live: `<state>/<vm>/{image/, disk.img, *.sock, *.log}`.
    pub state: PathBuf,
    /// The guest ELF.
    pub guest: PathBuf,
    /// Tap for the guest NIC.
    pub tap: String,
    /// The vmatrix binary to run VM processes with.
    pub exe: PathBuf,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Extra flags for every `vmatrix primary` (e.g. epoch length).
    pub primary_flags: Vec<String>,
    /// A test hook: crash (abort) at this point, as the host would (see [`CRASH_POINTS`]).
    pub crash_at: Option<String>,
    /// Clones: where, which bridge, how often a base is refreshed.
    pub clones: CloneConfig,
    /// The port this host's clone base server listens on (0: none).
    pub base_port: u16,
    /// Put each VM process in a cgroup of its own with its VM's limits.
    pub cgroups: bool,
    /// The agent's base group (under its own group in each hierarchy).
    pub cgroup_name: String,
    /// Real-time budgets of those groups.
    pub rt_budget: crate::cgroup::RtBudget,
}

/// Crash right after the promotion's `promote-term` marker is durable, before the backup is
/// told and the new primary starts.
pub const CRASH_AFTER_PROMOTE_MARKER: &str = "after-promote-marker";

/// Where `--crash-at` may crash the agent.
pub const CRASH_POINTS: &[&str] = &[CRASH_AFTER_PROMOTE_MARKER];

/// Shared between the supervisor and the connection task.
#[derive(Default)]
pub struct Shared {
    /// The manager's latest assignment (None before the first).
    pub want: Option<Assignments>,
    /// The latest report.
    pub report: Report,
    /// A first round has looked at every process (before it, a report would be incomplete and
    /// the manager would take a missing primary for a dead one).
    pub ready: bool,
}

type Key = (String, ProcRole);

/// Wakes the supervisor before its next tick: a new assignment arrived (a scale-up should not
/// wait up to a heartbeat for the round that starts its clones).
#[derive(Default)]
pub struct Wake {
    pending: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Wake {
    /// Ends the supervisor's current (or next) wait.
    pub fn notify(&self) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_one();
    }

    /// Waits up to `timeout`, or until [`Wake::notify`].
    fn wait(&self, timeout: Duration) {
        let g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |pending| !*pending)
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
    }
}

/// How long a control request (other than status, handover, promote) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(200);

/// The supervisor.
pub struct Supervisor {
    cfg: HostConfig,
    procs: BTreeMap<Key, Proc>,
    applied: BTreeMap<String, Applied>,
    shared: Arc<Mutex<Shared>>,
    /// Primaries of promotions that a crash of this host cut short before their guest ran
    /// (found at start: see [`unstarted_promotion`]): VM → term, reported as dead and never run.
    unstarted: BTreeMap<String, u64>,
    /// Whether the dead primary of (VM, term) never ran its guest (files checked once).
    never_ran: BTreeMap<(String, u64), bool>,
    /// The clones of this host.
    clones: Clones,
    /// The VM processes' cgroups.
    limiter: Limiter,
}

impl Supervisor {
    /// A supervisor with nothing running.
    pub fn new(cfg: HostConfig, shared: Arc<Mutex<Shared>>) -> Supervisor {
        let clones = Clones::new(cfg.clones.clone());
        let mut s = Supervisor {
            // (Set up after the adoption below: finding and mounting the hierarchies can take
            // a moment, and a restarted agent says what it adopted first.)
            limiter: Limiter::off(),
            cfg,
            clones,
            procs: BTreeMap::new(),
            applied: BTreeMap::new(),
            shared,
            unstarted: BTreeMap::new(),
            never_ran: BTreeMap::new(),
        };
        s.adopt_running();
        let private = s.cfg.state.join(".cgroup");
        s.limiter = Limiter::new(&s.cfg.cgroup_name, s.cfg.cgroups, s.cfg.rt_budget, &private);
        s
    }

    /// VM processes an earlier agent on this host started and that still run are taken over
    /// (an agent restart never stops a VM, and never starts a second copy of one).
    fn adopt_running(&mut self) {
        let Ok(dirs) = std::fs::read_dir(&self.cfg.state) else {
            return;
        };
        for d in dirs.flatten() {
            let vm = d.file_name().to_string_lossy().into_owned();
            for role in [ProcRole::Primary, ProcRole::Backup] {
                if let Some((p, backups)) = Proc::adopt(&d.path(), &vm, role) {
                    if role == ProcRole::Primary {
                        self.applied.entry(vm.clone()).or_default().backups = Some(backups);
                    }
                    self.procs.insert((vm.clone(), role), p);
                }
            }
            let adopted = self.procs.contains_key(&(vm.clone(), ProcRole::Primary));
            if let Some(term) = unstarted_promotion(&d.path()).filter(|_| !adopted) {
                tracing::warn!(
                    "{vm}: the promotion at term {term} never ran its guest (this host stopped \
                     first; its image is whole): reported so"
                );
                self.unstarted.insert(vm, term);
            }
        }
    }

    /// What every VM process here (and every promotion cut short) looks like to the manager.
    fn observe_all(&mut self) -> Vec<VmObservation> {
        let mut obs: Vec<VmObservation> = self.procs.values_mut().map(|p| p.observe()).collect();
        for (vm, term) in &self.unstarted {
            if !self.procs.contains_key(&(vm.clone(), ProcRole::Primary)) {
                obs.push(VmObservation::unstarted_primary(vm, *term));
            }
        }
        for o in obs
            .iter_mut()
            .filter(|o| o.role == ProcRole::Primary && !o.alive)
        {
            let dir = self.cfg.state.join(&o.vm);
            o.never_ran = *self
                .never_ran
                .entry((o.vm.clone(), o.term))
                .or_insert_with(|| image_never_ran(&dir, o.term));
        }
        obs
    }

    /// Runs until `stop` is set. The VM processes go on running (the next agent adopts them)
    /// unless `stop_vms` is set.
    pub fn run(mut self, stop: Arc<std::sync::atomic::AtomicBool>, stop_vms: bool, wake: &Wake) {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            self.round();
            wake.wait(self.cfg.heartbeat);
        }
        if !stop_vms {
            return;
        }
        self.clones.stop_all();
        for p in self.procs.values_mut() {
            match p.role {
                ProcRole::Backup => p.stop(Duration::from_secs(5)),
                ProcRole::Primary => p.stop(Duration::from_secs(2)),
            }
        }
    }

    fn round(&mut self) {
        // New clones first, where a ready standby takes them over (a few ms): polling the VM
        // processes can take a while on a busy host (each status request up to its timeout),
        // and a scale-up is waited for by clients. Spawns wait for the end of the round.
        let want = self.shared.lock().expect("shared").want.clone();
        if let Some(want) = &want {
            self.clones.start_new(want);
        }
        for p in self.procs.values_mut() {
            if p.alive() {
                p.poll();
            }
        }
        let obs = self.observe_all();
        let want = self.shared.lock().expect("shared").want.clone();
        if let Some(want) = &want {
            self.forget_dead(want);
            for a in reconcile(want, &obs, &self.applied) {
                if let Err(e) = self.act(a.clone()) {
                    tracing::error!("{a:?} failed: {e:#}");
                }
            }
        }
        if let Some(want) = &want {
            let sources = self.base_sources();
            self.clones.round(want, &sources);
        }
        let vms = self.observe_all();
        let (clones, bases) = self.clones.observe();
        let targets = self.limit_targets();
        let usage = self
            .limiter
            .round(want.as_ref().map(|w| &w.limits), &targets);
        let mut sh = self.shared.lock().expect("shared");
        sh.report = Report {
            vms,
            clones,
            bases,
            base_port: self.cfg.base_port,
            usage,
        };
        sh.ready = true;
    }

    /// The cgroup target of a VM process.
    fn target_of(&self, p: &Proc) -> Target {
        let role = format!("{:?}", p.role).to_lowercase();
        Target {
            name: format!("{}.{role}", p.vm),
            vm: p.vm.clone(),
            of: UsageOf::Vm(p.role),
            pid: p.pid(),
            realtime: p.role == ProcRole::Primary,
            disk_at: self.cfg.state.clone(),
        }
    }

    /// A VM process just started goes into its cgroup at once.
    fn place(&mut self, key: &Key) {
        let Some(t) = self.procs.get(key).map(|p| self.target_of(p)) else {
            return;
        };
        let want = self.shared.lock().expect("shared").want.clone();
        self.limiter.place_now(want.as_ref().map(|w| &w.limits), t);
    }

    /// Every VM process that runs here, for its cgroup.
    fn limit_targets(&self) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .procs
            .values()
            .filter(|p| p.exit.is_none())
            .map(|p| self.target_of(p))
            .collect();
        for (name, vm, pid) in self.clones.running_pids() {
            out.push(Target {
                name: format!("{name}.clone"),
                vm,
                of: UsageOf::Clone(name),
                pid,
                realtime: false,
                disk_at: self.clones.dir().to_path_buf(),
            });
        }
        out
    }

    /// What a clone base can be made from here, by VM: its live primary (a snapshot: one
    /// capture pause) or, else, its backup holding a committed image of the term it was told
    /// (an export: no pause, `backup::export`).
    fn base_sources(&self) -> BTreeMap<String, LocalSource> {
        let mut out = BTreeMap::new();
        for ((vm, role), p) in &self.procs {
            if p.exit.is_some() || p.handed_over {
                continue;
            }
            let ok = match (role, &p.status) {
                (ProcRole::Primary, Some(_)) => true,
                // (A full sync in progress keeps the committed image exportable.)
                (ProcRole::Backup, Some(Status::Backup(b))) => b.seq.is_some() && b.term == p.term,
                _ => false,
            };
            if ok && (*role == ProcRole::Primary || !out.contains_key(vm)) {
                let src = LocalSource {
                    control: p.control.clone(),
                    term: p.term,
                };
                out.insert(vm.clone(), src);
            }
        }
        out
    }

    /// Dead processes are reported until the manager no longer assigns their VM here (a dead
    /// primary stays on record so that nothing boots it again silently).
    fn forget_dead(&mut self, want: &Assignments) {
        self.procs
            .retain(|(vm, _), p| p.exit.is_none() || want.vms.contains_key(vm));
        self.applied.retain(|vm, _| want.vms.contains_key(vm));
        self.unstarted.retain(|vm, _| want.vms.contains_key(vm));
        // A handover the manager abandoned may be asked for again later.
        for (vm, a) in &want.vms {
            if let failover::model::Role::Primary {
                handover: false, ..
            } = a.role
            {
                if let Some(ap) = self.applied.get_mut(vm) {
                    ap.handover = None;
                }
            }
        }
    }

    fn vm_dir(&self, vm: &str) -> anyhow::Result<PathBuf> {
        let d = self.cfg.state.join(vm);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn act(&mut self, a: Action) -> anyhow::Result<()> {
        tracing::info!("doing {a:?}");
        match a {
            Action::BootPrimary {
                spec,
                term,
                backups,
            } => self.start_primary(&spec, term, &backups, false),
            Action::Promote {
                spec,
                term,
                backups,
            } => self.promote(&spec, term, &backups),
            Action::StartBackup { spec, min_term } => self.start_backup(&spec, min_term),
            Action::SetBackups { vm, backups } => {
                let p = self
                    .procs
                    .get_mut(&(vm.clone(), ProcRole::Primary))
                    .ok_or_else(|| anyhow::anyhow!("no primary of {vm}"))?;
                p.client(REQUEST_TIMEOUT)
                    .set_backups(backup_list(&backups))?;
                p.backup_hosts = backups.iter().map(|b| b.host.clone()).collect();
                p.polls_since_apply = 0;
                if let Err(e) = p.save_record(&backups) {
                    tracing::warn!("recording the backups of {vm}: {e}");
                }
                self.applied.entry(vm).or_default().backups = Some(backups);
                Ok(())
            }
            Action::Handover { vm, term } => {
                self.applied.entry(vm.clone()).or_default().handover = Some(term);
                let p = self
                    .procs
                    .get_mut(&(vm.clone(), ProcRole::Primary))
                    .ok_or_else(|| anyhow::anyhow!("no primary of {vm}"))?;
                let a = p.client(Duration::from_secs(10)).handover()?;
                tracing::info!(
                    "the primary of {vm}: handed over at checkpoint {}",
                    a.checkpoint
                );
                // Reported at once (this round's report): the manager may start the target while
                // this process is still exiting (~60 ms of teardown in the demo); its exit is
                // seen by the next rounds' polls.
                p.handed_over = true;
                Ok(())
            }
            Action::FenceBackup { vm, term } => {
                let p = self
                    .procs
                    .get_mut(&(vm.clone(), ProcRole::Backup))
                    .ok_or_else(|| anyhow::anyhow!("no backup of {vm}"))?;
                p.client(REQUEST_TIMEOUT).fence_backup(term)?;
                p.term = term;
                Ok(())
            }
            Action::Stop { vm, role, why } => {
                if let Some(p) = self.procs.get_mut(&(vm.clone(), role)) {
                    tracing::warn!("stopping the {role:?} of {vm}: {why}");
                    match role {
                        // A superseded primary is fenced at once, not asked.
                        ProcRole::Primary => p.kill(),
                        ProcRole::Backup => p.stop(Duration::from_secs(5)),
                    }
                    self.procs.remove(&(vm, role));
                }
                Ok(())
            }
        }
    }

    fn start_backup(&mut self, spec: &VmSpec, min_term: u64) -> anyhow::Result<()> {
        let dir = self.vm_dir(&spec.name)?;
        let control = dir.join("backup.sock");
        let mut cmd = Command::new(&self.cfg.exe);
        cmd.args(["--log", "info", "backup", "--listen"])
            .arg(format!("{}:{}", self.cfg.repl_ip, spec.port))
            .arg("--image-dir")
            .arg(dir.join("image"))
            .arg("--certs")
            .arg(&self.cfg.certs)
            .args(["--host", &self.cfg.host, "--vm-id", &spec.name])
            .args(["--min-term", &min_term.to_string(), "--control"])
            .arg(&control);
        // Its data connection on the port after the spec's (known to firewalls and to the
        // chaos suite's link faults), not on a random one.
        match spec.data_port() {
            Some(p) => cmd.args(["--data-ports", &p.to_string()]),
            None => cmd.args(["--data-sockets", "0"]),
        };
        let key = (spec.name.clone(), ProcRole::Backup);
        let p = Proc::spawn(
            &spec.name,
            ProcRole::Backup,
            cmd,
            control,
            &dir.join("backup.log"),
            // (Started with this lowest term: until its first status says so, it is not
            // taken for an older backup to fence, a request its socket could not answer yet.)
            min_term,
        )?;
        self.procs.insert(key.clone(), p);
        self.place(&key);
        Ok(())
    }

    fn start_primary(
        &mut self,
        spec: &VmSpec,
        term: u64,
        backups: &[BackupTarget],
        from_image: bool,
    ) -> anyhow::Result<()> {
        let dir = self.vm_dir(&spec.name)?;
        let control = dir.join("primary.sock");
        let mut cmd = Command::new(&self.cfg.exe);
        cmd.args(["--log", "info", "primary", "--tap", &self.cfg.tap]);
        if from_image {
            cmd.arg("--from-image").arg(dir.join("image"));
            cmd.arg("--disk")
                .arg(dir.join(format!("disk-term{term}.img")));
        } else {
            once(&dir, "boot-term", term)?;
            let disk = dir.join("disk.img");
            let f = std::fs::File::create(&disk)?;
            f.set_len(spec.disk_mib << 20)?;
            cmd.arg("--guest")
                .arg(&self.cfg.guest)
                .arg("--disk")
                .arg(&disk);
            cmd.args([
                "--mem-mib",
                &spec.mem_mib.to_string(),
                "--guest-config",
                &spec.guest_config,
            ]);
            // A MAC of its own (from its address): two VMs of a cluster on one LAN.
            if let Some(ip) = crate::clone::identity::ip_of(&spec.guest_config) {
                let mac = crate::clone::identity::primary_mac_for(ip);
                cmd.args(["--mac", &crate::clone::identity::mac_string(&mac)]);
            }
        }
        for b in backups {
            cmd.arg("--backup").arg(format!("{}@{}", b.host, b.addr));
        }
        // The manager's grant: a primary of a new term serves before a backup holds it (the
        // VM is shown unprotected until one does).
        cmd.arg("--unprotected-start");
        cmd.arg("--certs").arg(&self.cfg.certs);
        cmd.args([
            "--host",
            &self.cfg.host,
            "--vm-id",
            &spec.name,
            "--term",
            &term.to_string(),
        ]);
        cmd.arg("--control").arg(&control);
        cmd.arg("--console-log")
            .arg(dir.join(format!("console-term{term}.log")));
        cmd.args(&self.cfg.primary_flags);
        let key = (spec.name.clone(), ProcRole::Primary);
        let mut p = Proc::spawn(
            &spec.name,
            ProcRole::Primary,
            cmd,
            control,
            &dir.join("primary.log"),
            term,
        )?;
        p.backup_hosts = backups.iter().map(|b| b.host.clone()).collect();
        // The process runs: it is tracked whatever happens next.
        if let Err(e) = p.save_record(backups) {
            tracing::warn!("recording the primary of {}: {e}", spec.name);
        }
        self.procs.insert(key.clone(), p);
        self.place(&key);
        let ap = self.applied.entry(spec.name.clone()).or_default();
        ap.backups = Some(backups.to_vec());
        Ok(())
    }

    /// The backup here persists the new term and finalizes its image, then a primary of that
    /// term starts from the image.
    fn promote(
        &mut self,
        spec: &VmSpec,
        term: u64,
        backups: &[BackupTarget],
    ) -> anyhow::Result<()> {
        self.applied.entry(spec.name.clone()).or_default().promoting = Some(term);
        // The image becomes the new primary's starting point once: a second promotion at the
        // same term (after this host restarted, say) would fork a history whose first primary
        // may have released output.
        once(&self.vm_dir(&spec.name)?, "promote-term", term)?;
        self.unstarted.remove(&spec.name);
        if self.cfg.crash_at.as_deref() == Some(CRASH_AFTER_PROMOTE_MARKER) {
            tracing::error!("test hook: crashing after the promotion's marker, as a host would");
            std::process::abort();
        }
        let key = (spec.name.clone(), ProcRole::Backup);
        if let Some(mut b) = self.procs.remove(&key) {
            if b.alive() {
                match b.client(Duration::from_secs(30)).promote(term) {
                    Ok(a) => tracing::info!(
                        "backup of {} promoting: image at checkpoint {}",
                        spec.name,
                        a.checkpoint
                    ),
                    Err(e) => {
                        tracing::warn!("promote request to the backup of {}: {e:#}", spec.name)
                    }
                }
                if !b.wait_exit(Duration::from_secs(30)) {
                    tracing::warn!("the backup of {} did not finish; killing it", spec.name);
                    b.kill();
                }
            }
        }
        self.start_primary(spec, term, backups, true)
    }
}

/// A primary of a term starts at most once on a host, booted (`boot-term`) or promoted from
/// the image (`promote-term`): a marker, written and synced before the process starts, says
/// it did, and a second start of the same term — after the first one ran and died unseen by
/// the manager, say — is refused rather than silently starting the service over from an empty
/// disk or an older state.
fn once(dir: &std::path::Path, what: &str, term: u64) -> anyhow::Result<()> {
    let marker = dir.join(what);
    if let Ok(t) = std::fs::read_to_string(&marker) {
        if t.trim().parse::<u64>().is_ok_and(|t| t >= term) {
            anyhow::bail!(
                "refusing to start term {term} again: this host started term {} before ({})",
                t.trim(),
                marker.display()
            );
        }
    }
    let tmp = dir.join(format!("{what}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, format!("{term}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &marker)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The term of a promotion on this host whose guest never ran, from the VM directory's files:
/// the `promote-term` marker (written before the promoted primary starts) names it, and the
/// image it was to start from is still whole (see [`image_never_ran`]).
fn unstarted_promotion(dir: &Path) -> Option<u64> {
    let term = read_marker(dir, "promote-term")?;
    image_never_ran(dir, term).then_some(term)
}

/// Whether the primary of `term` promoted on this host never ran its guest: the marker names
/// that term, and the image is still an unconsumed replica image committed by an older term (a
/// new primary consumes it, durably, right before its guest's first instruction:
/// `crate::restore::restore_dir`). Anything unreadable counts as "it may have run".
fn image_never_ran(dir: &Path, term: u64) -> bool {
    let image = dir.join("image");
    read_marker(dir, "promote-term") == Some(term)
        && backup::image::consumed(&image).is_none()
        && backup::image::read_meta(&image).is_ok_and(|m| m.term < term && !m.syncing())
}

fn read_marker(dir: &Path, what: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(what))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `PUT /backups` body: `name@addr` each (empty: none).
fn backup_list(b: &[BackupTarget]) -> Vec<String> {
    b.iter().map(|t| format!("{}@{}", t.host, t.addr)).collect()
}
