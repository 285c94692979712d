//! Clones on one host (`vmatrix clone`), on real KVM, taps and namespaces: four clones of a
//! snapshot each answer on their own address with the parent's data, their writes are their
//! own, their generations differ, their guest memory is shared, the image is never changed,
//! and a clone killed -9 leaves the others and the image intact; clones of a protected VM (from
//! its primary's snapshot while a backup keeps writing its image, and from the stopped
//! backup's image); bad images are refused with a clear error and left as they were.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

/// A running `vmatrix clone` and what it printed.
struct Clones {
    child: Child,
    clones: Vec<serde_json::Value>,
    summary: serde_json::Value,
    net_index: u32,
    /// Clone i is at 10.77.<net>.<first + i>.
    first: u32,
}

impl Clones {
    /// `vmatrix clone <image> --clones n` inside `ns` of `net`, clone i at
    /// 10.77.<net>.<first+i>. (Each set of a test gets addresses of its own: a stopped set's
    /// guests may still answer ARP for a moment with the same address and MAC.)
    fn start(net: &TestNet, ns: &str, image: &Path, n: u32, work: &Path, first: u32) -> Clones {
        let ip = format!("10.77.{}.{first}/24", net.index);
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(vmatrix_bin())
            .arg("clone")
            .arg(image)
            .args(["--clones", &n.to_string(), "--ip", &ip, "--bridge", "br0"])
            .arg("--work")
            .arg(work)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmatrix clone");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut clones = Vec::new();
        for line in out.lines() {
            let line = line.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
            if v.get("clones").is_some() {
                return Clones {
                    child,
                    clones,
                    summary: v,
                    net_index: net.index,
                    first,
                };
            }
            clones.push(v);
        }
        let mut err = String::new();
        use std::io::Read;
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        let _ = child.wait();
        panic!("vmatrix clone ended early: {err}");
    }

    fn addr(&self, i: usize) -> SocketAddr {
        format!("10.77.{}.{}:7000", self.net_index, self.first as usize + i)
            .parse()
            .unwrap()
    }

    fn kv(&self, i: usize) -> KvClient {
        let mut c = KvClient::connect(self.addr(i)).expect("clone answers");
        c.set_timeout(Duration::from_secs(10));
        c
    }

    fn pid(&self, i: usize) -> u32 {
        self.clones[i]["pid"].as_u64().unwrap() as u32
    }

    /// SIGTERM; the command stops its clones and cleans up.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "vmatrix clone exit: {st}");
    }
}

impl Drop for Clones {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

/// Every file of `dir` (not recursing) and its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

/// (Rss, Private_Dirty) in KiB of the mappings of `pid` whose file name ends with `name`.
fn mapping_kib(pid: u32, name: &str) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut inside, mut rss, mut dirty) = (false, 0, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.trim_end().ends_with(name);
            continue;
        }
        let kib = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if inside && line.starts_with("Rss:") {
            rss += kib();
        } else if inside && line.starts_with("Private_Dirty:") {
            dirty += kib();
        }
    }
    (rss, dirty)
}

fn generation(kv: &mut KvClient) -> String {
    field(&kv.cmd("STATS").unwrap(), "generation").unwrap()
}

