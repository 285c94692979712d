//! What the failover agent does to `vmatrix primary` and `vmatrix backup` through their control
//! sockets, on real KVM, taps and network namespaces: fencing a backup (a primary of an older
//! term is refused and exits with code 3, at its connection or in a running session; the term
//! survives a restart of the backup), promoting a backup (its image becomes the VM of a new
//! primary at the new term, started unprotected with `--from-image`, then protected again by
//! `PUT /backups`), and fencing a running primary (it stops and releases nothing more). And the
//! control API itself, raw HTTP on a protected VM's socket: every resource, the errors (400 bad
//! JSON, 404, 405, 409, 413) that leave the VM running, a silent client, and a handover (exit 4).

mod support;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use support::*;

/// Waits for the primary process to exit; its exit code and stderr.
fn exit_of(p: &mut VmProc, timeout: Duration) -> (Option<i32>, String) {
    let st = wait_exit(&mut p.child, timeout);
    // (The stderr pipe is drained by a thread: give it a moment.)
    std::thread::sleep(Duration::from_millis(100));
    let text = p.stderr_text();
    let st = st.unwrap_or_else(|| panic!("the primary did not exit; stderr:\n{text}"));
    (st.code(), text)
}

/// Starts a booted primary at `term` protected by the backup at `backup` (`name@addr`).
fn booted_primary(
    net: &TestNet,
    dir: &Path,
    (host, term): (&str, u64),
    backup: &str,
    console: &str,
) -> (VmProc, std::path::PathBuf) {
    let socket = dir.join(format!("{console}.sock"));
    let disk = dir.join("disk.img");
    if !disk.exists() {
        make_disk(&disk, 16);
    }
    let mut args = primary_args(net, dir, &disk, host, term, &socket);
    args.extend(["--backup".into(), backup.into()]);
    let p = VmProc::spawn_args(net, &dir.join(format!("{console}.log")), &args);
    (p, socket)
}

#[test]
fn a_fenced_backup_refuses_an_older_primary_and_keeps_its_term_across_restarts() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, &["primary", "backup"]);
    let listen = net.backup_listen(0);
    let image = d.join("image");
    let mut b = BackupProc::spawn(&net.backup_ns(), d, "backup", &listen, &image);
    let st = b.ctl(&["status"]);
    assert_eq!(json_field(&st, "seq"), None, "no image yet: {st}");
    assert_eq!(json_field(&st, "min_term").as_deref(), Some("0"), "{st}");
    assert_eq!(b.ctl(&["fence", "5"]), r#"{"min_term":5}"#);
    assert_eq!(
        b.ctl(&["fence", "3"]),
        r#"{"min_term":5}"#,
        "an older term changes nothing"
    );

    // The term is persisted: a restarted backup still refuses older primaries.
    b.stop();
    let persisted = std::fs::read_to_string(image.join("min-term")).unwrap();
    assert_eq!(persisted.trim(), "5");
    drop(b);
    let b = BackupProc::spawn(&net.backup_ns(), d, "backup", &listen, &image);
    let st = b.ctl(&["status"]);
    assert_eq!(json_field(&st, "min_term").as_deref(), Some("5"), "{st}");

    let (mut old, _) = booted_primary(&net, d, ("primary", 1), &format!("backup@{listen}"), "p1");
    let (code, stderr) = exit_of(&mut old, Duration::from_secs(30));
    assert_eq!(
        code,
        Some(3),
        "a fenced primary exits with 3; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("vmatrix primary: fenced by term 5 (this primary has term 1)"),
        "{stderr}"
    );

    // A primary of the fenced term is welcome.
    let (mut p5, sock) = booted_primary(&net, d, ("primary", 5), &format!("backup@{listen}"), "p5");
    let mut c = p5.wait_ready(Duration::from_secs(30));
    assert_eq!(c.cmd("SET k v").unwrap(), "OK");
    let st = wait_status(&sock, "protected", |v| v == "true", Duration::from_secs(10));
    assert_eq!(json_field(&st, "term").as_deref(), Some("5"), "{st}");
    let bst = wait_status(&b.socket, "seq", |_| true, Duration::from_secs(10));
    assert_eq!(json_field(&bst, "term").as_deref(), Some("5"), "{bst}");

    // Fencing the backup while that primary's session runs ends the session and fences it.
    assert_eq!(b.ctl(&["fence", "6"]), r#"{"min_term":6}"#);
    let (code, stderr) = exit_of(&mut p5, Duration::from_secs(10));
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("vmatrix primary: fenced by term 6 (this primary has term 5)"),
        "{stderr}"
    );
}

