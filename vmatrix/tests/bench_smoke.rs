//! `vmatrix bench replication --quick` runs end to end (real KVM, tap, QUIC) and prints every
//! table. It asserts nothing about speed: figures belong in docs/BENCHMARKS.md, not in tests.

mod support;

use std::process::Command;

use support::*;

/// Runs `vmatrix <args>` and checks that it succeeds and prints every one of `needles`.
fn prints(args: &[&str], needles: &[&str]) {
    let out = Command::new(vmatrix_bin())
        .args(args)
        .output()
        .expect("run vmatrix bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in needles {
        assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
    }
}

#[test]
fn bench_replication_quick_prints_every_table() {
    require_kvm();
    let guest = guest_elf();
    prints(
        &[
            "bench",
            "replication",
            "--quick",
            "--guest",
            guest.to_str().unwrap(),
        ],
        &[
            "Raw quinn on loopback",
            "| CHURN 50k pages/s |",
            "| idle guest |",
            "| unprotected | 16 |",
            "| protected (default: early checkpoints) | 16 |",
        ],
    );
}

/// `--busy 1 --second-vm --rounds 1`: a CPU-bound neighbour and a second protected VM beside
/// the measured one, both pause paths; `--dirty-sources --busy 1 --rounds 1`: the bitmap, the
/// ring, and the ring without early copies of busy epochs, beside a neighbour.
#[test]
fn bench_replication_busy_and_dirty_sources_print_both_sides() {
    require_kvm();
    let guest = guest_elf();
    let g = guest.to_str().unwrap();
    prints(
        &[
            "bench",
            "replication",
            "--quick",
            "--busy",
            "1",
            "--second-vm",
            "--rounds",
            "1",
            "--guest",
            g,
        ],
        &[
            "and a second protected VM",
            "| 1 | ordinary | idle |",
            "| 1 | real-time | idle |",
            "| 1 | real-time | CHURN 1k pages/s |",
            "Every round's pauses pooled per condition (rounds: 1)",
            "| real-time, pinned | 1,000 pages per epoch |",
        ],
    );
    prints(
        &[
            "bench",
            "replication",
            "--quick",
            "--dirty-sources",
            "--busy",
            "1",
            "--rounds",
            "1",
            "--guest",
            g,
        ],
        &[
            "1 CPU-bound neighbours",
            "| 1 | bitmap+hot | idle |",
            "| 1 | ring | 1,000 pages per epoch |",
            "| 1 | ring, no early copy | 1,000 pages per epoch |",
            "| ring, no early copy | 1,000 pages per epoch |",
        ],
    );
}

/// `--kv --quick --rounds 1`: the reply path's tables; `--kv --kv-hold 50`: one 16-client
/// phase, protected (with its stage means) and not.
#[test]
fn bench_replication_kv_prints_its_figures() {
    require_kvm();
    let guest = guest_elf();
    let g = guest.to_str().unwrap();
    prints(
        &[
            "bench",
            "replication",
            "--kv",
            "--quick",
            "--rounds",
            "1",
            "--guest",
            g,
        ],
        &[
            "| round | 1 client p50, unprotected → protected |",
            "| round | checkpoints | wake | capture | send | ack | release |",
        ],
    );
    let args = [
        "bench",
        "replication",
        "--kv",
        "--kv-hold",
        "50",
        "--guest",
        g,
    ];
    prints(
        &args,
        &[
            "16 clients × 50 SETs, protected:",
            "checkpoints/s",
            "stage means under this load: wake",
        ],
    );
    let plain: Vec<&str> = args.iter().copied().chain(["--plain"]).collect();
    prints(&plain, &["16 clients × 50 SETs, unprotected:"]);
}

/// `--hog-vm 0.5 --rounds 1`: the protected VM beside a CPU-hog VM stopped, unlimited and
/// capped by its cgroup, each round's rows and the pooled table.
#[test]
fn bench_replication_hog_vm_prints_every_condition() {
    require_kvm();
    let guest = guest_elf();
    let g = guest.to_str().unwrap();
    prints(
        &[
            "bench",
            "replication",
            "--quick",
            "--hog-vm",
            "0.5",
            "--rounds",
            "1",
            "--guest",
            g,
        ],
        &[
            "| 1 | stopped | idle |",
            "| 1 | no limit | CHURN 1k pages/s |",
            "| 1 | capped at 0.5 CPU | idle |",
            "Every round's pauses pooled per condition (rounds: 1):",
            "| capped at 0.5 CPU | CHURN 1k pages/s | ",
        ],
    );
}

/// `--harvest --rounds 1`: the harvest alone, KVM's bitmap and its dirty ring.
#[test]
fn bench_replication_harvest_prints_both_sources() {
    require_kvm();
    let guest = guest_elf();
    let g = guest.to_str().unwrap();
    prints(
        &[
            "bench",
            "replication",
            "--quick",
            "--harvest",
            "--rounds",
            "1",
            "--guest",
            g,
        ],
        &[
            "| 1 | bitmap+hot | idle |",
            "| 1 | ring | 1,000 pages per epoch |",
        ],
    );
}

/// `vmatrix bench copy`: a base copied between two base servers, against raw quinn.
#[test]
fn bench_copy_prints_its_table() {
    prints(
        &[
            "bench",
            "copy",
            "--mem-mib",
            "32",
            "--data-mib",
            "8",
            "--rounds",
            "1",
        ],
        &["| 1 | 9.1 |"],
    );
}
