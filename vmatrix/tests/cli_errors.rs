//! Every bad input to `vmatrix run` / `vmatrix disk create` gives a clear message and a
//! non-zero exit; a faulting guest ends the VM with the cause and the guest RIP.

#[path = "../../vmm/tests/common/elf.rs"]
mod elf;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use support::*;

fn vmatrix(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(vmatrix_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run vmatrix")
}

fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}; got: {err}"
    );
    assert!(!err.contains("panicked"), "must not panic: {err}");
}

fn run_args<'a>(guest: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "--guest", guest, "--mem-mib", "32"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn no_kvm_device() {
    let g = guest_elf();
    let out = vmatrix(
        &run_args(g.to_str().unwrap(), &[]),
        &[("VMATRIX_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_fails_with(&out, "/nonexistent/kvm does not exist");
}

#[test]
fn no_permission_on_kvm() {
    require_kvm();
    // Run as 'nobody' from a world-readable copy of the binary and guest.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("vmatrix");
    let guest = dir.path().join("guest.elf");
    std::fs::copy(vmatrix_bin(), &bin).unwrap();
    std::fs::copy(guest_elf(), &guest).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--guest", guest.to_str().unwrap(), "--mem-mib", "32"])
        .output()
        .expect("setpriv");
    assert_fails_with(&out, "permission denied opening /dev/kvm");
}

#[test]
fn missing_guest_elf() {
    require_kvm();
    let out = vmatrix(&run_args("/nonexistent/guest.elf", &[]), &[]);
    assert_fails_with(&out, "cannot read guest ELF /nonexistent/guest.elf");
}

#[test]
fn malformed_guest_elf() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "this is not an ELF file at all, just a text file that is long enough to hold a header",
    )
    .unwrap();
    let out = vmatrix(&run_args(text.to_str().unwrap(), &[]), &[]);
    assert_fails_with(&out, "malformed guest ELF: bad magic");

    let truncated = dir.path().join("truncated.elf");
    let bytes = std::fs::read(guest_elf()).unwrap();
    std::fs::write(&truncated, &bytes[..200]).unwrap();
    let out = vmatrix(&run_args(truncated.to_str().unwrap(), &[]), &[]);
    assert_fails_with(&out, "malformed guest ELF");
}

#[test]
fn missing_disk() {
    let g = guest_elf();
    let out = vmatrix(
        &run_args(g.to_str().unwrap(), &["--disk", "/nonexistent/disk.img"]),
        &[],
    );
    assert_fails_with(&out, "disk image /nonexistent/disk.img does not exist");
}

#[test]
fn tap_that_cannot_be_opened() {
    require_kvm();
    let g = guest_elf();
    let out = vmatrix(
        &run_args(g.to_str().unwrap(), &["--tap", "vmxnosuchtap"]),
        &[],
    );
    assert_fails_with(&out, "cannot open tap device 'vmxnosuchtap'");
    let out = vmatrix(
        &run_args(
            g.to_str().unwrap(),
            &["--tap", "a-name-far-too-long-for-linux"],
        ),
        &[],
    );
    assert_fails_with(&out, "cannot open tap device");
}

#[test]
fn too_little_and_too_much_memory() {
    require_kvm();
    let g = guest_elf();
    let out = vmatrix(
        &["run", "--guest", g.to_str().unwrap(), "--mem-mib", "4"],
        &[],
    );
    assert_fails_with(&out, "guest memory of 4 MiB is invalid");
    let out = vmatrix(
        &["run", "--guest", g.to_str().unwrap(), "--mem-mib", "999999"],
        &[],
    );
    assert_fails_with(&out, "guest memory of 999999 MiB is invalid");
}

#[test]
fn bad_guest_config_and_config_file() {
    let g = guest_elf();
    let out = vmatrix(
        &run_args(g.to_str().unwrap(), &["--guest-config", "ip=10.0.0.300/24"]),
        &[],
    );
    assert_fails_with(&out, "invalid --guest-config");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, "guest = 42\n").unwrap();
    let out = vmatrix(&["run", "--config", cfg.to_str().unwrap()], &[]);
    assert_fails_with(&out, "invalid config file");
    let out = vmatrix(&["run"], &[]);
    assert_fails_with(&out, "no guest ELF");
}

