//! `vmatrix vm limits` and the limit flags of `vm create`: a VM's resource limits through the
//! manager's API (`PUT /v1/vms/{name}/limits`, docs/limits.md), and the table of its
//! processes' use of them.

use std::process::ExitCode;

use clap::Args;
use failover::limits::Limits;
use failover::manager::VmView;

use super::cli::{Client, ManagerOpt};

/// Resource limits of each process of a VM (primary, backups, clones).
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// CPU bandwidth in CPUs, e.g. 0.5 or 2 (0: unlimited).
    #[arg(long, value_parser = parse_cpus)]
    pub cpu: Option<u32>,
    /// CPU weight against other groups when CPUs are contended, 1..=10000 (100: default).
    #[arg(long)]
    pub cpu_weight: Option<u32>,
    /// Memory of each process (guest RAM, VMM, buffers), MiB (0: unlimited).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Disk reads, bytes per second (0: unlimited).
    #[arg(long)]
    pub io_read_bps: Option<u64>,
    /// Disk writes, bytes per second (0: unlimited).
    #[arg(long)]
    pub io_write_bps: Option<u64>,
}

impl LimitArgs {
    /// `base` with the flags given.
    pub fn over(&self, base: Limits) -> Limits {
        Limits {
            cpu_millis: self.cpu.unwrap_or(base.cpu_millis),
            cpu_weight: self.cpu_weight.unwrap_or(base.cpu_weight),
            memory_mib: self.memory_mib.unwrap_or(base.memory_mib),
            io_read_bps: self.io_read_bps.unwrap_or(base.io_read_bps),
            io_write_bps: self.io_write_bps.unwrap_or(base.io_write_bps),
        }
    }

    /// Whether any flag was given.
    pub fn any(&self) -> bool {
        self.cpu.is_some()
            || self.cpu_weight.is_some()
            || self.memory_mib.is_some()
            || self.io_read_bps.is_some()
            || self.io_write_bps.is_some()
    }
}

/// Flags of `vm limits`.
#[derive(Args, Debug)]
pub struct LimitsCmd {
    /// The VM.
    pub name: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Remove every limit.
    #[arg(long)]
    pub clear: bool,
    #[command(flatten)]
    pub m: ManagerOpt,
}

/// CPUs ("0.5", "2") as thousandths of a CPU.
fn parse_cpus(s: &str) -> Result<u32, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of CPUs (0.5, 2)"))?;
    if !(v.is_finite() && (v == 0.0 || (0.01..=1000.0).contains(&v))) {
        return Err(format!(
            "'{s}' is not 0 (no limit) or between 0.01 and 1000 CPUs"
        ));
    }
    Ok((v * 1000.0).round() as u32)
}

/// Runs `vm limits`: with flags (or `--clear`) sets them (the flags not given keep their
/// values), then prints the limits and each process's use.
pub fn run(c: LimitsCmd) -> anyhow::Result<ExitCode> {
    let client = Client::new(&c.m)?;
    let mut v: VmView = client.get(&format!("/v1/vms/{}", c.name))?;
    if c.clear || c.limits.any() {
        let base = if c.clear { Limits::default() } else { v.limits };
        let body = serde_json::to_value(c.limits.over(base))?;
        let text = client.call("PUT", &format!("/v1/vms/{}/limits", c.name), Some(body))?;
        v = serde_json::from_str(&text)?;
    }
    print!("{}", usage_table(&v));
    Ok(ExitCode::SUCCESS)
}

/// "limits: …" then one row per process: host, process, CPU, throttled, memory, OOM kills.
pub fn usage_table(v: &VmView) -> String {
    let mut out = format!("{}: limits: {}\n", v.spec.name, v.limits);
    if v.usage.is_empty() {
        out.push_str("(no process reported yet)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = v
        .usage
        .iter()
        .map(|u| {
            let x = &u.usage;
            let mem = match x.mem_limit_bytes {
                0 => format!("{} MiB", x.mem_bytes >> 20),
                l => format!("{}/{} MiB", x.mem_bytes >> 20, l >> 20),
            };
            vec![
                u.host.clone(),
                u.process.clone(),
                format!("{:.2}", f64::from(x.cpu_millis) / 1000.0),
                format!("{} ms", x.throttled_us / 1000),
                mem,
                x.oom_kills.to_string(),
                if x.error.is_empty() {
                    "-".into()
                } else {
                    x.error.clone()
                },
            ]
        })
        .collect();
    let head = [
        "HOST",
        "PROCESS",
        "CPUS",
        "THROTTLED",
        "MEMORY",
        "OOM_KILLS",
        "ERROR",
    ];
    out.push_str(&super::cli::table(&head, &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_and_flags() {
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2000));
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("0.004").is_err(), "not silently unlimited");
        assert_eq!(parse_cpus("0"), Ok(0));
        assert!(parse_cpus("lots").is_err());
        let base = Limits {
            cpu_millis: 250,
            memory_mib: 300,
            ..Default::default()
        };
        let a = LimitArgs {
            cpu: Some(0),
            io_write_bps: Some(1 << 20),
            ..Default::default()
        };
        assert!(a.any());
        assert_eq!(
            a.over(base),
            Limits {
                cpu_millis: 0,
                memory_mib: 300,
                io_write_bps: 1 << 20,
                ..Default::default()
            }
        );
        assert!(!LimitArgs::default().any());
    }
}
