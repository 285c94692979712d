//! `cargo bench -p vmatrix --bench replication`: runs `vmatrix bench replication` (the
//! benchmark lives in the binary, so an installed vmatrix can measure its own machine; see
//! vmatrix/src/bench/replication.rs). Pass `--quick` after `--` for a short run.

use std::process::Command;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let quick = std::env::args().any(|a| a == "--quick");
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmatrix"));
    c.args(["bench", "replication", "--guest"])
        .arg(root.join("guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest"));
    if quick {
        c.arg("--quick");
    }
    let st = c.status().expect("run vmatrix bench replication");
    assert!(st.success(), "vmatrix bench replication failed: {st}");
}
