//! Loader for the guest ELF: a static, non-PIE x86-64 executable whose `PT_LOAD` segments are
//! placed at their (identity-mapped) virtual addresses.
//!
//! The file is untrusted input: every offset and length is checked before use, and every
//! failure is a typed [`ElfError`].

use vm_memory::{Bytes, GuestAddress};

use crate::layout::GUEST_MIN_ADDR;
use crate::memory::GuestMem;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
/// Hard cap on program headers, so a hostile header cannot make us loop for long.
const MAX_PHDRS: u16 = 64;

/// Why a guest image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// The file is shorter than an ELF header.
    #[error("file is {0} bytes, too short for an ELF header")]
    TooShort(usize),
    /// Not an ELF file.
    #[error("bad magic: not an ELF file")]
    BadMagic,
    /// Not 64-bit little-endian x86-64.
    #[error("not a 64-bit little-endian x86-64 ELF ({0})")]
    WrongArch(&'static str),
    /// Not a static executable.
    #[error("ELF type {0} is not ET_EXEC: the guest must be a static, non-PIE executable")]
    NotExec(u16),
    /// Program header table out of bounds or malformed.
    #[error("program header table is malformed: {0}")]
    BadPhdrs(String),
    /// A segment is outside the file or outside guest RAM.
    #[error("segment {index} is invalid: {why}")]
    BadSegment {
        /// Index of the program header.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
    /// No loadable segment.
    #[error("no PT_LOAD segment")]
    NoSegments,
    /// Entry point not inside an executable segment.
    #[error("entry point {0:#x} is not inside an executable segment")]
    BadEntry(u64),
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// One segment to copy into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical (= virtual) address.
    pub addr: u64,
    /// Range of the file to copy there.
    pub file_range: std::ops::Range<usize>,
    /// Size in memory (the rest after the file bytes is zero).
    pub mem_size: u64,
    /// Executable.
    pub exec: bool,
}

/// A parsed, validated guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Entry point.
    pub entry: u64,
    /// Segments to load.
    pub segments: Vec<Segment>,
    /// First byte after the highest segment.
    pub end: u64,
}

