//! Tests of clone bases copied between hosts, over real QUIC on loopback with real
//! certificates: a whole copy (holes stay holes, bytes equal), roles both ways, a source
//! without a base, hostile and dying servers (nothing outside the files, nothing left behind).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use failover::clones::BaseSource;
use transport::roles::{Grants, HostRole};
use transport::QuicConfig;

use super::*;

struct Net {
    certs: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Net {
    fn new() -> Net {
        let certs = tempfile::tempdir().unwrap();
        transport::certs::init_ca(certs.path()).unwrap();
        let all = Grants::new(&HostRole::ALL, &[]).unwrap();
        let no_agent = Grants::new(&[HostRole::Primary, HostRole::Backup], &[]).unwrap();
        for h in ["b", "c", "d"] {
            transport::certs::issue_for(certs.path(), h, &all).unwrap();
        }
        transport::certs::issue_for(certs.path(), "x", &no_agent).unwrap();
        // An agent that may not hold VM "web": agent only, or backup of another VM.
        let agent_only = Grants::new(&[HostRole::Agent], &[]).unwrap();
        let other_vm = Grants::new(&[HostRole::Agent, HostRole::Backup], &["db".into()]).unwrap();
        transport::certs::issue_for(certs.path(), "y", &agent_only).unwrap();
        transport::certs::issue_for(certs.path(), "z", &other_vm).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Net { certs, rt }
    }

    fn id(&self, host: &str) -> transport::certs::Identity {
        transport::certs::load(self.certs.path(), host).unwrap()
    }

    /// A QUIC server of `host` on loopback, and the source naming it.
    fn bind(&self, host: &str) -> (transport::quic::Server, BaseSource) {
        let _g = self.rt.enter();
        let server = transport::quic::Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &self.id(host),
            &QuicConfig::default(),
        )
        .unwrap();
        let src = BaseSource {
            host: host.into(),
            addr: server.local_addr().unwrap().to_string(),
            term: 3,
        };
        (server, src)
    }

    /// A base server of `host` serving `published`.
    fn serve(&self, host: &str, published: Published) -> BaseSource {
        let (server, src) = self.bind(host);
        self.rt.spawn(serve(server, published));
        src
    }

    /// A server of `host` that answers every request with `msgs` and then drops the
    /// connection.
    fn hostile(&self, host: &str, msgs: Vec<Msg>) -> BaseSource {
        let (server, src) = self.bind(host);
        self.rt.spawn(async move {
            while let Ok(conn) = server.accept().await {
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    continue;
                };
                let _ = read_msg::<Msg>(&mut recv).await;
                for m in &msgs {
                    let _ = write_msg(&mut send, m).await;
                    // (A chunk's bytes follow it; at most 4 KiB of them here.)
                    if let Msg::Chunk { len, .. } = m {
                        let n = (*len as usize).min(4096);
                        let _ = send.write_all(&vec![7u8; n]).await;
                    }
                }
                let _ = send.finish();
                tokio::time::sleep(Duration::from_millis(50)).await;
                conn.close(0u32.into(), b"bye");
            }
        });
        src
    }
}

/// A full snapshot's files: a description of random bytes, a sparse 16 MiB memory file with
/// data at 0..1 MiB and 8..8.5 MiB, a sparse 4 MiB disk with data at 2 MiB.
fn make_snapshot(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    std::fs::write(dir.join(META_FILE), bytes(10_000)).unwrap();
    let mem = File::create(dir.join(MEMORY_FILE)).unwrap();
    mem.set_len(16 << 20).unwrap();
    mem.write_all_at(&bytes(1 << 20), 0).unwrap();
    mem.write_all_at(&bytes(512 << 10), 8 << 20).unwrap();
    let disk = File::create(dir.join(DISK_FILE)).unwrap();
    disk.set_len(4 << 20).unwrap();
    disk.write_all_at(&bytes(64 << 10), 2 << 20).unwrap();
}

fn published(vm: &str, snap: &Path) -> Published {
    let mut m = BTreeMap::new();
    m.insert(
        vm.to_string(),
        Served {
            term: 3,
            snap: snap.to_path_buf(),
            made: Instant::now(),
        },
    );
    Arc::new(Mutex::new(m))
}

fn same_files(a: &Path, b: &Path) {
    for f in FILES {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs");
    }
}

#[test]
fn a_base_is_copied_whole_and_its_holes_stay_holes() {
    let net = Net::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_snapshot(&src);
    let s = net.serve("b", published("web", &src));
    let dst = work.path().join("copy");
    let (c, from) = fetch(&net.id("c"), &[s], "web", &dst).unwrap();
    assert_eq!(from, "b");
    assert_eq!(c.term, 3);
    assert_eq!(c.bytes, 10_000 + (1 << 20) + (512 << 10) + (64 << 10));
    same_files(&src, &dst);
    let mem = std::fs::metadata(dst.join(MEMORY_FILE)).unwrap();
    assert_eq!(mem.len(), 16 << 20);
    assert!(
        mem.blocks() * 512 < 4 << 20,
        "holes stay holes ({} blocks)",
        mem.blocks()
    );
}

