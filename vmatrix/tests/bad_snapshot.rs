//! Bad snapshots are refused with a clear, typed error naming what is wrong: every part
//! truncated at its boundaries, one flipped bit in each part, wrong magic or version, huge
//! length fields, a missing part. No VM is started from any of them.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;
use vmm::snapshot::{load_chain, read_meta, MemoryPart};

/// A full snapshot and a diff on top of it (with disk writes in between), of the real guest.
fn make_snapshots(net: &TestNet, dir: &Path) -> (PathBuf, PathBuf) {
    let disk = dir.join("disk.img");
    make_disk(&disk, 8);
    let sock = dir.join("ctl.sock");
    let mut vm = VmProc::spawn_with(
        net,
        &disk,
        &dir.join("c.log"),
        32,
        &["--control", sock.to_str().unwrap()],
    );
    let mut kv = vm.wait_ready(Duration::from_secs(20));
    wait_socket(&sock, Duration::from_secs(5));
    assert_eq!(kv.cmd("SET a 1").unwrap(), "OK");
    let full = dir.join("full");
    ctl(&sock, &["snapshot", full.to_str().unwrap()]);
    for i in 0..20 {
        assert_eq!(kv.cmd(&format!("SET k{i} v{i}")).unwrap(), "OK");
    }
    let diff = dir.join("diff");
    ctl(&sock, &["snapshot", diff.to_str().unwrap(), "--diff"]);
    vm.kill9();
    load_chain(&diff).expect("the untouched chain verifies");
    (full, diff)
}

/// Applies `damage` to `file`, checks the chain at `check` is refused with an error containing
/// `needle`, then puts the file back.
fn refused(file: &Path, check: &Path, needle: &str, damage: impl FnOnce(&std::fs::File, u64)) {
    let original = std::fs::read(file).unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .unwrap();
        damage(&f, original.len() as u64);
    }
    let err = match load_chain(check) {
        Ok(_) => panic!("{} damaged but accepted", file.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(needle),
        "error for {}: {err:?} should mention {needle:?}",
        file.display()
    );
    // Restore the file exactly (sparse again: zero ranges are not written).
    let f = std::fs::File::create(file).unwrap();
    f.set_len(original.len() as u64).unwrap();
    for (i, chunk) in original.chunks(1 << 16).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, (i as u64) << 16).unwrap();
        }
    }
    drop(f);
    load_chain(check).expect("the repaired chain verifies again");
}

fn truncate_at(cut: u64) -> impl FnOnce(&std::fs::File, u64) {
    move |f, _| f.set_len(cut).unwrap()
}

fn flip_at(off: u64) -> impl FnOnce(&std::fs::File, u64) {
    move |f, _| {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, off).unwrap();
    }
}

#[test]
fn every_damaged_part_is_refused_with_its_own_error() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (full, diff) = make_snapshots(&net, dir.path());
    let meta_len = std::fs::metadata(full.join("snapshot.bin")).unwrap().len();

    // snapshot.bin: truncated at every boundary of its framing, and in the body.
    for cut in [
        0,
        4,
        8,
        12,
        19,
        20,
        meta_len / 2,
        meta_len - 4,
        meta_len - 1,
    ] {
        refused(
            &full.join("snapshot.bin"),
            &full,
            "snapshot.bin",
            truncate_at(cut),
        );
    }
    refused(&full.join("snapshot.bin"), &full, "bad magic", |f, _| {
        f.write_all_at(b"XX", 0).unwrap()
    });
    refused(&full.join("snapshot.bin"), &full, "version 7", |f, _| {
        f.write_all_at(&7u32.to_le_bytes(), 8).unwrap()
    });
    refused(
        &full.join("snapshot.bin"),
        &full,
        "exceeds the limit",
        |f, _| f.write_all_at(&u64::MAX.to_le_bytes(), 12).unwrap(),
    );
    refused(
        &full.join("snapshot.bin"),
        &full,
        "CRC32",
        flip_at(meta_len / 2),
    );
    refused(
        &full.join("snapshot.bin"),
        &full,
        "CRC32",
        flip_at(meta_len - 2),
    );

    // memory.bin of the full snapshot: truncated, a flipped bit in stored data, a flipped bit
    // in a hole (a zero page the snapshot does not list).
    let mem = full.join("memory.bin");
    let mem_len = std::fs::metadata(&mem).unwrap().len();
    for cut in [0, 4096, mem_len / 2, mem_len - 1] {
        refused(&mem, &full, "memory.bin", truncate_at(cut));
    }
    let meta = read_meta(&full).unwrap();
    let MemoryPart::Full { extents, .. } = &meta.memory else {
        panic!("full memory part")
    };
    let (first, count) = extents[extents.len() / 2];
    refused(
        &mem,
        &full,
        "memory.bin is corrupt",
        flip_at((first + count / 2) * 4096 + 100),
    );
    let hole = (1..mem_len / 4096)
        .find(|p| !extents.iter().any(|&(f, c)| *p >= f && *p < f + c))
        .expect("a zero page");
    refused(
        &mem,
        &full,
        "memory.bin is invalid",
        flip_at(hole * 4096 + 7),
    );

    // disk.img: truncated, and one flipped bit.
    let disk = full.join("disk.img");
    let disk_len = std::fs::metadata(&disk).unwrap().len();
    for cut in [0, disk_len / 2, disk_len - 1] {
        refused(&disk, &full, "disk.img", truncate_at(cut));
    }
    refused(&disk, &full, "disk.img is corrupt", flip_at(disk_len / 3));

    // The diff: its own parts, and its parent's, are all checked through the chain.
    for name in ["snapshot.bin", "memory.bin", "disk.delta"] {
        let p = diff.join(name);
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len > 16, "{name} has content");
        for cut in [0, len / 2, len - 1] {
            refused(&p, &diff, name, truncate_at(cut));
        }
        refused(&p, &diff, name, flip_at(len / 2));
    }
    refused(
        &mem,
        &diff,
        "memory.bin",
        flip_at((first + count / 2) * 4096 + 100),
    );

    // A missing part.
    std::fs::rename(diff.join("memory.bin"), dir.path().join("moved")).unwrap();
    assert!(load_chain(&diff)
        .unwrap_err()
        .to_string()
        .contains("memory.bin"));
    std::fs::rename(dir.path().join("moved"), diff.join("memory.bin")).unwrap();
}

#[test]
fn restore_of_a_bad_snapshot_fails_cleanly_and_starts_no_vm() {
    let net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (full, _diff) = make_snapshots(&net, dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(full.join("disk.img"))
        .unwrap();
    f.write_all_at(&[0xff; 16], 12345).unwrap();
    drop(f);
    let console = dir.path().join("restore.log");
    let vm = VmProc::restore(&net, &full, &console, &[]);
    let (ok, stderr) = vm.wait_output();
    assert!(!ok, "restore must fail");
    assert!(stderr.contains("disk.img is corrupt"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap_or_default(),
        "",
        "no guest ran"
    );
}
