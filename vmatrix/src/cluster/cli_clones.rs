//! `vmatrix vm scale|autoscale|load`: a VM's clones through the manager's API
//! (`PUT /v1/vms/{name}/clones`, `/autoscale`, `/load`; docs/clones.md, "Clones through the
//! manager" and "Autoscaling"), and the `CLONES` cell of `vm list`.

use std::process::ExitCode;

use anyhow::Context;
use failover::clones::AutoscaleSpec;
use failover::manager::{ScaleRequest, VmView};

use super::cli::{Client, VmCmd};

/// Parses a duration: `10s`, `500ms`, `2m` or plain milliseconds.
pub fn parse_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (10s, 500ms, 2m)"))?;
    if !(v.is_finite() && v >= 0.0 && v * f64::from(mul) <= 3_600_000.0) {
        return Err(format!("'{s}' is not a duration of at most one hour"));
    }
    Ok((v * f64::from(mul)) as u64)
}

/// `running/desired`, `auto` when the autoscaler decides, `+n draining` while scaled-down
/// clones drain on the load balancer (`-` without clones).
pub fn clones_cell(v: &VmView) -> String {
    let c = &v.clones;
    if c.desired == 0 && c.instances.is_empty() && c.autoscale.is_none() {
        return "-".into();
    }
    let running = c.instances.iter().filter(|i| i.state == "running").count();
    let draining = c.instances.iter().filter(|i| i.draining).count();
    let auto = if c.autoscale.is_some() { " auto" } else { "" };
    let drain = match draining {
        0 => String::new(),
        n => format!(" +{n} draining"),
    };
    format!("{running}/{}{auto}{drain}", c.desired)
}

/// Runs `vm scale`, `vm autoscale` or `vm load`.
pub fn run(c: VmCmd) -> anyhow::Result<ExitCode> {
    match c {
        VmCmd::Scale {
            name,
            clones,
            ip,
            warm,
            m,
        } => {
            let body = serde_json::to_value(ScaleRequest {
                count: clones,
                ip,
                warm,
            })?;
            let text =
                Client::new(&m)?.call("PUT", &format!("/v1/vms/{name}/clones"), Some(body))?;
            let v: VmView = serde_json::from_str(&text).context("the manager's answer")?;
            let placed: Vec<String> = v
                .clones
                .instances
                .iter()
                .map(|i| format!("{}@{} {}", i.name, i.host, i.ip))
                .collect();
            println!(
                "{name}: {} clones wanted; placed: [{}]",
                v.clones.desired,
                placed.join(", ")
            );
        }
        VmCmd::Autoscale {
            name,
            target,
            min,
            max,
            cooldown_up,
            cooldown_down,
            hysteresis,
            ip,
            off,
            m,
        } => {
            let spec = match (target, off) {
                (_, true) => None,
                (Some(target), false) => Some(AutoscaleSpec {
                    target,
                    min,
                    max,
                    up_cooldown_ms: cooldown_up,
                    down_cooldown_ms: cooldown_down,
                    hysteresis,
                }),
                (None, false) => anyhow::bail!("give --target (load per replica) or --off"),
            };
            let body = serde_json::json!({ "autoscale": spec, "ip": ip });
            Client::new(&m)?.call("PUT", &format!("/v1/vms/{name}/autoscale"), Some(body))?;
            match spec {
                Some(s) => println!(
                    "{name}: autoscaling {}..={} clones at {} per replica",
                    s.min, s.max, s.target
                ),
                None => println!("{name}: autoscaling off"),
            }
        }
        VmCmd::Load { name, load, m } => {
            let body = serde_json::json!({ "load": load });
            Client::new(&m)?.call("PUT", &format!("/v1/vms/{name}/load"), Some(body))?;
        }
        _ => anyhow::bail!("not a clone command"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clones_cell_counts_running_and_draining() {
        let mut v: VmView = serde_json::from_value(serde_json::json!({
            "spec": {"name": "web", "mem_mib": 64, "disk_mib": 16, "guest_config": "",
                     "backups": 1, "hosts": [], "port": 7100},
            "term": 1, "status": "protected", "primary": "a", "acked_seq": null,
            "backups": []}))
        .unwrap();
        assert_eq!(
            clones_cell(&v),
            "-",
            "an answer without clones (an older manager)"
        );
        let clone = |index: u32, state: &str, draining: bool| failover::manager::CloneView {
            name: format!("web-c{index}"),
            index,
            host: "a".into(),
            ip: String::new(),
            state: state.into(),
            draining,
        };
        v.clones.desired = 1;
        v.clones.instances = vec![clone(0, "running", false), clone(1, "draining", true)];
        assert_eq!(clones_cell(&v), "1/1 +1 draining");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_ms("10s"), Ok(10_000));
        assert_eq!(parse_ms("250ms"), Ok(250));
        assert_eq!(parse_ms("1.5s"), Ok(1500));
        assert_eq!(parse_ms("2m"), Ok(120_000));
        assert_eq!(parse_ms("40"), Ok(40));
        assert!(parse_ms("soon").is_err());
        assert!(parse_ms("-1s").is_err());
        assert!(parse_ms("2h").is_err());
        assert!(parse_ms("99999m").is_err());
    }
}
