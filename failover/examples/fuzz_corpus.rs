//! Writes the seed corpus of the failover fuzz targets (`failover/fuzz/corpus/{wire,state}`):
//! valid frames of every message kind and a valid state file.
//! Run: `cargo run -p failover --example fuzz_corpus`.

use failover::model::*;
use failover::wire::{encode, AgentMsg, ManagerMsg, VERSION};

fn spec() -> VmSpec {
    VmSpec {
        name: "web".into(),
        mem_mib: 64,
        disk_mib: 16,
        guest_config: "ip=10.77.1.2/24,gw=10.77.1.1,port=7000".into(),
        backups: 1,
        hosts: vec![],
        port: 7100,
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    std::fs::create_dir_all(root.join("wire"))?;
    for (i, f) in frames()?.iter().enumerate() {
        std::fs::write(root.join("wire").join(format!("seed-{i}")), f)?;
    }
    let mut st = ClusterState::default();
    st.vms.insert("web".into(), record());
    st.retired.insert("old".into(), 5);
    std::fs::create_dir_all(root.join("state"))?;
    std::fs::write(
        root.join("state/seed-0"),
        failover::store::encode_state(&st)?,
    )?;
    println!("wrote the seed corpus under {}", root.display());
    Ok(())
}

/// A primary's observation.
fn observation() -> VmObservation {
    VmObservation {
        vm: "web".into(),
        role: ProcRole::Primary,
        alive: true,
        exit: None,
        term: 2,
        image_term: 0,
        seq: Some(7),
        protected: true,
        backup_hosts: vec!["b".into()],
        output_held: true,
        silent_ms: None,
        handed_over: false,
        never_ran: false,
    }
}

/// A primary's assignment with one backup.
fn assignments() -> Assignments {
    let mut a = Assignments::default();
    a.vms.insert(
        "web".into(),
        Assignment {
            spec: spec(),
            role: Role::Primary {
                term: 2,
                source: Source::Running,
                backups: vec![BackupTarget {
                    host: "b".into(),
                    addr: "10.78.1.2:7100".into(),
                }],
                handover: false,
            },
        },
    );
    a
}

/// One frame of every message kind, with and without the clone fields.
fn frames() -> Res<Vec<Vec<u8>>> {
    let (obs, a) = (observation(), assignments());
    Ok(vec![
        encode(&AgentMsg::Hello {
            version: VERSION,
            host: "a".into(),
            repl_ip: "10.78.1.1".into(),
            capacity_mib: 4096,
        })?,
        encode(&AgentMsg::Report(Report {
            vms: vec![obs.clone()],
            ..Default::default()
        }))?,
        encode(&ManagerMsg::Welcome { version: VERSION })?,
        encode(&ManagerMsg::Assign(a.clone()))?,
        // With clones (issue 11): the fields appended to both messages.
        encode(&AgentMsg::Report(Report {
            vms: vec![obs],
            clones: vec![CloneObservation {
                name: "web-c0".into(),
                vm: "web".into(),
                alive: true,
                running: true,
                exit: None,
                base_term: 2,
            }],
            bases: vec![BaseObservation {
                vm: "web".into(),
                term: 2,
                age_ms: 1500,
            }],
            base_port: 7400,
            usage: vec![failover::limits::ProcUsage {
                vm: "web".into(),
                of: failover::limits::UsageOf::Clone("web-c0".into()),
                cpu_millis: 250,
                throttled_us: 1200,
                mem_bytes: 90 << 20,
                mem_limit_bytes: 256 << 20,
                oom_kills: 1,
                error: String::new(),
            }],
        }))?,
        encode(&ManagerMsg::Assign(Assignments {
            clones: vec![CloneAssignment {
                name: "web-c0".into(),
                vm: "web".into(),
                index: 0,
                guest_config: "ip=10.77.1.10/24,gw=10.77.1.1,port=7000".into(),
                mem_mib: 64,
            }],
            bases: vec!["web".into()],
            fetch: vec![failover::clones::BaseFetch {
                vm: "web".into(),
                sources: vec![failover::clones::BaseSource {
                    host: "b".into(),
                    addr: "10.0.0.2:7400".into(),
                    term: 2,
                }],
            }],
            limits: [(
                "web".to_string(),
                failover::limits::Limits {
                    cpu_millis: 500,
                    memory_mib: 256,
                    ..Default::default()
                },
            )]
            .into(),
            ..a
        }))?,
    ])
}

/// A running VM's record with clones (one draining) and a balancer.
fn record() -> VmRecord {
    VmRecord {
        spec: spec(),
        term: 3,
        phase: Phase::Running,
        primary: Some("a".into()),
        started: true,
        backups: vec![BackupSlot {
            host: "b".into(),
            synced_term: Some(3),
        }],
        handover_to: None,
        retries: 0,
        clones: CloneSet {
            desired: 2,
            first_ip: Some("10.77.1.10/24".into()),
            warm: false,
            autoscale: Some(failover::clones::AutoscaleSpec {
                target: 50.0,
                min: 0,
                max: 8,
                up_cooldown_ms: 1000,
                down_cooldown_ms: 10_000,
                hysteresis: 0.2,
            }),
            placed: vec![
                failover::clones::CloneSlot {
                    index: 0,
                    host: "a".into(),
                    draining: false,
                },
                failover::clones::CloneSlot {
                    index: 2,
                    host: "a".into(),
                    draining: true,
                },
            ],
            balancer: Some(failover::clones::Balancer {
                vip: "10.77.1.100:7000".into(),
                lease_ms: 3000,
            }),
        },
        limits: failover::limits::Limits {
            cpu_millis: 750,
            cpu_weight: 200,
            memory_mib: 512,
            io_read_bps: 8 << 20,
            io_write_bps: 4 << 20,
        },
    }
}
