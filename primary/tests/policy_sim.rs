//! Seeded simulations of the primary's policy in virtual time: a simulated guest (pages and a
//! disk written at random, output epochs), simulated backups (the real protocol `Receiver`, an
//! in-memory model of the backup's committed and side images with its rules: full syncs into a
//! side image promoted at the first checkpoint with state, incremental checkpoints and quick
//! resyncs on top of the committed image), and links that deliver frames after a delay and can
//! be cut. Faults: link cuts, backup crashes (the committed image survives, the side image does
//! not), backups that come back without their image (a full sync follows) and stalls.
//!
//! Now and then a capture reports that the disk write log overflowed (it carries the whole
//! disk): blocks the guest zeroed meanwhile must still reach the backups.
//!
//! Checked at every step:
//! - **Replica equals primary**: whenever a backup acknowledges checkpoint `seq`, its image is
//!   byte for byte the guest's memory and disk at that capture.
//! - **Output commit**: output epoch `e` is released only when `required` backups hold (commit
//!   durably) a checkpoint at least as new as the one that closed `e`.
//!
//! Then a liveness phase without faults: every backup must be in step, protected and close to
//! the guest again. Each run prints its seed; `VMATRIX_SEED=n` replays one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use primary::history::History;
use primary::policy::Join;
use primary::{Command, Policy, PolicyConfig, PrimaryState, Stats};
use protocol::message::{Kind, Position};
use protocol::page::{decode, EncodeOptions, PAGE};
use protocol::{Checkpoint, Receiver, ReceiverConfig};

mod sim_guest;
use sim_guest::{image_crc, Guest, Rng, DISK, PAGES, STEP};

#[derive(Clone)]
struct Image {
    pos: Option<Position>,
    mem: Vec<u8>,
    disk: Vec<u8>,
}

impl Image {
    fn zero() -> Self {
        Image {
            pos: None,
            mem: vec![0; PAGES * PAGE],
            disk: vec![0; DISK],
        }
    }

    fn apply(&mut self, cp: &Checkpoint) -> Result<(), String> {
        for (gfn, enc) in &cp.pages {
            let at = *gfn as usize * PAGE;
            let new =
                decode(*gfn, enc, Some(&self.mem[at..at + PAGE])).map_err(|e| e.to_string())?;
            self.mem[at..at + PAGE].copy_from_slice(&new);
        }
        for (off, data) in &cp.disk {
            let o = *off as usize;
            self.disk[o..o + data.len()].copy_from_slice(data);
        }
        Ok(())
    }
}

/// A simulated backup host.
struct Backup {
    up: bool,
    stalled_until: Option<Instant>,
    committed: Option<Image>,
    side: Option<Image>,
    rx: Option<Receiver>,
    first_of_session: bool,
    min_term: u64,
}

impl Backup {
    fn receiver(&self) -> Receiver {
        let mut c = ReceiverConfig::new(1, "vm");
        c.committed = self.committed.as_ref().and_then(|i| i.pos);
        c.min_term = self.min_term;
        Receiver::new(c)
    }

    /// Applies a checkpoint by the backup's rules; Ok(position now committed) or why not.
    fn apply(&mut self, cp: &Checkpoint, history: u64, term: u64) -> Result<(), String> {
        let opens = std::mem::replace(&mut self.first_of_session, false);
        let pos = Position {
            history,
            term,
            seq: cp.epoch,
        };
        let side = match cp.kind {
            Kind::Sync => true,
            Kind::PreCopy if opens || self.side.is_none() => {
                self.side = Some(Image::zero());
                true
            }
            Kind::PreCopy => true,
            Kind::Incremental => self.side.is_some(),
            Kind::Resync { .. } => false,
        };
        if cp.kind == Kind::Sync {
            self.side = Some(Image::zero());
        }
        if side {
            let img = self.side.as_mut().ok_or("no side image")?;
            img.apply(cp)?;
            if cp.state.is_some() {
                let mut img = self.side.take().ok_or("no side image")?;
                img.pos = Some(pos);
                self.committed = Some(img);
            }
            return Ok(());
        }
        let img = self.committed.as_mut().ok_or("no committed image")?;
        let at = img.pos.ok_or("image without position")?;
        let ok = at.history == history
            && at.term == term
            && match cp.kind {
                Kind::Resync { from } => from == at.seq && cp.epoch > from,
                _ => cp.epoch == at.seq + 1,
            };
        if !ok {
            return Err(format!(
                "{:?} {} does not apply at {at:?}",
                cp.kind, cp.epoch
            ));
        }
        img.apply(cp)?;
        img.pos = Some(pos);
        self.side = None;
        Ok(())
    }
}

