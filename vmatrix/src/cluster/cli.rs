//! `vmatrix vm|host|events`: a client of the manager's HTTP/JSON API (curl is another).
//!
//! Each command takes `--manager <ip:port>` (default 127.0.0.1:7700, or `VMATRIX_MANAGER`).
//! Requests go through `ureq`, a small blocking HTTP client (no async runtime for a one-shot
//! command, no TLS since the API is loopback only).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use failover::manager::{HostView, VmView};
use failover::model::VmSpec;
use serde::de::DeserializeOwned;

use super::manager::events::Stamped;

/// Where the manager's API is.
#[derive(clap::Args, Debug, Clone)]
pub struct ManagerOpt {
    /// The manager's API address (ip:port).
    #[arg(long, env = "VMATRIX_MANAGER", default_value = "127.0.0.1:7700")]
    pub manager: String,
}

/// `vmatrix vm ...`.
#[derive(clap::Subcommand, Debug)]
pub enum VmCmd {
    /// Create a protected VM (the manager places its primary and backups).
    Create {
        /// Unique name (1 to 32 of [A-Za-z0-9_-]).
        name: String,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 64)]
        mem_mib: u64,
        /// Guest disk size, MiB (a fresh raw disk on the primary's host).
        #[arg(long, default_value_t = 64)]
        disk_mib: u64,
        /// The guest's config string, e.g. "ip=10.77.1.2/24,gw=10.77.1.1,port=7000".
        #[arg(long, default_value = "")]
        guest_config: String,
        /// Backups wanted (each on its own host).
        #[arg(long, default_value_t = 1)]
        backups: u8,
        /// UDP port the backups listen on.
        #[arg(long, default_value_t = 7100)]
        port: u16,
        /// Hosts allowed to run it, comma-separated (default: any).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        #[command(flatten)]
        limits: super::cli_limits::LimitArgs,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Show (and with flags, set) the resource limits of each of the VM's processes and
    /// their use: CPU, CPU weight, memory, disk bytes per second (docs/limits.md).
    Limits(super::cli_limits::LimitsCmd),
    /// List VMs: name, status, term, primary, backups (host:seq, * when synced), acked seq.
    List {
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Show one VM (JSON).
    Show {
        /// The VM.
        name: String,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Promote a synced backup now (the most advanced, or --to).
    Failover {
        /// The VM.
        name: String,
        /// The backup's host.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Move the VM's primary to a host (a backup syncs there first, then it takes over).
    Migrate {
        /// The VM.
        name: String,
        /// The target host.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Run N clones of the VM (each its own VM with its own address, started from a frozen
    /// checkpoint of the primary; docs/clones.md). 0 stops them.
    Scale {
        /// The VM.
        name: String,
        /// Clones wanted.
        #[arg(long)]
        clones: u32,
        /// Address of the first clone (a.b.c.d/len; clone i has the i-th next one). Needed once.
        #[arg(long)]
        ip: Option<String>,
        /// Keep a clone base warm on the primary's host even with no clone (true/false).
        #[arg(long)]
        warm: Option<bool>,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Let the manager scale the VM's clones from its load (fed by the load balancer).
    Autoscale {
        /// The VM.
        name: String,
        /// Load one replica (the primary or a clone) should carry (connections or requests/s).
        #[arg(long, alias = "target-conns")]
        target: Option<f64>,
        /// Fewest clones.
        #[arg(long, default_value_t = 0)]
        min: u32,
        /// Most clones.
        #[arg(long, default_value_t = 8)]
        max: u32,
        /// Cool-down after a change before scaling up, e.g. 2s, 500ms.
        #[arg(long, default_value = "2s", value_parser = super::cli_clones::parse_ms)]
        cooldown_up: u64,
        /// Cool-down after a change before scaling down (and how long the load must stay low).
        #[arg(long, alias = "cooldown", default_value = "30s", value_parser = super::cli_clones::parse_ms)]
        cooldown_down: u64,
        /// Dead band, a fraction of the target.
        #[arg(long, default_value_t = 0.2)]
        hysteresis: f64,
        /// Address of the first clone (a.b.c.d/len), if not set yet.
        #[arg(long)]
        ip: Option<String>,
        /// Stop autoscaling (the clone count stays where it is).
        #[arg(long, conflicts_with = "target")]
        off: bool,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Feed one load sample to the VM's autoscaler (what a load balancer's driver does).
    Load {
        /// The VM.
        name: String,
        /// Connections (or requests/s) over the primary and its clones.
        load: f64,
        #[command(flatten)]
        m: ManagerOpt,
    },
    /// Delete a VM (every host stops its processes).
    Delete {
        /// The VM.
        name: String,
        #[command(flatten)]
        m: ManagerOpt,
    },
}

/// `vmatrix host ...`.
#[derive(clap::Subcommand, Debug)]
pub enum HostCmd {
    /// List the hosts whose agents connected since the manager started.
    List {
        #[command(flatten)]
        m: ManagerOpt,
    },
}

/// `vmatrix events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Only events numbered above this.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Keep printing new events (polls every 200 ms, also across a manager restart) until
    /// interrupted.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub m: ManagerOpt,
}

/// The API's client (also the load balancer's driver's, `crate::lb::serve`).
pub(crate) struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub(crate) fn new(m: &ManagerOpt) -> anyhow::Result<Client> {
        let addr = m.manager.trim_end_matches('/');
        let base = if addr.starts_with("http://") {
            addr.to_string()
        } else if addr.contains("://") {
            anyhow::bail!("--manager {addr}: the API is plain HTTP (give ip:port)");
        } else {
            format!("http://{addr}")
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Ok(Client { base, agent })
    }

    /// Sends a request and returns the body of a 2xx answer; any other answer is an error
    /// with the manager's message.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let res = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            ("PUT", b) => self
                .agent
                .put(&url)
                .content_type("application/json")
                .send(b.unwrap_or_default().to_string().as_bytes()),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .content_type("application/json")
                .send(b.to_string().as_bytes()),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut res = res.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the manager at {} ({e}); is `vmatrix manager` running with --api \
                 there? (set --manager or VMATRIX_MANAGER)",
                self.base
            )
        })?;
        let status = res.status();
        let text = res
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the manager's answer to {method} {path}"))?;
        if status.is_success() {
            return Ok(text);
        }
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        anyhow::bail!("the manager answered {status}: {msg}")
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let text = self.call("GET", path, None)?;
        serde_json::from_str(&text).with_context(|| format!("the manager's answer to GET {path}"))
    }
}