#[test]
fn bad_disk_create() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.img");
    let ps = p.to_str().unwrap();
    assert_fails_with(
        &vmatrix(&["disk", "create", ps, "--size-mib", "0"], &[]),
        "--size-mib",
    );
    let ok = vmatrix(&["disk", "create", ps, "--size-mib", "2"], &[]);
    assert!(ok.status.success());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
    assert_fails_with(
        &vmatrix(&["disk", "create", ps, "--size-mib", "2"], &[]),
        "already exists",
    );
    assert_fails_with(
        &vmatrix(
            &[
                "disk",
                "create",
                "/nonexistent/dir/d.img",
                "--size-mib",
                "2",
            ],
            &[],
        ),
        "cannot create",
    );
}

fn run_tiny(code: &[u8]) -> Output {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("tiny.elf");
    std::fs::write(&elf, elf::tiny_elf(code)).unwrap();
    assert!(Path::new(&elf).exists());
    vmatrix(
        &["run", "--guest", elf.to_str().unwrap(), "--mem-mib", "16"],
        &[],
    )
}

#[test]
fn guest_fault_names_cause_and_rip() {
    // nop; nop; ud2  -> #UD with no IDT -> triple fault at 0x200002.
    let out = run_tiny(&[0x90, 0x90, 0x0f, 0x0b]);
    assert_fails_with(&out, "guest fault at rip 0x200002: triple fault");
    // hlt is privileged in ring 3 -> #GP -> triple fault at the hlt.
    let out = run_tiny(&[0xf4]);
    assert_fails_with(&out, "guest fault at rip 0x200000");
}

#[test]
fn guest_exit_code_is_reported() {
    // mov rax, 0xd0000038; mov qword [rax], 7   -> platform EXIT register with code 7.
    let code = [
        0xb8, 0x38, 0x00, 0x00, 0xd0, // mov eax, 0xd0000038 (zero-extends into rax)
        0x48, 0xc7, 0x00, 0x07, 0x00, 0x00, 0x00, // mov qword [rax], 7
        0x0f, 0x0b, // ud2 (never reached)
    ];
    let out = run_tiny(&code);
    assert_fails_with(&out, "guest stopped with exit code 0x7");
}

#[test]
fn certs_init_and_issue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("pki");
    let ds = d.to_str().unwrap();
    assert!(vmatrix(&["certs", "init", ds], &[]).status.success());
    assert_fails_with(
        &vmatrix(&["certs", "init", ds], &[]),
        "already holds a cluster CA",
    );
    assert!(vmatrix(&["certs", "issue", ds, "--host", "backup1"], &[])
        .status
        .success());
    assert!(d.join("backup1.pem").exists() && d.join("backup1.key").exists());
    assert_fails_with(
        &vmatrix(&["certs", "issue", ds, "--host", "bad name"], &[]),
        "host name",
    );
    let empty = dir.path().join("empty");
    assert_fails_with(
        &vmatrix(
            &["certs", "issue", empty.to_str().unwrap(), "--host", "h"],
            &[],
        ),
        "ca.key",
    );
}

#[test]
fn bad_data_ports_are_refused_before_anything_listens() {
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("image");
    let img = image.to_str().unwrap();
    let base = |ports: &'static str| {
        vec![
            "backup",
            "--listen",
            "127.0.0.1:7190",
            "--image-dir",
            img,
            "--certs",
            "/nonexistent",
            "--host",
            "b",
            "--data-ports",
            ports,
        ]
    };
    for (ports, needle) in [
        ("7191,7191", "port 7191 given twice"),
        ("7190", "is the listening port"),
        ("1,2,3,4,5,6,7,8,9", "at most 8 ports"),
    ] {
        assert_fails_with(&vmatrix(&base(ports), &[]), needle);
    }
    let mut both = base("7191");
    both.extend(["--data-sockets", "2"]);
    assert_fails_with(&vmatrix(&both, &[]), "cannot be used with");
    // The apply path pinned to a CPU this process may not run on: refused at once.
    let mut pinned = base("7191");
    pinned.extend(["--apply-cpus", "1023"]);
    assert_fails_with(
        &vmatrix(&pinned, &[]),
        "--apply-cpus: CPU 1023 is not one this process may run on",
    );
}