#[test]
fn only_agents_copy_and_only_from_agents() {
    let net = Net::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_snapshot(&src);
    // A copier without the agent role gets nothing.
    let s = net.serve("b", published("web", &src));
    let dst = work.path().join("copy");
    let e = fetch(&net.id("x"), &[s], "web", &dst).unwrap_err();
    assert!(!dst.exists(), "nothing left: {e:#}");
    // (The server closes the connection at once: the copier reads no answer.)
    assert!(format!("{e:#}").contains("reading"), "{e:#}");
    // A server without the agent role is not copied from.
    let s = net.serve("x", published("web", &src));
    let e = fetch(&net.id("c"), &[s], "web", &dst).unwrap_err();
    assert!(format!("{e:#}").contains("agent"), "{e:#}");
    assert!(!dst.exists());
    // Agents that may not hold the VM's image get nothing, and are not copied from.
    for h in ["y", "z"] {
        let s = net.serve("b", published("web", &src));
        let e = format!("{:#}", fetch(&net.id(h), &[s], "web", &dst).unwrap_err());
        assert!(e.contains("may not hold web"), "{h}: {e}");
        assert!(!dst.exists());
        let s = net.serve(h, published("web", &src));
        let e = format!("{:#}", fetch(&net.id("c"), &[s], "web", &dst).unwrap_err());
        assert!(e.contains("may not hold web"), "{h}: {e}");
        assert!(!dst.exists());
    }
    // A server whose certificate is not the host named: refused by TLS.
    let mut s = net.serve("b", published("web", &src));
    s.host = "d".into();
    assert!(fetch(&net.id("c"), &[s], "web", &dst).is_err());
}

#[test]
fn a_source_without_the_base_says_so_and_the_next_is_tried() {
    let net = Net::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_snapshot(&src);
    let empty = net.serve("d", Arc::new(Mutex::new(BTreeMap::new())));
    let gone = net.serve("c", published("web", &work.path().join("removed")));
    let good = net.serve("b", published("web", &src));
    let dst = work.path().join("copy");
    let e = fetch(&net.id("c"), &[empty.clone(), gone.clone()], "web", &dst).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("no clone base of web"), "{e}");
    assert!(e.contains("opening"), "{e}");
    let (_, from) = fetch(&net.id("c"), &[empty, gone, good], "web", &dst).unwrap();
    assert_eq!(from, "b");
    same_files(&src, &dst);
}

#[test]
fn a_hostile_or_dying_server_leaves_nothing() {
    let net = Net::new();
    let work = tempfile::tempdir().unwrap();
    let dst = work.path().join("copy");
    let header = |lens| Msg::Header {
        term: 3,
        age_ms: 1,
        lens,
    };
    let chunk = |file, offset, len| Msg::Chunk { file, offset, len };
    let cases = [
        // Sizes beyond the limits: refused before any file is made.
        (vec![header([1, 1 << 41, 1])], "at most"),
        // A chunk past its file's end, or of a file that does not exist.
        (
            vec![header([10, 4096, 4096]), chunk(1, 4000, 200)],
            "outside its file",
        ),
        (vec![header([10, 4096, 4096]), chunk(3, 0, 1)], "outside"),
        // An offset that overflows.
        (
            vec![header([10, 4096, 4096]), chunk(1, u64::MAX - 2, 10)],
            "outside",
        ),
        // A chunk longer than the most a chunk holds.
        (
            vec![header([10, 4 << 20, 4096]), chunk(1, 0, (CHUNK + 1) as u32)],
            "outside",
        ),
        // A chunk whose bytes never come whole.
        (
            vec![header([10, 1 << 20, 4096]), chunk(1, 0, 8192)],
            "bytes",
        ),
        // Half a copy, then the connection drops.
        (vec![header([10, 4096, 4096]), chunk(1, 0, 100)], "early"),
        // Out of order.
        (vec![chunk(1, 0, 100)], "expected a header"),
        (
            vec![header([1, 1, 1]), header([1, 1, 1])],
            "expected a chunk",
        ),
    ];
    for (msgs, want) in cases {
        let s = net.hostile("b", msgs.clone());
        let e = fetch(&net.id("c"), &[s], "web", &dst).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains(want), "{msgs:?}: {e}");
        assert!(!dst.exists(), "{msgs:?}: a copy left behind");
    }
}