/// A table with aligned columns.
pub(crate) fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The `vm list` table.
pub fn vm_table(vms: &[VmView]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            let backups = v
                .backups
                .iter()
                .map(|b| {
                    format!(
                        "{}:{}{}",
                        b.host,
                        opt(b.seq),
                        if b.synced { "*" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(",");
            vec![
                v.spec.name.clone(),
                v.status.clone(),
                v.term.to_string(),
                opt(v.primary.as_deref()),
                if backups.is_empty() {
                    "-".into()
                } else {
                    backups
                },
                opt(v.acked_seq),
                super::cli_clones::clones_cell(v),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "STATUS", "TERM", "PRIMARY", "BACKUPS", "ACKED", "CLONES",
        ],
        &rows,
    )
}

/// The `host list` table.
pub fn host_table(hosts: &[HostView]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.status.clone(),
                if h.connected { "yes" } else { "no" }.into(),
                h.silent_ms.to_string(),
                h.instances.to_string(),
                h.repl_ip.clone(),
                h.capacity_mib.to_string(),
                h.room_mib.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATUS",
            "CONNECTED",
            "SILENT_MS",
            "INSTANCES",
            "REPL_IP",
            "CAPACITY_MIB",
            "ROOM_MIB",
        ],
        &rows,
    )
}

/// One line of `vmatrix events`.
pub fn event_line(e: &Stamped) -> String {
    let ev = &e.event;
    format!(
        "{:>5} {} {:<15} vm={} host={} term={} {}",
        e.seq,
        e.time,
        serde_json::to_value(ev.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{:?}", ev.kind)),
        opt(ev.vm.as_deref()),
        opt(ev.host.as_deref()),
        opt(ev.term),
        ev.detail
    )
}

/// Runs `vm`.
pub fn vm_main(c: VmCmd) -> anyhow::Result<ExitCode> {
    match c {
        VmCmd::Create {
            name,
            mem_mib,
            disk_mib,
            guest_config,
            backups,
            port,
            hosts,
            limits,
            m,
        } => {
            let spec = VmSpec {
                name,
                mem_mib,
                disk_mib,
                guest_config,
                backups,
                hosts,
                port,
            };
            let mut body = serde_json::to_value(&spec)?;
            if limits.any() {
                body["limits"] = serde_json::to_value(limits.over(Default::default()))?;
            }
            let text = Client::new(&m)?.call("POST", "/v1/vms", Some(body))?;
            let v: VmView = serde_json::from_str(&text).context("the manager's answer")?;
            println!(
                "created {} (term {}): primary on {}, backups on [{}]",
                v.spec.name,
                v.term,
                opt(v.primary.as_deref()),
                v.backups
                    .iter()
                    .map(|b| b.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        VmCmd::List { m } => {
            let vms: Vec<VmView> = Client::new(&m)?.get("/v1/vms")?;
            print!("{}", vm_table(&vms));
        }
        VmCmd::Show { name, m } => {
            let v: serde_json::Value = Client::new(&m)?.get(&format!("/v1/vms/{name}"))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        VmCmd::Failover { name, to, m } => {
            let body = serde_json::json!({ "to": to });
            let text =
                Client::new(&m)?.call("POST", &format!("/v1/vms/{name}/failover"), Some(body))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).context("the manager's answer")?;
            println!("{name}: promoting at term {}", v["term"]);
        }
        VmCmd::Migrate { name, to, m } => {
            let body = serde_json::json!({ "to": to });
            Client::new(&m)?.call("POST", &format!("/v1/vms/{name}/migrate"), Some(body))?;
            println!("{name}: migrating to {to} (a backup syncs there, then it takes over)");
        }
        VmCmd::Limits(c) => return super::cli_limits::run(c),
        c @ (VmCmd::Scale { .. } | VmCmd::Autoscale { .. } | VmCmd::Load { .. }) => {
            return super::cli_clones::run(c);
        }
        VmCmd::Delete { name, m } => {
            Client::new(&m)?.call("DELETE", &format!("/v1/vms/{name}"), None)?;
            println!("deleted {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `host`.
pub fn host_main(c: HostCmd) -> anyhow::Result<ExitCode> {
    match c {
        HostCmd::List { m } => {
            let hosts: Vec<HostView> = Client::new(&m)?.get("/v1/hosts")?;
            print!("{}", host_table(&hosts));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `events`.
pub fn events_main(a: EventsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&a.m)?;
    let mut since = a.since;
    let mut lost = false;
    loop {
        let events: Vec<Stamped> = match client.get(&format!("/v1/events?since={since}")) {
            Ok(e) => {
                if std::mem::take(&mut lost) {
                    eprintln!("vmatrix events: the manager answers again");
                }
                e
            }
            // Following goes on across a manager restart (numbers go on too).
            Err(e) if a.follow => {
                if !std::mem::replace(&mut lost, true) {
                    eprintln!("vmatrix events: {e:#}; retrying");
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(first) = events.first() {
            if first.seq > since + 1 && since > 0 {
                println!(
                    "... events {}..{} are no longer kept by the manager (see its events file)",
                    since + 1,
                    first.seq - 1
                );
            }
        }
        let mut out = std::io::stdout().lock();
        for e in &events {
            writeln!(out, "{}", event_line(e))?;
            since = since.max(e.seq);
        }
        out.flush()?;
        drop(out);
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failover::manager::BackupView;

    #[test]
    fn vm_table_shows_backups_with_seq_and_sync() {
        let v = VmView {
            spec: VmSpec {
                name: "web".into(),
                mem_mib: 64,
                disk_mib: 64,
                guest_config: String::new(),
                backups: 2,
                hosts: vec![],
                port: 7100,
            },
            term: 3,
            status: "protected".into(),
            primary: Some("a".into()),
            acked_seq: Some(41),
            backups: vec![
                BackupView {
                    host: "b".into(),
                    synced: true,
                    seq: Some(41),
                    image_term: 3,
                },
                BackupView {
                    host: "c".into(),
                    synced: false,
                    seq: None,
                    image_term: 0,
                },
            ],
            clones: Default::default(),
            limits: Default::default(),
            usage: vec![],
        };
        let t = vm_table(&[v]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME  STATUS"), "{t}");
        assert!(lines[1].contains("b:41*,c:-"), "{t}");
        assert!(lines[1].ends_with("-") && lines[1].contains(" 41 "), "{t}");
    }
}