/// Parses and validates `file` for a guest with `mem_size` bytes of RAM.
pub fn parse(file: &[u8], mem_size: u64) -> Result<Image, ElfError> {
    if file.len() < EHDR_SIZE {
        return Err(ElfError::TooShort(file.len()));
    }
    if file[0..4] != [0x7f, b'E', b'L', b'F'] {
        return Err(ElfError::BadMagic);
    }
    if file[4] != 2 {
        return Err(ElfError::WrongArch("not ELFCLASS64"));
    }
    if file[5] != 1 {
        return Err(ElfError::WrongArch("not little-endian"));
    }
    if u16_at(file, 18) != EM_X86_64 {
        return Err(ElfError::WrongArch("e_machine is not x86-64"));
    }
    let etype = u16_at(file, 16);
    if etype != ET_EXEC {
        return Err(ElfError::NotExec(etype));
    }
    let entry = u64_at(file, 24);
    let phoff = u64_at(file, 32);
    let phentsize = u16_at(file, 54);
    let phnum = u16_at(file, 56);
    if phentsize as usize != PHDR_SIZE {
        return Err(ElfError::BadPhdrs(format!(
            "e_phentsize {phentsize} != {PHDR_SIZE}"
        )));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::BadPhdrs(format!(
            "e_phnum {phnum} not in 1..={MAX_PHDRS}"
        )));
    }
    let table_end = phoff
        .checked_add(u64::from(phnum) * PHDR_SIZE as u64)
        .filter(|&e| e <= file.len() as u64)
        .ok_or_else(|| ElfError::BadPhdrs(format!("table at {phoff:#x} runs past end of file")))?;
    let phoff = phoff as usize;
    let _ = table_end;

    let mut segments = Vec::new();
    let mut end = 0u64;
    for index in 0..phnum as usize {
        let ph = &file[phoff + index * PHDR_SIZE..phoff + (index + 1) * PHDR_SIZE];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let bad = |why: String| ElfError::BadSegment { index, why };
        let flags = u32_at(ph, 4);
        let offset = u64_at(ph, 8);
        let vaddr = u64_at(ph, 16);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if filesz > memsz {
            return Err(bad(format!("p_filesz {filesz:#x} > p_memsz {memsz:#x}")));
        }
        let file_end = offset
            .checked_add(filesz)
            .filter(|&e| e <= file.len() as u64)
            .ok_or_else(|| bad("file bytes run past the end of the file".into()))?;
        if vaddr < GUEST_MIN_ADDR {
            return Err(bad(format!(
                "address {vaddr:#x} is below the guest minimum {GUEST_MIN_ADDR:#x}"
            )));
        }
        // (Below the MMIO hole: RAM beyond it is at 4 GiB, `crate::layout`.)
        let low_end = mem_size.min(crate::layout::MMIO_BASE);
        let seg_end = vaddr
            .checked_add(memsz)
            .filter(|&e| e <= low_end)
            .ok_or_else(|| {
                bad(format!(
                    "[{vaddr:#x}, +{memsz:#x}) does not fit in the {} MiB of guest RAM below \
                     the MMIO hole",
                    low_end >> 20
                ))
            })?;
        end = end.max(seg_end);
        segments.push(Segment {
            addr: vaddr,
            file_range: offset as usize..file_end as usize,
            mem_size: memsz,
            exec: flags & PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    if !segments
        .iter()
        .any(|s| s.exec && entry >= s.addr && entry < s.addr + s.mem_size)
    {
        return Err(ElfError::BadEntry(entry));
    }
    Ok(Image {
        entry,
        segments,
        end,
    })
}

/// Copies the segments of `image` (parsed from `file`) into guest memory.
pub fn load(mem: &GuestMem, file: &[u8], image: &Image) -> Result<(), vm_memory::GuestMemoryError> {
    for s in &image.segments {
        mem.write_slice(&file[s.file_range.clone()], GuestAddress(s.addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn minimal_elf(vaddr: u64, entry: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[0..4].copy_from_slice(&[0x7f, b'E', b'L', b'F']);
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x80u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&vaddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        f
    }

    #[test]
    fn accepts_minimal_image() {
        let f = minimal_elf(0x20_0000, 0x20_0000, 0x80, 0x1000);
        let img = parse(&f, 16 << 20).unwrap();
        assert_eq!(img.entry, 0x20_0000);
        assert_eq!(img.end, 0x20_1000);
    }

    #[test]
    fn refuses_bad_inputs_with_typed_errors() {
        assert_eq!(parse(&[0; 10], 16 << 20), Err(ElfError::TooShort(10)));
        assert_eq!(parse(&[0; 64], 16 << 20), Err(ElfError::BadMagic));
        let f = minimal_elf(0x1000, 0x1000, 0x80, 0x1000);
        assert!(matches!(
            parse(&f, 16 << 20),
            Err(ElfError::BadSegment { .. })
        ));
        let f = minimal_elf(0x20_0000, 0x20_0000, 0x800, 0x1000);
        assert!(matches!(
            parse(&f, 16 << 20),
            Err(ElfError::BadSegment { .. })
        ));
        let f = minimal_elf(0x20_0000, 0x20_0000, 0x80, 64 << 20);
        assert!(matches!(
            parse(&f, 16 << 20),
            Err(ElfError::BadSegment { .. })
        ));
        let f = minimal_elf(0x20_0000, 0x90_0000, 0x80, 0x1000);
        assert_eq!(parse(&f, 16 << 20), Err(ElfError::BadEntry(0x90_0000)));
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes, 64 << 20);
        }

        #[test]
        fn never_panics_on_mutated_headers(idx in 0usize..0x100, val in any::<u8>(), idx2 in 0usize..0x100, val2 in any::<u8>()) {
            let mut f = minimal_elf(0x20_0000, 0x20_0000, 0x80, 0x1000);
            f[idx] = val;
            f[idx2] = val2;
            let _ = parse(&f, 64 << 20);
        }
    }
}
