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