/// A link: frames in flight each way, with the time they arrive.
#[derive(Default)]
struct Link {
    to_backup: VecDeque<(Instant, Vec<u8>)>,
    to_primary: VecDeque<(Instant, Vec<u8>)>,
}

struct Sim {
    rng: Rng,
    now: Instant,
    guest: Guest,
    backups: Vec<Backup>,
    links: Vec<Option<Link>>,
    /// Connections being made: (backup, when it answers).
    connecting: Vec<(usize, Instant)>,
    /// CRC of the guest at each consistent checkpoint, and the output epoch it closed.
    snapshots: BTreeMap<u64, (u32, u64)>,
    required: usize,
    latency: Duration,
    released: u64,
    resyncs: usize,
    /// Pre-copy passes (round 0 slices and later rounds).
    precopies: usize,
    precopy_epochs: usize,
    /// The primary stalled (its process stopped) and has released nothing since; the seq of
    /// the first checkpoint captured after it, once there is one.
    stalled: Option<Option<u64>>,
    /// Stalls with frames from a backup waiting in the primary's queues.
    stalls_with_waiting: usize,
    /// Steps where output started waiting while the VM's pause at output was armed.
    armed_outputs: usize,
    /// The session's counters (the policy's `Stats`).
    stats: Option<Arc<Stats>>,
}

