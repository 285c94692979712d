//! `vmatrix bench replication --hog-vm CPUS`: a protected VM's checkpoint pauses beside a
//! CPU-hog *VM* (issue 12, "Virtual Services"): a second guest (`vmatrix run`, its own tap)
//! spinning in CHURN, in a cgroup of its own (`crate::cgroup`, as the agent makes them). Each
//! round measures the protected VM three ways, alternating: the hog stopped (SIGSTOP: the
//! baseline), the hog running without a limit, the hog capped at CPUS. The same host, the same
//! minutes; the ratio capped/baseline is the figure ("moves a neighbour's pause p99 by less
//! than 20 %").
//!
//! Each condition gets a protected VM of its own, warmed up before it is measured, as a
//! protected service lives beside a neighbour: `--rt-pause auto` has learned the host as it
//! is, and no condition inherits what it learned beside another; the conditions' order
//! rotates from round to round. The pooled table takes the p99 of every round's pauses of a
//! condition together (a row's own p99 of ~200 pauses is its third-longest pause). Until
//! 2026-12-05 each row started a VM of its own and measured at once (`auto`'s first seconds);
//! a first fix that kept one VM for the whole run let a boost learned beside the hog carry
//! into the stopped rows.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use failover::limits::Limits;
use rustix::process::{kill_process, Pid, Signal};

use super::harness::{BenchEnv, Kv, Protection, RunningVm};
use super::pauses::{collect, quantile, Pool};
use super::replication::{wait_protected, Timing};
use crate::cgroup::{Cgroups, Group, RtBudget};

/// The hog VM: its process, environment (tap, files) and group; killed on drop.
struct HogVm {
    child: Child,
    group: Group,
    cg: Cgroups,
    _env: BenchEnv,
}

