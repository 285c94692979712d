//! `cargo bench -p vmatrix --bench snapshot`: the pause time of a diff snapshot as a function of
//! dirty pages, next to a plain memcpy of the same pages measured in the same run, for 256 MiB
//! and 2 GiB guests; and restore time (command to KV port answering) for the same sizes.
//! Prints Markdown for docs/BENCHMARKS.md. Needs root and /dev/kvm.

#[path = "../../vmm/tests/common/elf.rs"]
mod elf;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::serial::ConsoleOut;
use vmm::{SnapshotKind, Vm, VmConfig};

const CTRL: u64 = 0x30_0000;

/// Dirties `[CTRL]` pages from 4 MiB on, bumps `[CTRL+8]`, waits 100 µs, repeats.
const TOUCHER: &[u8] = &[
    0xbb, 0x00, 0x00, 0x30, 0x00, // mov ebx, 0x300000
    0x48, 0x8b, 0x0b, // mov rcx, [rbx]
    0xbf, 0x00, 0x00, 0x40, 0x00, // mov edi, 0x400000
    0x48, 0x85, 0xc9, // test rcx, rcx
    0x74, 0x0e, // jz done
    0x88, 0x07, // loop: mov [rdi], al
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xf2, // jnz loop
    0x48, 0xff, 0x43, 0x08, // done: inc qword [rbx+8]
    0xb8, 0x10, 0x00, 0x00, 0xd0, // mov eax, 0xd0000010
    0x48, 0xc7, 0x00, 0xa0, 0x86, 0x01, 0x00, // mov qword [rax], 100000
    0xeb, 0xce, // jmp start
];

struct Null;
impl std::io::Write for Null {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn passes(vm: &Vm) -> u64 {
    vm.memory().read_obj(GuestAddress(CTRL + 8)).unwrap()
}

fn pause_table(mem_mib: u64) {
    let dir = tempfile::tempdir().unwrap();
    let elf_path = dir.path().join("toucher.elf");
    std::fs::write(&elf_path, elf::tiny_elf(TOUCHER)).unwrap();
    let vm = Vm::new(VmConfig {
        guest_elf: elf_path,
        mem_mib,
        disk: None,
        tap: None,
        mac: [2, 0, 0, 0, 0, 1],
        guest_config: String::new(),
        console: ConsoleOut::new(Box::new(Null)),
        dirty_log: true,
        generation: 1,
    })
    .expect("VM");
    vm.start().unwrap();
    let t = Instant::now();
    let full = vm
        .snapshot(&dir.path().join("base"), SnapshotKind::Full)
        .unwrap();
    println!(
        "\n### {mem_mib} MiB guest (full snapshot first: pause {:.1} ms, {} pages stored, total {:.1} ms)\n",
        full.pause.as_secs_f64() * 1e3,
        full.pages,
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("| dirty pages (4 KiB) | pages in diff | pause p50 | pause max | memcpy of the same pages | pause / memcpy |");
    println!("|---|---|---|---|---|---|");
    let mut n_snap = 0;
    // The memcpy reference copies into a buffer that is already faulted in, as the VMM's
    // staging buffer is after the first snapshot of a given size.
    let mut buf = vec![1u8; 50_100 * 4096];
    for n in [0u64, 100, 1_000, 10_000, 50_000] {
        vm.pause().unwrap();
        vm.memory().write_obj(n, GuestAddress(CTRL)).unwrap();
        vm.resume();
        let mut pauses = Vec::new();
        let mut copies = Vec::new();
        let mut pages = 0;
        for _ in 0..5 {
            // Let the guest complete a whole pass after the previous snapshot.
            let p0 = passes(&vm);
            while passes(&vm) < p0 + 2 {
                std::thread::yield_now();
            }
            n_snap += 1;
            let s = vm
                .snapshot(&dir.path().join(format!("d{n_snap}")), SnapshotKind::Diff)
                .unwrap();
            pauses.push(s.pause);
            pages = s.pages;
            // The same number of pages copied with plain memcpy, same run, same memory.
            let len = (s.pages as usize).max(1) * 4096;
            let c = Instant::now();
            vm.memory()
                .read_slice(&mut buf[..len], GuestAddress(0x40_0000))
                .unwrap();
            copies.push(c.elapsed());
            std::hint::black_box(&buf);
        }
        let (p, c) = (median(pauses.clone()), median(copies));
        println!(
            "| {n} | {pages} | {} | {} | {} | {:.1}× |",
            us(p),
            us(*pauses.iter().max().unwrap()),
            us(c),
            p.as_secs_f64() / c.as_secs_f64().max(1e-9)
        );
    }
    vm.stop();
    vm.wait();
}

fn restore_time(net: &TestNet, mem_mib: u64) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 8);
    let sock = dir.path().join("ctl.sock");
    let mut vm = VmProc::spawn_with(
        net,
        &disk,
        &dir.path().join("c.log"),
        mem_mib,
        &["--control", sock.to_str().unwrap()],
    );
    let mut kv = vm.wait_ready(Duration::from_secs(30));
    wait_socket(&sock, Duration::from_secs(5));
    assert_eq!(kv.cmd("SET a 1").unwrap(), "OK");
    let snap = dir.path().join("snap");
    ctl(&sock, &["pause"]);
    ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    vm.kill9();
    let mut times = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let args: Vec<std::ffi::OsString> = vec![
            "restore".into(),
            snap.clone().into(),
            "--tap".into(),
            "tap0".into(),
            "--disk".into(),
            dir.path().join(format!("live{i}.img")).into(),
        ];
        let mut r = VmProc::spawn_args(net, &dir.path().join("r.log"), &args);
        loop {
            if std::net::TcpStream::connect_timeout(&r.addr, Duration::from_millis(5)).is_ok() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "restored guest never answered"
            );
        }
        times.push(t.elapsed());
        r.kill9();
    }
    times.sort();
    (times[1], times[0])
}

fn main() {
    require_kvm();
    println!("## Snapshot benchmarks\n");
    println!("Pause = the guest is stopped: quiesce, capture vCPU and device state, harvest and reset both dirty sources, copy the dirty pages to a staging buffer, resume. Files are written after the resume.");
    for mem in [256, 2048] {
        pause_table(mem);
    }
    let net = TestNet::new();
    println!("\n### Restore: `vmatrix restore` start → KV port answering (3 runs)\n");
    println!("| guest RAM | median | min |\n|---|---|---|");
    for mem in [256, 2048] {
        let (med, min) = restore_time(&net, mem);
        println!(
            "| {mem} MiB | {:.1} ms | {:.1} ms |",
            med.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3
        );
    }
}
