//! `vmatrix primary` and `vmatrix backup`: continuous replication of a running VM. Their
//! flags and what they share live here; the commands in [`primary`] and [`backup`], each with
//! the control requests the failover agent drives them by (docs/replication.md, "Control by
//! the agent").

mod backup;
mod handover;
mod primary;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use transport::QuicConfig;

use crate::run::RunArgs;

pub use self::backup::backup_main;
pub use self::primary::primary_main;

/// Flags of `vmatrix primary`.
#[derive(Args, Debug)]
pub struct PrimaryArgs {
    /// The VM, as for `vmatrix run` (with --from-image: --tap, --disk as the working disk,
    /// --console-log and --control only).
    #[command(flatten)]
    pub run: RunArgs,
    /// Start the VM from a snapshot or a backup's replica image directory (finalized first, and
    /// locked while this primary runs from it) instead of booting the guest, as `vmatrix
    /// restore` does; --disk is then the working disk to create (default <dir>/disk-live.img).
    #[arg(long, conflicts_with_all = ["guest", "mem_mib", "guest_config", "config", "mac"])]
    pub from_image: Option<PathBuf>,
    /// Run without holding guest output until the first replication session starts its
    /// initial sync (the failover manager's grant to run unprotected); from then on output is
    /// held until acknowledged. With it, --backup may be left out: the VM runs unprotected and
    /// backups are added later (`PUT /backups`: `vmatrix ctl <socket> backups ...`).
    #[arg(long)]
    pub unprotected_start: bool,
    /// Backup address, `host:port` or `name@host:port` (name = host name in its certificate,
    /// default "backup"). Repeat for several backups.
    #[arg(long, required_unless_present = "unprotected_start", value_parser = parse_backup)]
    pub backup: Vec<(SocketAddr, String)>,
    /// Backups that must acknowledge before output is released: "all" or a number.
    #[arg(long, default_value = "all")]
    pub required: String,
    /// Certificate directory (from `vmatrix certs init/issue`).
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's name (picks <certs>/<host>.pem).
    #[arg(long)]
    pub host: String,
    /// Epoch length in milliseconds (1..=1000); the loop adapts it within
    /// [--min-epoch-ms, --max-output-delay-ms].
    #[arg(long, default_value_t = 20)]
    pub epoch_ms: u64,
    /// Shortest adaptive epoch, ms.
    #[arg(long, default_value_t = 10)]
    pub min_epoch_ms: u64,
    /// Longest adaptive epoch, ms: the cap on how long guest output waits for its checkpoint.
    #[arg(long, default_value_t = 200)]
    pub max_output_delay_ms: u64,
    /// Cluster id shared by primary and backup.
    #[arg(long, default_value_t = 1)]
    pub cluster_id: u64,
    /// VM id shared by primary and backup.
    #[arg(long, default_value = "vm")]
    pub vm_id: String,
    /// Data streams (per connection).
    #[arg(long, default_value_t = 2)]
    pub lanes: u8,
    /// Spread the data streams over the extra connections a backup offers (`--data-sockets`
    /// on the backup): each reaches a socket, and a receive path, of its own there.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub data_connections: bool,
    /// Copy a busy epoch's dirty pages while the guest runs, a quarter of an epoch before
    /// its pause (after an epoch of 256 pages or more), so the pause copies only those
    /// dirtied since.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub epoch_precopy: bool,
    /// QUIC idle timeout (failure detection), ms.
    #[arg(long, default_value_t = 1000)]
    pub idle_timeout_ms: u64,
    /// Serve Prometheus metrics (text format) over HTTP on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// End an epoch as soon as guest output waits for a checkpoint (replies wait ~1 pause and
    /// one round trip instead of the rest of the epoch). On by default; `--early-checkpoints
    /// false` gives fixed (adaptive-length) epochs only.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub early_checkpoints: bool,
    /// Most pre-copy rounds of the initial sync (memory copied while the guest runs, then one
    /// short pause); 0 = copy everything in one pause.
    #[arg(long, default_value_t = 8)]
    pub precopy_rounds: u32,
    /// This primary's term (the failover manager grants it; by hand: higher than any earlier
    /// primary of this VM). A backup refuses a primary whose term is lower than its image's.
    #[arg(long, default_value_t = 1)]
    pub term: u64,
    /// Drop a backup whose window has been full this long (ms) while more than --required
    /// others keep up; it rejoins by quick resync.
    #[arg(long, default_value_t = 1000)]
    pub drop_after_ms: u64,
    /// When a checkpoint's pause runs at real-time priority (the vCPU thread and the capturing
    /// thread SCHED_FIFO from the pause request to the resume, ordinary threads otherwise), so
    /// a pause does not wait for a busy neighbour's time slice: `auto` once pauses are seen
    /// waiting for the scheduler (for 4 s at a time; the boost costs a busy service some
    /// throughput), `on` every pause, `off` never (docs/replication.md). Needs CAP_SYS_NICE;
    /// skipped (said once) without it.
    #[arg(
        long,
        value_name = "auto|on|off",
        default_value = "auto",
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    pub rt_pause: vmm::rt::RtMode,
    /// Pin the vCPU thread to these CPUs (a list as `taskset -c` takes: `1`, `2-3,6`); off by
    /// default (on this 2-CPU host pinning did not help pauses beside a busy neighbour;
    /// docs/BENCHMARKS.md, "Pinned pause threads").
    #[arg(long, value_parser = crate::replicate::cpu_list)]
    pub vcpu_cpus: Option<CpuList>,
    /// Pin the replication loop's threads (its runtime: the epoch loop, QUIC, the blocking
    /// pool) to these CPUs; off by default.
    #[arg(long, value_parser = crate::replicate::cpu_list)]
    pub loop_cpus: Option<CpuList>,
    /// Lock the page buffers each pause copies into in RAM (mlock), so a pause never faults on
    /// one the host reclaimed; needs RLIMIT_MEMLOCK room (root has it). Locked memory counts
    /// against the VM's cgroup memory limit like any other.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub lock_buffers: bool,
    /// Where the vCPU's dirty pages come from: `bitmap` (KVM_GET_DIRTY_LOG with hot pages:
    /// cheaper for a guest that rewrites the same pages every epoch) or `ring` (KVM's dirty
    /// ring where it has one: a harvest costs what was dirtied, not what the guest's size is;
    /// the bitmap where it has none). Reported in `status`.
    #[arg(long, value_enum, default_value = "bitmap")]
    pub dirty_source: DirtySource,
    /// The dirty ring's size, bytes (a power of two, at least 16384; KVM's largest if smaller).
    #[arg(long, default_value_t = 1 << 20)]
    pub dirty_ring_bytes: u32,
}

