//! A tiny VM for the integration tests: a few bytes of ring-3 code, 16 MiB (or as asked), no
//! devices but the platform and a console whose output is dropped.

use vmm::devices::serial::ConsoleOut;
use vmm::{Vm, VmConfig};

/// A console whose output is dropped.
pub fn console() -> ConsoleOut {
    ConsoleOut::new(Box::new(std::io::sink()))
}

/// A VM (not started) running `code` as its guest; the directory holds its ELF.
pub fn vm_with(code: &[u8]) -> (Vm, tempfile::TempDir) {
    vm_sized(code, 16)
}

/// [`vm_with`] with `mem_mib` MiB of RAM.
pub fn vm_sized(code: &[u8], mem_mib: u64) -> (Vm, tempfile::TempDir) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test needs real KVM"
    );
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("tiny.elf");
    std::fs::write(&elf, super::elf::tiny_elf(code)).unwrap();
    let vm = Vm::new(VmConfig {
        guest_elf: elf,
        mem_mib,
        disk: None,
        tap: None,
        mac: [2, 0, 0, 0, 0, 1],
        guest_config: String::new(),
        console: console(),
        dirty_log: true,
        generation: 1,
    })
    .expect("build VM");
    (vm, dir)
}