/// Promotes `bb` (to term 2) while it exports its image (a clone base): the promotion is
/// answered at once, and the export either completes (a whole snapshot) or fails and is no
/// snapshot. Returns the promoted checkpoint.
fn promote_beside_an_export(bb: &BackupProc, d: &Path) -> String {
    // An export (a clone base) asked for just before the promotion never holds it back: it
    // either completes (a whole snapshot) or fails and leaves nothing.
    let export = d.join("export");
    let (sock, e) = (bb.socket.clone(), export.clone());
    let exporting = std::thread::spawn(move || {
        std::process::Command::new(vmatrix_bin())
            .arg("ctl")
            .arg(&sock)
            .arg("snapshot")
            .arg(&e)
            .output()
            .unwrap()
    });
    // (Promoted once the export is under way: its files exist.)
    let t0 = std::time::Instant::now();
    while !export.join("memory.bin").exists() && !exporting.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the export never started"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let t0 = std::time::Instant::now();
    let answer = bb.ctl(&["promote", "2"]);
    let seq = json_field(&answer, "checkpoint").unwrap_or_else(|| panic!("{answer}"));
    let took = t0.elapsed();
    eprintln!("promoted in {} ms beside an export", took.as_millis());
    assert!(
        took < Duration::from_secs(5),
        "a promotion waited for an export: {took:?}"
    );
    let out = exporting.join().unwrap();
    eprintln!(
        "the export beside it: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    match out.status.success() {
        true => vmatrix_snapshot_loads(&export),
        // (A failed export's directory is removed on a thread: the backup may have exited
        // first, leaving part of it; nothing there is a snapshot a clone would start from.)
        false => assert!(
            !export.join("snapshot.bin").exists(),
            "a failed export is no snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    seq
}

/// `dir` is a whole snapshot: its chain loads and its memory verifies.
fn vmatrix_snapshot_loads(dir: &Path) {
    let chain = vmm::snapshot::load_chain(dir).expect("the export is a snapshot");
    let m = &chain[0].meta;
    vmm::snapshot::memory::verify(&dir.join("memory.bin"), &m.memory, m.mem_size)
        .expect("its memory verifies");
}

#[test]
fn a_promoted_backup_serves_every_acknowledged_write_and_is_protected_again() {
    let net = TestNet::two_hosts();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, &["hosta", "hostb"]);
    let (a_ns, b_ns) = (net.ns(), net.backup_ns());
    let b_listen = format!("10.79.{}.2:7100", net.index);
    let a_listen = format!("10.79.{}.1:7101", net.index);

    // Host A runs the primary (term 1), host B its backup.
    let mut bb = BackupProc::spawn(&b_ns, d, "hostb", &b_listen, &d.join("image-b"));
    let (mut pa, _) = booted_primary(&net, d, ("hosta", 1), &format!("hostb@{b_listen}"), "pa");
    let mut c = pa.wait_ready(Duration::from_secs(30));
    let mut acked: HashMap<String, String> = HashMap::new();
    for i in 0..120 {
        let (k, v) = (format!("key{}", i % 40), format!("v{i}"));
        assert_eq!(c.cmd(&format!("SET {k} {v}")).unwrap(), "OK");
        acked.insert(k, v);
    }
    let st = bb.ctl(&["status"]);
    assert!(json_field(&st, "seq").is_some(), "{st}");

    // Host A dies. The backup says checkpoints stopped arriving.
    pa.kill9();
    wait_status(
        &bb.socket,
        "last_checkpoint_ms_ago",
        |v| v.parse::<u64>().is_ok_and(|ms| ms >= 300),
        Duration::from_secs(5),
    );
    let seq = promote_beside_an_export(&bb, d);
    let st = wait_exit(&mut bb.child, Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", bb.log_text());
    let log = bb.log_text();
    assert!(
        log.contains(&format!(
            "vmatrix backup: image is a snapshot of checkpoint {seq}"
        )),
        "{log}"
    );

    // The image runs as the new primary (term 2) on host B, unprotected, with no backup; the
    // guest's gratuitous ARP moves its address to host B.
    let sock_b = d.join("pb.sock");
    let mut args: Vec<OsString> = vec![
        "primary".into(),
        "--from-image".into(),
        d.join("image-b").into(),
        "--tap".into(),
        "tap0".into(),
        "--unprotected-start".into(),
    ];
    args.extend(from_image_common(d, "hostb", 2, &sock_b));
    let mut pb = VmProc::spawn_in(&net, &b_ns, &d.join("pb.log"), &args);
    let mut c2 = pb.wait_ready(Duration::from_secs(30));
    for (k, v) in &acked {
        assert_eq!(c2.cmd(&format!("GET {k}")).unwrap(), format!("VALUE {v}"));
    }
    let st = ctl(&sock_b, &["status"]);
    for (k, v) in [
        ("term", "2"),
        ("protected", "false"),
        ("backups", "0"),
        ("output_held", "false"),
    ] {
        assert_eq!(json_field(&st, k).as_deref(), Some(v), "{k}: {st}");
    }

    // A fresh backup on host A protects it again.
    let ba = BackupProc::spawn(&a_ns, d, "hosta", &a_listen, &d.join("image-a"));
    let set = format!("hosta@{a_listen}");
    assert_eq!(ctl(&sock_b, &["backups", &set]), r#"{"backups":1}"#);
    let st = wait_status(
        &sock_b,
        "protected",
        |v| v == "true",
        Duration::from_secs(20),
    );
    assert_eq!(
        json_field(&st, "output_held").as_deref(),
        Some("true"),
        "{st}"
    );
    assert_eq!(json_field(&st, "backups").as_deref(), Some("1"), "{st}");
    assert_eq!(c2.cmd("SET after yes").unwrap(), "OK");
    let bst = ba.ctl(&["status"]);
    assert_eq!(json_field(&bst, "term").as_deref(), Some("2"), "{bst}");
    assert!(json_field(&bst, "seq").is_some(), "{bst}");
}

#[test]
fn a_fenced_primary_stops_and_releases_no_more_output() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("primary.sock");
    let mut r = Replicated::start(&net, d, &["--control", sock.to_str().unwrap()]);
    let mut c = r.wait_ready(Duration::from_secs(30));
    assert_eq!(c.cmd("SET k1 v1").unwrap(), "OK");
    let st = wait_status(&sock, "protected", |v| v == "true", Duration::from_secs(10));
    for (k, v) in [
        ("term", "1"),
        ("backups", "1"),
        ("backups_in_step", "1"),
        ("output_held", "true"),
    ] {
        assert_eq!(json_field(&st, k).as_deref(), Some(v), "{k}: {st}");
    }
    assert!(json_field(&st, "acked_seq").is_some(), "{st}");
    assert_eq!(ctl(&sock, &["fence", "1"]), r#"{"fenced":false,"term":1}"#);

    // The backup stops acknowledging: the reply to the next write is held.
    r.signal_backup("-STOP");
    c.set_timeout(Duration::from_millis(500));
    assert!(
        c.cmd("SET k2 v2").is_err(),
        "the reply waits for its checkpoint"
    );
    assert_eq!(ctl(&sock, &["fence", "2"]), r#"{"fenced":true,"term":2}"#);
    r.signal_backup("-CONT");
    let (code, stderr) = exit_of(&mut r.primary, Duration::from_secs(10));
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("vmatrix primary: fenced by term 2 (this primary has term 1)"),
        "{stderr}"
    );
    // The held reply never left (any line read here would be it).
    c.set_timeout(Duration::from_secs(2));
    let got = c.cmd("GET k1");
    assert!(got.is_err(), "output left after the fence: {got:?}");
}

/// The JSON body of an answer.
fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Asserts an error answer: its status code and a message containing `want`.
fn refused((code, body): (u16, String), want_code: u16, want: &str) {
    assert_eq!(code, want_code, "{body}");
    let msg = json(&body)["error"].as_str().unwrap_or("").to_string();
    assert!(msg.contains(want), "{want_code} '{want}': {body}");
}

#[test]
fn the_control_api_over_http_on_a_protected_vm() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("primary.sock");
    let mut r = Replicated::start(&net, d, &["--control", sock.to_str().unwrap()]);
    let mut c = r.wait_ready(Duration::from_secs(30));
    assert_eq!(c.cmd("SET k1 v1").unwrap(), "OK");
    wait_status(&sock, "protected", |v| v == "true", Duration::from_secs(10));

    status_and_curl(&sock);
    pause_checksum_snapshot_resume(&sock, d);
    bad_requests_are_refused(&sock);

    // A client that connects and says nothing delays no one.
    let _silent = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(http(&sock, "GET", "/status", "").0, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );

    // The VM kept running and protected through all of it.
    assert_eq!(c.cmd("SET k2 v2").unwrap(), "OK");
    assert_eq!(c.cmd("GET k1").unwrap(), "VALUE v1");
    let st = json(&http(&sock, "GET", "/status", "").1);
    assert_eq!(st["protected"], true, "{st}");

    // The backup serves its own resources only.
    let bsock = r.backup_socket(0);
    let (code, body) = http(&bsock, "GET", "/status", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["role"], "backup", "{body}");
    assert!(json(&body)["seq"].is_u64(), "{body}");
    refused(
        http(&bsock, "PUT", "/state", r#"{"state":"paused"}"#),
        404,
        "a backup serves GET /status, PUT /stop, PUT /fence, PUT /promote and PUT /snapshot",
    );

    // PUT /handover: the backups hold the paused guest's last checkpoint; exit code 4.
    let (code, body) = http(&sock, "PUT", "/handover", "");
    assert_eq!(code, 200, "{body}");
    let seq = json(&body)["checkpoint"].as_u64().expect("a checkpoint");
    let (code, stderr) = exit_of(&mut r.primary, Duration::from_secs(10));
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("handed over"), "{stderr}");
    let bst = json(&http(&bsock, "GET", "/status", "").1);
    assert!(bst["seq"].as_u64() >= Some(seq), "{bst} vs {seq}");
}

/// GET /status: the VM's and the replication's figures, numbers as numbers; and curl.
fn status_and_curl(sock: &Path) {
    let (code, body) = http(sock, "GET", "/status", "");
    assert_eq!(code, 200, "{body}");
    let st = json(&body);
    assert_eq!(st["role"], "primary", "{body}");
    // ("paused" too for the millisecond a checkpoint pauses the VM.)
    assert!(
        ["running", "paused"].contains(&st["state"].as_str().unwrap()),
        "{body}"
    );
    assert_eq!(st["mem_mib"], 32, "{body}");
    assert_eq!(st["term"], 1, "{body}");
    assert_eq!(st["protected"], true, "{body}");
    assert!(st["epochs"].is_u64() && st["acked_seq"].is_u64(), "{body}");
    // curl, as the docs show it.
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(sock)
        .arg("http://localhost/status")
        .output()
    {
        assert_eq!(
            json(&String::from_utf8_lossy(&out.stdout))["role"],
            "primary"
        );
    }
}

/// PUT /state (idempotent), GET /checksum only while paused, PUT /snapshot of the paused VM.
fn pause_checksum_snapshot_resume(sock: &Path, d: &Path) {
    refused(http(sock, "GET", "/checksum", ""), 409, "must be paused");
    for _ in 0..2 {
        let (code, body) = http(sock, "PUT", "/state", r#"{"state":"paused"}"#);
        assert_eq!((code, body.as_str()), (200, r#"{"state":"paused"}"#));
    }
    assert_eq!(json(&http(sock, "GET", "/status", "").1)["state"], "paused");
    let (code, body) = http(sock, "GET", "/checksum", "");
    assert_eq!(code, 200, "{body}");
    let crc = json(&body)["memory_crc32"].as_u64().expect("a number");

    // PUT /snapshot of the paused VM: its memory is the checksum's.
    let snap = d.join("snap");
    let req = serde_json::json!({ "kind": "full", "dir": snap }).to_string();
    let (code, body) = http(sock, "PUT", "/snapshot", &req);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["memory_crc32"].as_u64(), Some(crc), "{body}");
    refused(
        http(sock, "PUT", "/snapshot", &req),
        409,
        "already holds a snapshot",
    );
    let req = r#"{"kind":"diff","dir":"relative/dir"}"#;
    refused(http(sock, "PUT", "/snapshot", req), 400, "absolute path");
    let (code, body) = http(sock, "PUT", "/state", r#"{"state":"running"}"#);
    assert_eq!((code, body.as_str()), (200, r#"{"state":"running"}"#));
}

/// Bad requests are refused clearly (and change nothing); a few good ones.
fn bad_requests_are_refused(sock: &Path) {
    refused(
        http(sock, "PUT", "/state", r#"{"state":"#),
        400,
        "invalid JSON body: EOF while parsing",
    );
    refused(
        http(sock, "PUT", "/state", r#"{"state":"asleep"}"#),
        400,
        "unknown variant `asleep`",
    );
    refused(
        http(sock, "PUT", "/fence", r#"{"term":"x"}"#),
        400,
        "invalid type",
    );
    refused(
        http(sock, "PUT", "/backups", r#"{"backups":["nowhere"]}"#),
        400,
        "'nowhere' is not host:port",
    );
    refused(http(sock, "GET", "/reboot", ""), 404, "no resource /reboot");
    refused(
        http(sock, "PUT", "/promote", r#"{"term":2}"#),
        404,
        "PUT /promote is not served by a primary",
    );
    refused(http(sock, "POST", "/status", ""), 405, "GET only");
    let big = format!(r#"{{"backups":["{}"]}}"#, "b".repeat(20 << 10));
    refused(http(sock, "PUT", "/backups", &big), 413, "exceeds");
    let (code, body) = http(sock, "PUT", "/faults/disk", r#"{"count":0}"#);
    assert_eq!((code, body.as_str()), (200, r#"{"failing_writes":0}"#));
    let (code, body) = http(sock, "PUT", "/fence", r#"{"term":1}"#);
    assert_eq!((code, body.as_str()), (200, r#"{"fenced":false,"term":1}"#));
}