/// `--dirty-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirtySource {
    /// KVM_GET_DIRTY_LOG, manual protection, hot pages.
    Bitmap,
    /// KVM's dirty ring (the bitmap where KVM has none).
    Ring,
}

/// Flags of `vmatrix backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Refuse primaries of a term below this one from the start (persisted with the image,
    /// as `ctl fence` does; the agent starts a backup of a term-N VM with N).
    #[arg(long, default_value_t = 0)]
    pub min_term: u64,
    /// Replica image directory (a snapshot of the last committed checkpoint after stop). An
    /// image already there is kept and brought up to date (quick resync or full sync).
    #[arg(long)]
    pub image_dir: PathBuf,
    /// Certificate directory.
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's name.
    #[arg(long)]
    pub host: String,
    /// Cluster id.
    #[arg(long, default_value_t = 1)]
    pub cluster_id: u64,
    /// VM id.
    #[arg(long, default_value = "vm")]
    pub vm_id: String,
    /// QUIC idle timeout (failure detection), ms. A primary that says nothing for 3 s (or three
    /// times this if shorter, at least 1.5 s) is disconnected.
    #[arg(long, default_value_t = 1000)]
    pub idle_timeout_ms: u64,
    /// Longest time an incoming handshake (mutual TLS) may take, ms; handshakes run
    /// concurrently, so abandoned ones never delay a real primary.
    #[arg(long, default_value_t = 2000)]
    pub handshake_timeout_ms: u64,
    /// Extra sockets (any free port on the listening address) offered to a primary for data
    /// connections: each brings a receive path of its own (0: none; at most 8). A firewall
    /// must let them through like the listening port, or the primary goes on without them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=8))]
    pub data_sockets: u8,
    /// The data sockets' ports, instead of `--data-sockets` free ones (`--data-ports
    /// 7101,7102`, at most 8: for firewall rules and link faults that name ports).
    #[arg(long, value_delimiter = ',', conflicts_with = "data_sockets")]
    pub data_ports: Vec<u16>,
    /// Serve the control API on this Unix socket: `GET /status`, `PUT /stop`, `PUT /fence`,
    /// `PUT /promote` (`vmatrix ctl <socket> status|stop|fence|promote`).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Pin the apply path's threads (its runtime: QUIC, the journal, the apply, the blocking
    /// pool) to these CPUs; off by default.
    #[arg(long, value_parser = crate::replicate::cpu_list)]
    pub apply_cpus: Option<CpuList>,
    /// Run the apply path's threads at real-time priority (`SCHED_FIFO` 1), so that a
    /// checkpoint is journaled and acknowledged without waiting for the scheduler on a busy
    /// host. Off by default (docs/BENCHMARKS.md, "The backup's apply path at real-time
    /// priority"): a full sync's apply then runs real-time too, bounded only by the kernel's
    /// real-time throttling.
    #[arg(long)]
    pub rt_apply: bool,
}

