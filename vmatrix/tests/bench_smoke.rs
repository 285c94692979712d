//! `vmatrix bench replication --quick` runs end to end (real KVM, tap, QUIC) and prints every
//! table. It asserts nothing about speed: figures belong in docs/BENCHMARKS.md, not in tests.

mod support;

use std::process::Command;

use support::*;

#[test]
fn bench_replication_quick_prints_every_table() {
    require_kvm();
    let out = Command::new(vmatrix_bin())
        .args(["bench", "replication", "--quick", "--guest"])
        .arg(guest_elf())
        .output()
        .expect("run vmatrix bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "Raw quinn on loopback",
        "| CHURN 50k pages/s |",
        "| idle guest |",
        "| unprotected | 16 |",
        "| protected (default: early checkpoints) | 16 |",
    ] {
        assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
    }
}

/// `--busy 1 --rounds 1`: a CPU-bound neighbour beside the protected VM, both pause paths.
#[test]
fn bench_replication_busy_prints_both_pause_paths() {
    require_kvm();
    let out = Command::new(vmatrix_bin())
        .args([
            "bench",
            "replication",
            "--quick",
            "--busy",
            "1",
            "--rounds",
            "1",
            "--guest",
        ])
        .arg(guest_elf())
        .output()
        .expect("run vmatrix bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "| 1 | ordinary | idle |",
        "| 1 | real-time | idle |",
        "| 1 | real-time | CHURN 1k pages/s |",
    ] {
        assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
    }
}

/// `vmatrix bench copy`: a base copied between two base servers, against raw quinn.
#[test]
fn bench_copy_prints_its_table() {
    let out = Command::new(vmatrix_bin())
        .args([
            "bench",
            "copy",
            "--mem-mib",
            "32",
            "--data-mib",
            "8",
            "--rounds",
            "1",
        ])
        .output()
        .expect("run vmatrix bench copy");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("| 1 | 9.1 |"), "{text}");
}
