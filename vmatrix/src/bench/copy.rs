//! `vmatrix bench copy`: a clone base copied from one agent's base server to another
//! (`cluster::agent::base_share`, docs/clones.md "Clones on any host") over QUIC with mutual
//! TLS on loopback, against raw quinn throughput in the same run (one stream, the same
//! certificates): how long a host that runs nothing of a VM waits for its first base.
//!
//! The base is a full snapshot's three files: a 64 KiB description, a sparse memory file of
//! `--mem-mib` with `--data-mib` of data (1 MiB written, 1 MiB hole, ...), a 16 MiB disk with
//! 1 MiB of data. Only the data travels; the copy is not checked here (no real snapshot).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use failover::clones::BaseSource;
use transport::roles::{Grants, HostRole};

use crate::cluster::agent::base_share::{self, Served};

/// Flags of `vmatrix bench copy`.
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Guest RAM of the base, MiB (the memory file's size).
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Data in the memory file, MiB (the rest are holes).
    #[arg(long, default_value_t = 128)]
    pub data_mib: u64,
    /// Copies measured.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Writes the base's files into `dir`.
fn make_base(dir: &Path, mem_mib: u64, data_mib: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut fill = |b: &mut Vec<u8>| {
        for c in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
    };
    fill(&mut block);
    std::fs::write(dir.join(base_share::FILES[0]), &block[..64 << 10])?;
    let mem = File::create(dir.join(base_share::FILES[1]))?;
    mem.set_len(mem_mib << 20)?;
    for i in 0..data_mib.min(mem_mib) {
        // (Every other MiB while there is room, then the rest contiguous.)
        let at = if 2 * data_mib <= mem_mib { 2 * i } else { i };
        fill(&mut block);
        mem.write_all_at(&block, at << 20)?;
    }
    let disk = File::create(dir.join(base_share::FILES[2]))?;
    disk.set_len(16 << 20)?;
    disk.write_all_at(&block, 4 << 20)?;
    Ok(())
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(a: CopyArgs) -> anyhow::Result<()> {
    let work = tempfile_dir()?;
    let certs = work.join("certs");
    transport::certs::init_ca(&certs)?;
    let all = Grants::new(&HostRole::ALL, &[]).map_err(anyhow::Error::msg)?;
    for h in ["src", "dst"] {
        transport::certs::issue_for(&certs, h, &all)?;
    }
    let snap = work.join("base");
    make_base(&snap, a.mem_mib, a.data_mib)?;
    let published: base_share::Published = Arc::new(Mutex::new(BTreeMap::new()));
    published.lock().expect("published").insert(
        "web".into(),
        Served {
            term: 1,
            snap: snap.clone(),
            made: Instant::now(),
        },
    );
    let port = base_share::start(
        ([127, 0, 0, 1], 0).into(),
        (certs.clone(), "src".into()),
        published,
    )?;
    let src = BaseSource {
        host: "src".into(),
        addr: format!("127.0.0.1:{port}"),
        term: 1,
    };
    let dst = transport::certs::load(&certs, "dst")?;
    let srv = transport::certs::load(&certs, "src")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let raw = rt.block_on(transport::probe::raw_quinn_throughput(
        &srv,
        "src",
        &dst,
        (a.data_mib + 2) << 20,
    ))?;
    drop(rt);
    println!(
        "A base of {} MiB of memory ({} MiB of data) and a 16 MiB disk (1 MiB of data); raw \
         quinn on loopback, same run: {:.0} MB/s.\n",
        a.mem_mib,
        a.data_mib,
        raw / 1e6
    );
    println!("| copy | data (MiB) | time (ms) | MB/s | vs raw quinn |");
    println!("|---:|---:|---:|---:|---:|");
    for r in 0..a.rounds {
        let to = work.join(format!("copy-{r}"));
        let t0 = Instant::now();
        let (c, _) = base_share::fetch(&dst, std::slice::from_ref(&src), "web", &to)
            .context("copying the base")?;
        let dt = t0.elapsed().as_secs_f64();
        let rate = c.bytes as f64 / dt;
        println!(
            "| {} | {:.1} | {:.0} | {:.0} | {:.2}× |",
            r + 1,
            c.bytes as f64 / (1 << 20) as f64,
            dt * 1e3,
            rate / 1e6,
            rate / raw
        );
        std::fs::remove_dir_all(&to)?;
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("vmatrix-bench-copy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