impl HogVm {
    fn start(guest: &std::path::Path) -> anyhow::Result<HogVm> {
        let env = BenchEnv::new(guest.to_path_buf(), 64)?;
        let disk = env.dir.join("hog.img");
        std::fs::File::create(&disk)?.set_len(16 << 20)?;
        let exe = std::env::current_exe().context("locating the vmatrix binary")?;
        let cfg = format!("ip=10.78.{0}.2/24,gw=10.78.{0}.1,port=7000", env.index);
        let mut child = Command::new(exe)
            .args(["run", "--guest"])
            .arg(&env.guest)
            .arg("--disk")
            .arg(&disk)
            .args(["--tap", &env.tap, "--mem-mib", "64", "--guest-config", &cfg])
            .args(["--mac", "02:78:0a:4e:00:99"])
            .arg("--console-log")
            .arg(env.dir.join("hog.console"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the hog VM (vmatrix run)")?;
        let placed = Self::confine(&env, child.id()).and_then(|(cg, group)| {
            let mut kv = Kv::connect(env.guest_addr(), Duration::from_secs(30))?;
            let r = kv.cmd("CHURN 256 10000000")?;
            anyhow::ensure!(r == "OK", "the hog refused CHURN: {r}");
            Ok((cg, group))
        });
        match placed {
            Ok((cg, group)) => Ok(HogVm {
                child,
                group,
                cg,
                _env: env,
            }),
            Err(e) => {
                // Never a spinning VM left behind.
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The hog's own group (and the bench's base group).
    fn confine(env: &BenchEnv, pid: u32) -> anyhow::Result<(Cgroups, Group)> {
        let name = format!("vmatrix-bench-{}", std::process::id());
        let rt = RtBudget {
            total_us: 0,
            vm_us: 0,
        };
        let cg = Cgroups::detect(&name, rt, &env.dir.join("cgroup"))
            .context("cgroups for the hog VM")?;
        let group = cg.group("hog")?;
        group.add(pid)?;
        Ok((cg, group))
    }

    fn signal(&self, s: Signal) -> anyhow::Result<()> {
        let pid = Pid::from_raw(self.child.id() as i32).context("hog pid")?;
        kill_process(pid, s).context("signalling the hog")?;
        Ok(())
    }
}

impl Drop for HogVm {
    fn drop(&mut self) {
        let _ = self.signal(Signal::CONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.cg.remove("hog");
        let _ = self.cg.remove_base();
    }
}

/// The hog's three conditions: label, limits (`None`: stopped).
fn conditions(cap_millis: u32) -> [(String, Option<Limits>); 3] {
    let capped = Limits {
        cpu_millis: cap_millis,
        ..Default::default()
    };
    let cpus = f64::from(cap_millis) / 1000.0;
    [
        ("stopped".to_string(), None),
        ("no limit".to_string(), Some(Limits::default())),
        (format!("capped at {cpus} CPU"), Some(capped)),
    ]
}

/// The protected guest's workloads: label, CHURN command.
const WORKLOADS: [(&str, &str); 2] = [("idle", "CHURN 0 0"), ("CHURN 1k pages/s", "CHURN 2048 1")];

/// Runs the hog-VM A/B/C and prints two Markdown tables: each round's rows, then the pauses
/// of every round pooled per condition, with the unlimited and capped p99 over the stopped.
///
/// Each condition gets a protected VM of its own, started once the hog is in that condition
/// and warmed up for twice a measurement before its rows (so `--rt-pause auto` has learned
/// the host as it is: the rows are a long-lived service's, not its first seconds, and no
/// condition inherits a boost learned beside another); the conditions' order rotates from
/// round to round.
pub fn run(
    env: &BenchEnv,
    t: &Timing,
    cap_millis: u32,
    rounds: usize,
    rt_pause: vmm::rt::RtMode,
) -> anyhow::Result<()> {
    let cpus = f64::from(cap_millis) / 1000.0;
    println!(
        "## A CPU-hog VM beside a protected one (`vmatrix bench replication --hog-vm {cpus}`; {} \
         MiB protected guest, 20 ms epochs, `--rt-pause {}`, a protected VM per condition, \
         warmed up {:.1} s; the hog: a 64 MiB guest spinning in CHURN, in a cgroup of its own; \
         {}-CPU host)\n",
        env.mem_mib,
        rt_pause.name(),
        (t.measure * 2).as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| round | hog | workload | pause p50 | pause p99 | pause max | checkpoints/s | boosted |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    let mut hog = HogVm::start(&env.guest)?;
    let conds = conditions(cap_millis);
    let labels = conds.iter().map(|c| c.0.clone()).collect();
    let mut pool = Pool::new(labels, &WORKLOADS.map(|w| w.0));
    for r in 1..=rounds {
        for k in 0..conds.len() {
            let c = (k + r - 1) % conds.len();
            let (label, limits) = &conds[c];
            match limits {
                None => hog.signal(Signal::STOP)?,
                Some(l) => {
                    hog.group.set(l, None)?;
                    hog.signal(Signal::CONT)?;
                }
            }
            pool.add(c, condition(env, t, rt_pause, (r, label))?);
        }
        let u = hog.group.usage();
        eprintln!(
            "round {r}: hog throttled {} ms so far",
            u.throttled_us / 1000
        );
    }
    // The baseline: the hog stopped (no limits).
    let stopped = conds.iter().position(|c| c.1.is_none()).unwrap_or(0);
    pool.print(rounds, "hog", Some((stopped, "stopped")));
    Ok(())
}

/// One condition of round `r`: a protected VM started, warmed up, and measured under each
/// workload (a row each); the pauses of each workload.
fn condition(
    env: &BenchEnv,
    t: &Timing,
    rt_pause: vmm::rt::RtMode,
    (r, label): (usize, &str),
) -> anyhow::Result<Vec<Vec<u32>>> {
    let p = Protection {
        rt_pause,
        min_epoch_us: 20_000,
        early_checkpoints: false,
        ..Protection::default()
    };
    let vm = RunningVm::protected(env, "hogbench", p)?;
    let stats = vm.stats.clone().context("protected VM without stats")?;
    let mut kv = Kv::connect(env.guest_addr(), Duration::from_secs(30))?;
    wait_protected(&stats)?;
    std::thread::sleep(t.measure * 2);
    let mut out = Vec::new();
    for (name, churn) in WORKLOADS {
        anyhow::ensure!(kv.cmd(churn)? == "OK", "{churn} refused");
        std::thread::sleep(t.settle);
        let b0 = vm.vm.rt_counts().0;
        let (mut v, rate) = collect(&stats, t.measure);
        let boosted = vm.vm.rt_counts().0 - b0;
        let share = 100.0 * boosted as f64 / v.len().max(1) as f64;
        let (p50, p99) = (quantile(&mut v, 0.5), quantile(&mut v, 0.99));
        let max = v.last().copied().unwrap_or(0);
        println!(
            "| {r} | {label} | {name} | {p50} µs | {p99} µs | {max} µs | {rate:.0} | {share:.0} % |"
        );
        out.push(v);
    }
    Ok(out)
}