#[test]
fn four_clones_each_serve_the_parents_data_alone_and_share_its_memory() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let mut setup: Vec<String> = (0..50).map(|i| format!("SET k{i} v{i}")).collect();
    setup.push("SET colour blue".into());
    let (mut vm, mut parent, snap) = vm_with_snapshot(&net, dir.path(), &setup);
    let image = files(&snap);
    let parent_gen = generation(&mut parent);

    let c = Clones::start(&net, &net.ns(), &snap, 4, &dir.path().join("work"), 10);
    assert!(
        c.summary["ready_ms"].as_f64().is_some(),
        "every clone answered: {}",
        c.summary
    );
    let mut gens = HashSet::new();
    for i in 0..4 {
        let mut kv = c.kv(i);
        for k in [0, 17, 49] {
            assert_eq!(kv.cmd(&format!("GET k{k}")).unwrap(), format!("VALUE v{k}"));
        }
        let g = generation(&mut kv);
        assert_eq!(g, c.clones[i]["generation"].to_string());
        assert_ne!(g, parent_gen, "a clone's generation is its own");
        gens.insert(g);
    }
    assert_eq!(gens.len(), 4, "four different generations");
    let macs: HashSet<String> = c.clones.iter().map(|v| v["mac"].to_string()).collect();
    assert_eq!(macs.len(), 4);

    // A write on one clone is its own.
    assert_eq!(c.kv(0).cmd("SET colour red").unwrap(), "OK");
    assert_eq!(c.kv(0).cmd("GET colour").unwrap(), "VALUE red");
    assert_eq!(c.kv(1).cmd("GET colour").unwrap(), "VALUE blue");
    assert_eq!(parent.cmd("GET colour").unwrap(), "VALUE blue");
    assert_eq!(c.kv(2).cmd("GET new").unwrap(), "NOTFOUND");

    // Guest RAM is shared: each clone wrote few pages of the 64 MiB it maps.
    for i in 0..4 {
        let (rss, dirty) = mapping_kib(c.pid(i), "memory.bin");
        eprintln!("clone {i}: guest RAM mapping rss {rss} KiB, private dirty {dirty} KiB");
        assert!(rss > 0, "clone {i} maps the base's memory.bin");
        assert!(
            dirty < 16 * 1024,
            "clone {i}: {dirty} KiB private of 64 MiB"
        );
    }

    // A clone killed -9: the others and the parent go on; the image never changed.
    let victim = c.pid(2);
    let _ = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    assert!(KvClient::connect(c.addr(2)).is_err() || c.kv(2).cmd("COUNT").is_err());
    for i in [0, 1, 3] {
        assert_eq!(c.kv(i).cmd("GET k3").unwrap(), "VALUE v3");
    }
    assert_eq!(parent.cmd("GET colour").unwrap(), "VALUE blue");
    c.stop();
    assert_eq!(
        files(&snap),
        image,
        "the snapshot is byte for byte as it was"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the command cleaned up: {left:?}");
    vm.kill9();
}

#[test]
fn clones_of_a_protected_vm_from_its_primary_snapshot_and_its_stopped_backup() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let psock = dir.path().join("p.sock");
    let mut r = Replicated::start(&net, dir.path(), &["--control", psock.to_str().unwrap()]);
    let mut kv = r.wait_ready(Duration::from_secs(30));
    for i in 0..20 {
        assert_eq!(kv.cmd(&format!("SET a{i} x{i}")).unwrap(), "OK");
    }
    // While the backup writes its image, it is not cloned: refused, and nothing changes.
    let image = r.image_dir(0);
    let out = Command::new("ip")
        .args(["netns", "exec", &net.ns()])
        .arg(vmatrix_bin())
        .arg("clone")
        .arg(&image)
        .args(["--ip", "10.77.1.99/24", "--ready-timeout-ms", "0"])
        .arg("--work")
        .arg(dir.path().join("refused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("a running backup holds this replica image"),
        "{err}"
    );
    assert_eq!(
        kv.cmd("SET after refusal").unwrap(),
        "OK",
        "still protected"
    );

    // Clones of the live VM: from a snapshot its primary takes while it stays protected.
    let psnap = dir.path().join("psnap");
    ctl(&psock, &["snapshot", psnap.to_str().unwrap()]);
    assert_eq!(kv.cmd("SET later y").unwrap(), "OK");
    let c = Clones::start(&net, &net.ns(), &psnap, 2, &dir.path().join("w1"), 10);
    for i in 0..2 {
        assert_eq!(c.kv(i).cmd("GET a7").unwrap(), "VALUE x7");
        assert_eq!(
            c.kv(i).cmd("GET later").unwrap(),
            "NOTFOUND",
            "as of the checkpoint"
        );
    }
    c.stop();

    // Clones of the live VM from its backup: the backup exports its committed checkpoint while
    // it keeps applying checkpoints (a writer goes on meanwhile), the primary never pauses for
    // it and stays protected.
    let bsnap = dir.path().join("bsnap");
    let acked = writes_during(net.guest_addr(), || {
        let a = ctl(&r.backup_socket(0), &["snapshot", bsnap.to_str().unwrap()]);
        eprintln!("backup export: {a}");
        assert!(json_field(&a, "memory_crc32").is_some(), "{a}");
    });
    assert_eq!(kv.cmd("SET bafter z").unwrap(), "OK", "still protected");
    let c = Clones::start(&net, &net.ns(), &bsnap, 2, &dir.path().join("w3"), 30);
    for i in 0..2 {
        let mut k = c.kv(i);
        assert_eq!(
            k.cmd("GET later").unwrap(),
            "VALUE y",
            "acknowledged before"
        );
        assert_eq!(k.cmd("GET bafter").unwrap(), "NOTFOUND", "as of the export");
        for key in &acked.before {
            assert_eq!(k.cmd(&format!("GET {key}")).unwrap(), "VALUE v", "{key}");
        }
    }
    c.stop();

    // The stopped backup's image: every acknowledged write, and the image stays as it was.
    r.finalize_backup();
    let before = files(&image);
    let c = Clones::start(&net, &net.ns(), &image, 2, &dir.path().join("w2"), 20);
    for i in 0..2 {
        assert_eq!(c.kv(i).cmd("GET later").unwrap(), "VALUE y");
        assert_eq!(c.kv(i).cmd("GET after").unwrap(), "VALUE refusal");
    }
    c.stop();
    let after = files(&image);
    for name in ["memory.bin", "disk.img", "replica.bin"] {
        let p = image.join(name);
        assert!(before[&p] == after[&p], "{name} unchanged");
    }
}