impl Sim {
    fn new(seed: u64, n: usize, required: usize) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut guest = Guest {
            mem: vec![0; PAGES * PAGE],
            disk: vec![0; DISK],
            dirty: BTreeSet::new(),
            writes: Vec::new(),
            out_epoch: 0,
            pre: Default::default(),
        };
        for _ in 0..200 {
            guest.run(&mut rng);
        }
        Sim {
            latency: Duration::from_micros(100 + rng.below(900)),
            rng,
            now: Instant::now(),
            guest,
            backups: (0..n)
                .map(|_| Backup {
                    up: true,
                    stalled_until: None,
                    committed: None,
                    side: None,
                    rx: None,
                    first_of_session: true,
                    min_term: 0,
                })
                .collect(),
            links: (0..n).map(|_| None).collect(),
            connecting: Vec::new(),
            snapshots: BTreeMap::new(),
            required,
            released: 0,
            resyncs: 0,
            precopies: 0,
            precopy_epochs: 0,
            stalled: None,
            stalls_with_waiting: 0,
            armed_outputs: 0,
            stats: None,
        }
    }

    /// Executes the policy's commands.
    fn commands(&mut self, p: &mut Policy<'_>, next_seq: &dyn Fn(&Policy<'_>) -> u64) {
        while let Some(c) = p.poll_command() {
            match c {
                Command::Connect(i) => {
                    let t = self.now + Duration::from_millis(1 + self.rng.below(20));
                    self.connecting.push((i, t));
                }
                Command::PreCopy { slice, .. } => {
                    self.precopies += 1;
                    let cap = self.guest.precopy(slice);
                    p.handle_precopy(&cap, self.now);
                }
                Command::Capture { kind, disk_ranges } => {
                    let overflowed = self.rng.chance(20);
                    let cap = self.guest.capture(kind, &disk_ranges, overflowed);
                    let seq = next_seq(p);
                    self.snapshots.insert(seq, (self.guest.crc(), cap.epoch));
                    if let Some(first @ None) = &mut self.stalled {
                        *first = Some(seq);
                    }
                    p.handle_capture(&cap, self.now);
                }
                Command::PreCopyEpoch => {
                    self.precopy_epochs += 1;
                    self.guest.precopy_epoch();
                }
                Command::HoldOutput => {}
                Command::Release(e) => self.check_release(e),
                Command::Close(i) => self.cut(i),
                // Extra connections are transport: the simulated link is one.
                Command::OpenData { .. } => {}
            }
        }
    }

    /// Output commit: epoch `e` leaves only once `required` backups hold a checkpoint at least
    /// as new as the one that closed it.
    fn check_release(&mut self, e: u64) {
        assert!(e >= self.released, "releases go forward");
        if let Some(first) = self.stalled.take() {
            // After a stall, acknowledgements that waited through it release nothing: the
            // first release needs a checkpoint captured since, held by `required` backups.
            let first = first.expect("output released after a stall before any new checkpoint");
            let holding = self.holding(first);
            assert!(
                holding >= self.required,
                "output released after a stall while only {holding} backups hold checkpoint {first}, the first captured since"
            );
            // And the acknowledgement that released it is of that checkpoint or later.
            let acked = self
                .stats
                .as_ref()
                .map_or(0, |s| s.acked.load(Ordering::Relaxed));
            assert!(
                acked > first,
                "output released after a stall on acknowledgements up to {} only, before checkpoint {first}",
                acked as i64 - 1
            );
        }
        let s = self
            .snapshots
            .iter()
            .find(|(_, (_, closed))| *closed >= e)
            .map(|(s, _)| *s)
            .expect("a checkpoint closed the released epoch");
        let holding = self.holding(s);
        assert!(
            holding >= self.required,
            "output epoch {e} released while only {holding} backups hold checkpoint {s}"
        );
        self.released = e;
    }

    /// Backups whose committed image is at checkpoint `s` or later.
    fn holding(&self, s: u64) -> usize {
        self.backups
            .iter()
            .filter(|b| {
                b.committed
                    .as_ref()
                    .and_then(|i| i.pos)
                    .is_some_and(|p| p.seq >= s)
            })
            .count()
    }

    fn cut(&mut self, i: usize) {
        self.links[i] = None;
        self.backups[i].rx = None;
        self.backups[i].side = None;
    }

    fn step(&mut self, p: &mut Policy<'_>, history: u64) {
        self.now += STEP;
        self.guest.run(&mut self.rng);
        // The driver arms the VM's pause at output only where output that starts waiting is
        // captured at once: the pause never waits for a capture that the policy holds back.
        let armed = p.captures_on_output();
        let waiting = self.rng.chance(300);
        p.set_output_waiting(waiting);
        if armed && waiting {
            self.armed_outputs += 1;
            assert!(
                p.poll_timeout().is_some_and(|t| t <= self.now),
                "armed for a capture at output, but the policy waits ({:?})",
                p.phase
            );
        }
        // Connections answer.
        let now = self.now;
        let (done, rest): (Vec<_>, Vec<_>) = self.connecting.drain(..).partition(|c| c.1 <= now);
        self.connecting = rest;
        for (i, _) in done {
            let b = &mut self.backups[i];
            if !b.up || b.stalled_until.is_some_and(|t| t > now) {
                p.handle_connect_failed(i, "unreachable");
                continue;
            }
            b.rx = Some(b.receiver());
            b.first_of_session = true;
            b.side = None;
            self.links[i] = Some(Link::default());
            p.handle_connected(i, history, now);
        }
        for i in 0..self.backups.len() {
            self.deliver(p, i);
        }
        // As the real loop does: act while the policy says something is due — and a policy
        // that stays due without making progress is a busy loop.
        let mut turns = 0;
        while p.failed().is_none() && p.poll_timeout().is_some_and(|t| t <= self.now) {
            p.handle_timeout(self.now);
            self.commands(p, &|p: &Policy<'_>| p.next_seq());
            for i in 0..self.backups.len() {
                self.deliver(p, i);
            }
            turns += 1;
            assert!(
                turns < 100,
                "busy loop: the policy stays due at {:?} ({:?}); backups: {:?}",
                p.poll_timeout()
                    .map(|t| t.saturating_duration_since(self.now)),
                p.phase,
                p.backups
                    .iter()
                    .map(|b| (
                        b.alive(),
                        b.join,
                        b.acked,
                        b.sender.as_ref().map(|s| (
                            s.is_ready(),
                            s.in_flight(),
                            s.poll_timeout()
                                .map(|t| t.saturating_duration_since(self.now))
                        ))
                    ))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Moves frames over link `i` both ways, and lets backup `i` work.
    fn deliver(&mut self, p: &mut Policy<'_>, i: usize) {
        let now = self.now;
        if self.links[i].is_none() {
            return;
        }
        while let Some((_, f)) = p.poll_transmit(i, now) {
            if let Some(l) = self.links[i].as_mut() {
                l.to_backup.push_back((now + self.latency, f));
            }
        }
        let b = &mut self.backups[i];
        if b.stalled_until.is_some_and(|t| t > now) {
            return;
        }
        b.stalled_until = None;
        let Some(l) = self.links[i].as_mut() else {
            return;
        };
        while l.to_backup.front().is_some_and(|f| f.0 <= now) {
            let (_, f) = l.to_backup.pop_front().unwrap();
            let Some(mut r) = b.rx.take() else { break };
            let _ = r.handle_frame(now, &f);
            while let Some(cp) = r.poll_checkpoint() {
                let (h, t) = (r.history().unwrap_or(0), r.session().map_or(0, |s| s.1));
                match b.apply(&cp, h, t) {
                    Ok(()) => {
                        if let Some(img) = b.committed.as_ref().filter(|_| cp.state.is_some()) {
                            // Replica equals primary at the acknowledged checkpoint.
                            let want = self.snapshots.get(&cp.epoch).map(|s| s.0);
                            assert_eq!(
                                Some(image_crc(&img.mem, &img.disk)),
                                want,
                                "backup {i} at checkpoint {} ({:?}) differs from the guest",
                                cp.epoch,
                                cp.kind
                            );
                        }
                        if matches!(cp.kind, Kind::Resync { .. }) {
                            self.resyncs += 1;
                        }
                        r.ack(cp.epoch);
                    }
                    Err(e) => r.apply_failed(cp.epoch, &e),
                }
            }
            if let Some(t) = r.poll_timeout().filter(|t| *t <= now) {
                r.handle_timeout(t);
            }
            while let Some(out) = r.poll_transmit() {
                l.to_primary.push_back((now + self.latency, out));
            }
            b.rx = Some(r);
        }
        while l.to_primary.front().is_some_and(|f| f.0 <= now) {
            let (_, f) = l.to_primary.pop_front().unwrap();
            p.handle_frame(i, &f, now);
        }
    }

    /// A fault, chosen by the seed.
    fn fault(&mut self, p: &mut Policy<'_>) {
        let i = self.rng.below(self.backups.len() as u64) as usize;
        match self.rng.below(5) {
            0 => {
                // The link breaks: both ends notice.
                self.cut(i);
                p.handle_link_error(i, "link cut", self.now);
            }
            1 => {
                // The backup host crashes; it comes back later with its committed image.
                self.cut(i);
                self.backups[i].up = false;
                p.handle_link_error(i, "backup crashed", self.now);
            }
            2 => {
                // The backup host loses its disk: it comes back empty (a full sync follows).
                self.cut(i);
                self.backups[i].up = false;
                self.backups[i].committed = None;
                p.handle_link_error(i, "backup lost its image", self.now);
            }
            3 => {
                let d = Duration::from_millis(50 + self.rng.below(1500));
                self.backups[i].stalled_until = Some(self.now + d);
            }
            _ => {
                // The primary's process stops (SIGSTOP of its host) and is continued: time
                // passed, the backups' frames wait in its queues. Its stall clock tells the
                // policy before any of them (`primary::stall`); commands it gave before the stop
                // and not carried out yet (a release among them) are carried out after it.
                let d = Duration::from_millis(30 + self.rng.below(1000));
                let waiting = self
                    .links
                    .iter()
                    .flatten()
                    .any(|l| !l.to_primary.is_empty());
                self.stalls_with_waiting += usize::from(waiting);
                self.now += d;
                p.handle_stall(d);
                // (A second stall before a release: the first checkpoint after it counts.)
                self.stalled = Some(None);
            }
        }
    }
}

fn policy_config(n: usize, required: usize, rng: &mut Rng) -> PolicyConfig {
    PolicyConfig {
        backups: (0..n).map(|i| format!("backup{i}")).collect(),
        required,
        cluster_id: 1,
        vm_id: "vm".into(),
        term: 1,
        lanes: 2,
        window: [1, 2, 4][rng.below(3) as usize],
        idle_timeout: Duration::from_millis(600),
        epoch: (
            Duration::from_millis(5),
            Duration::from_millis(2),
            Duration::from_millis(50),
        ),
        early_checkpoints: rng.chance(500),
        precopy_rounds: [0, 1, 3, 8][rng.below(4) as usize],
        drop_after: Duration::from_millis(300),
        guest: (PAGES as u64, DISK as u64),
        // Round 0 in 4 slices.
        slice: (PAGES as u64 / 4, DISK as u64 / 4),
        data_connections: true,
        // (Epochs here dirty ~20 of 64 pages.)
        epoch_precopy: rng.chance(500).then_some(4),
    }
}

/// One seeded run: a fault phase, then a healthy phase that must converge.
/// Returns the early epoch copies, the stalls with frames waiting and the outputs that came
/// while the pause at output was armed.
fn run(seed: u64) -> (usize, usize, usize) {
    let n = 1 + (seed % 3) as usize;
    let required = 1 + (seed / 3 % n as u64) as usize;
    let mut sim = Sim::new(seed, n, required);
    let cfg = policy_config(n, required, &mut sim.rng);
    let history = History::new(0x5eed ^ seed, 1, (PAGES * PAGE) as u64);
    let id = history.id;
    let mut st = PrimaryState::with_history(history, EncodeOptions::default());
    let next_seq = |p: &Policy<'_>| p.next_seq();
    let faults_until = sim.now + Duration::from_secs(6);
    let end = faults_until + Duration::from_secs(6);
    let mut sessions = 0;
    while sim.now < end {
        sessions += 1;
        let stats = Arc::new(Stats::default());
        sim.stats = Some(stats.clone());
        let mut p = Policy::new(cfg.clone(), &mut st, stats, sim.now);
        while sim.now < end && p.failed().is_none() {
            sim.commands(&mut p, &next_seq);
            sim.step(&mut p, id);
            if sim.now < faults_until && sim.rng.chance(2) {
                sim.fault(&mut p);
            }
            for b in sim.backups.iter_mut().filter(|b| !b.up) {
                if sim.rng.chance(4) {
                    b.up = true;
                }
            }
            if sim.now >= faults_until {
                for b in sim.backups.iter_mut() {
                    b.up = true;
                }
            }
        }
        if let Some(why) = p.failed() {
            eprintln!("seed {seed}: session {sessions} ended: {why}");
            // As `vmatrix primary` does: a new session a moment later, same history.
            for i in 0..n {
                sim.cut(i);
            }
            // (A new session's connections carry nothing from before a stall.)
            sim.stalled = None;
            sim.now += Duration::from_millis(200);
            continue;
        }
        // Liveness: the healthy end of the run converged.
        let latest = p.next_seq();
        for (i, b) in p.backups.iter().enumerate() {
            assert!(
                b.alive() && b.join == Join::InStep,
                "seed {seed}: backup {i} is not in step at the end ({:?})",
                b.join
            );
            assert!(
                b.acked.is_some_and(|a| a + 20 >= latest),
                "seed {seed}: backup {i} acked {:?}, latest checkpoint {latest}",
                b.acked
            );
        }
        assert!(
            sim.guest.out_epoch - sim.released < 30,
            "seed {seed}: output released up to {} of {}",
            sim.released,
            sim.guest.out_epoch
        );
    }
    eprintln!(
        "seed {seed}: {n} backups, {required} required, {sessions} sessions, {} checkpoints, {} quick resyncs, {} pre-copy passes, {} early epoch copies, output released up to epoch {}",
        st.history.next_seq(),
        sim.resyncs,
        sim.precopies,
        sim.precopy_epochs,
        sim.released
    );
    (
        sim.precopy_epochs,
        sim.stalls_with_waiting,
        sim.armed_outputs,
    )
}

#[test]
fn seeded_faults_keep_replicas_exact_and_output_committed_then_converge() {
    let seeds: Vec<u64> = match std::env::var("VMATRIX_SEED") {
        Ok(s) => vec![s.parse().expect("VMATRIX_SEED is a number")],
        Err(_) => (1..=16).collect(),
    };
    let all = seeds.len() > 1;
    let (mut early, mut stalls, mut armed) = (0, 0, 0);
    for seed in seeds {
        eprintln!("policy simulation seed {seed} (replay: VMATRIX_SEED={seed})");
        let (e, s, a) = run(seed);
        early += e;
        stalls += s;
        armed += a;
    }
    assert!(!all || armed > 0, "some seeds arm the pause at output");
    assert!(!all || early > 0, "some seeds copy epochs early");
    assert!(
        !all || stalls > 0,
        "some seeds stall the primary with acknowledgements waiting"
    );
}
