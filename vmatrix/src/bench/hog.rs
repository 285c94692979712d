//! `vmatrix bench replication --hog-vm CPUS`: a protected VM's checkpoint pauses beside a
//! CPU-hog *VM* (issue 12, "Virtual Services"): a second guest (`vmatrix run`, its own tap)
//! spinning in CHURN, in a cgroup of its own (`crate::cgroup`, as the agent makes them). Each
//! round measures the protected VM three ways, alternating: the hog stopped (SIGSTOP: the
//! baseline), the hog running without a limit, the hog capped at CPUS. The same host, the same
//! minutes; the ratio capped/baseline is the figure ("moves a neighbour's pause p99 by less
//! than 20 %").

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use failover::limits::Limits;
use rustix::process::{kill_process, Pid, Signal};

use super::busy::rows;
use super::harness::{BenchEnv, Kv, Protection};
use super::replication::Timing;
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

/// Runs the hog-VM A/B/C and prints a Markdown table.
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
         MiB protected guest, 20 ms epochs, `--rt-pause {}`; the hog: a 64 MiB guest \
         spinning in CHURN, in a cgroup of its own; {}-CPU host)\n",
        env.mem_mib,
        rt_pause.name(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| round | hog | workload | pause p50 | pause p99 | pause max | checkpoints/s |");
    println!("|---:|---|---|---:|---:|---:|---:|");
    let mut hog = HogVm::start(&env.guest)?;
    let capped = Limits {
        cpu_millis: cap_millis,
        ..Default::default()
    };
    let workloads = [("idle", "CHURN 0 0"), ("CHURN 1k pages/s", "CHURN 2048 1")];
    for r in 1..=rounds {
        let conditions = [
            ("stopped", None),
            ("no limit", Some(Limits::default())),
            ("capped", Some(capped)),
        ];
        for (label, limits) in conditions {
            match limits {
                None => hog.signal(Signal::STOP)?,
                Some(l) => {
                    hog.group.set(&l, None)?;
                    hog.signal(Signal::CONT)?;
                }
            }
            let label = match label {
                "capped" => format!("capped at {cpus} CPU"),
                l => l.to_string(),
            };
            rows(
                env,
                t,
                (r, "hogbench", &label),
                Protection {
                    rt_pause,
                    ..Protection::default()
                },
                &workloads,
            )?;
        }
        let u = hog.group.usage();
        eprintln!(
            "round {r}: hog throttled {} ms so far",
            u.throttled_us / 1000
        );
    }
    Ok(())
}