/// Keys a writer set (value `v`), split by whether they were acknowledged before `during` began.
struct Acked {
    before: Vec<String>,
}

/// Runs `during` while a second client writes keys `w<i>` as fast as it is answered.
fn writes_during(addr: SocketAddr, during: impl FnOnce()) -> Acked {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (s, d) = (stop.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        let mut c = KvClient::connect(addr).expect("writer connects");
        c.set_timeout(Duration::from_secs(10));
        let mut i = 0;
        while !s.load(Ordering::SeqCst) {
            assert_eq!(c.cmd(&format!("SET w{i} v")).unwrap(), "OK");
            i += 1;
            d.store(i, Ordering::SeqCst);
        }
        i
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = done.load(Ordering::SeqCst);
    during();
    stop.store(true, Ordering::SeqCst);
    let total = writer.join().expect("the writer saw no error");
    assert!(total > before, "writes went on during the export");
    Acked {
        before: (0..before).map(|i| format!("w{i}")).collect(),
    }
}

#[test]
fn bad_images_are_refused_with_a_clear_error_and_left_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let run = |image: &Path| {
        let out = Command::new(vmatrix_bin())
            .arg("clone")
            .arg(image)
            .args(["--ip", "10.0.0.10/24", "--ready-timeout-ms", "0"])
            .arg("--work")
            .arg(dir.path().join("work"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(run(&empty).contains("not a VM image"), "{}", run(&empty));

    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("snapshot.bin"), b"VMXSNAP\0garbage garbage").unwrap();
    std::fs::write(bad.join("memory.bin"), vec![7u8; 8192]).unwrap();
    let before = files(&bad);
    let e = run(&bad);
    assert!(e.contains("snapshot") && e.contains("bad"), "{e}");
    assert_eq!(files(&bad), before);

    let rep = dir.path().join("replica");
    std::fs::create_dir(&rep).unwrap();
    std::fs::write(rep.join("replica.bin"), vec![1u8; 100]).unwrap();
    let before = files(&rep);
    let e = run(&rep);
    assert!(e.contains("replica image"), "{e}");
    let after = files(&rep);
    assert_eq!(
        after.get(&rep.join("replica.bin")),
        before.get(&rep.join("replica.bin"))
    );
    assert!(
        std::fs::read_dir(dir.path().join("work").join("base"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "no clone base was left"
    );
}