/// One backup: `host:port` or `name@host:port`.
fn parse_backup(s: &str) -> Result<(SocketAddr, String), String> {
    let (name, addr) = match s.split_once('@') {
        Some((n, a)) => (n.to_string(), a),
        None => ("backup".to_string(), s),
    };
    let addr = addr
        .parse()
        .map_err(|e| format!("'{addr}' is not host:port: {e}"))?;
    Ok((addr, name))
}

/// A set of backups (`name@host:port` or `host:port` each; empty: no backup); the same
/// address twice is refused.
fn parse_backup_set(items: &[String]) -> Result<Vec<(SocketAddr, String)>, String> {
    let mut out: Vec<(SocketAddr, String)> = Vec::new();
    for item in items.iter().map(|s| s.trim()) {
        let b = parse_backup(item)?;
        if out.iter().any(|o| o.0 == b.0) {
            return Err(format!("backup address {} given twice", b.0));
        }
        out.push(b);
    }
    Ok(out)
}

fn quic_config(idle_ms: u64) -> QuicConfig {
    QuicConfig {
        keep_alive_ms: (idle_ms / 5).max(10),
        idle_timeout_ms: idle_ms,
        ..QuicConfig::default()
    }
}

/// This host's certificates from the directory made by `vmatrix certs`.
fn load_identity(
    certs: &std::path::Path,
    host: &str,
) -> anyhow::Result<transport::certs::Identity> {
    transport::certs::load(certs, host)
        .with_context(|| format!("loading certificates of '{host}' from {}", certs.display()))
}

/// A `--vcpu-cpus`/`--loop-cpus` list (CPU numbers, ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses a `--vcpu-cpus`/`--loop-cpus` list.
fn cpu_list(s: &str) -> Result<CpuList, String> {
    vmm::affinity::parse_cpus(s).map(CpuList)
}

/// Refuses a CPU of `cpus` (given with `flag`) that this process may not run on.
fn check_cpus(flag: &str, cpus: Option<&CpuList>) -> anyhow::Result<()> {
    use anyhow::Context;
    let Some(cpus) = cpus else {
        return Ok(());
    };
    let allowed = vmm::affinity::cpus_of(0).context("reading this process's CPUs")?;
    if let Some(c) = cpus.0.iter().find(|c| !allowed.contains(c)) {
        anyhow::bail!("{flag}: CPU {c} is not one this process may run on ({allowed:?})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> Result<Vec<(SocketAddr, String)>, String> {
        parse_backup_set(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_backup_sets() {
        assert_eq!(set(&[]), Ok(Vec::new()));
        let l = set(&["b1@10.0.0.1:7100", " 10.0.0.2:7101"]).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0], ("10.0.0.1:7100".parse().unwrap(), "b1".to_string()));
        assert_eq!(l[1].1, "backup");
        assert!(set(&[""]).is_err());
        assert!(set(&["b@nowhere"]).is_err());
        assert!(set(&["a@10.0.0.1:1", "b@10.0.0.1:1"]).is_err());
    }
}
