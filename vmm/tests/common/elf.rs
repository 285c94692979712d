//! Builds minimal guest ELFs from raw machine code, for tests that need a guest doing exactly
//! one thing (loop, fault, wait, exit). Shared by the vmm and vmatrix test suites.
#![allow(dead_code)]

/// Where the code is loaded and entered.
pub const ENTRY: u64 = 0x20_0000;

/// A static x86-64 ELF with one PT_LOAD segment holding `code` at [`ENTRY`].
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[24..32].copy_from_slice(&ENTRY.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&ENTRY.to_le_bytes());
    ph[24..32].copy_from_slice(&ENTRY.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}
