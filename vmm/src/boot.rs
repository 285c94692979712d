//! x86-64 boot state for the ring-3 test guest.
//!
//! No ring-0 guest code ever runs: the VMM writes identity page tables (2 MiB pages, user
//! accessible, covering 4 GiB including the MMIO hole, and the RAM beyond it at 4 GiB), a GDT with ring-3 segments and a
//! 64-bit TSS whose I/O permission bitmap opens every port (PVM ignores IOPL for ring-3
//! guests), then sets the vCPU registers so that the first instruction executed is the guest
//! ELF's entry point at CPL 3.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::*;
use crate::memory::GuestMem;
use crate::{Error, Result};

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NX: u64 = 1 << 11;

/// Ring-3 data selector (GDT index 3, RPL 3).
pub const USER_DS: u16 = 0x1b;
/// Ring-3 64-bit code selector (GDT index 4, RPL 3).
pub const USER_CS: u16 = 0x23;
/// TSS selector (GDT index 5, two slots).
pub const TSS_SEL: u16 = 0x28;
const GDT_ENTRIES: usize = 7;

/// RFLAGS at entry: reserved bit 1 and IOPL 3.
pub const ENTRY_RFLAGS: u64 = 0x2 | (3 << 12);

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |e| Error::MemoryMap(format!("writing {what}: {e}"))
}

/// Writes page tables, GDT and TSS into guest memory.
pub fn write_tables(mem: &GuestMem) -> Result<()> {
    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages: the first 4 GiB
    // (RAM below the hole and the hole), then one per GiB of RAM at 4 GiB and beyond.
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    mem.write_obj(PDPT_ADDR | PTE_P | PTE_RW | PTE_US, GuestAddress(PML4_ADDR))
        .map_err(write_err("PML4"))?;
    for pd in 0..page_dirs(mem_size) {
        let pd_addr = page_dir_addr(pd);
        mem.write_obj(
            pd_addr | PTE_P | PTE_RW | PTE_US,
            GuestAddress(PDPT_ADDR + pd * 8),
        )
        .map_err(write_err("PDPT"))?;
        let mut table = [0u8; PAGE_SIZE as usize];
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            let e = phys | PTE_P | PTE_RW | PTE_US | PTE_PS;
            table[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd_addr))
            .map_err(write_err("page directory"))?;
    }

    // GDT: null, kernel code, kernel data, user data, user code, TSS (two slots).
    let tss_low = gdt_entry(0x0089, TSS_ADDR as u32, TSS_LIMIT);
    let gdt: [u64; GDT_ENTRIES] = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0xc0f3, 0, 0xfffff),
        gdt_entry(0xa0fb, 0, 0xfffff),
        tss_low,
        TSS_ADDR >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(write_err("GDT"))?;
    }

    // TSS: zero header with iomap base, 8 KiB zero bitmap (all ports allowed), trailing 0xff.
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&(TSS_IOMAP_OFFSET as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))
        .map_err(write_err("TSS"))?;
    Ok(())
}

/// Writes the generation id into the guest's generation word ([`GENID_ADDR`]): at boot, and
/// in a clone before its first instruction. A guest reads it from memory at no cost (no VM
/// exit), as a VMGenID guest reads its id from the buffer the hypervisor fills.
pub fn write_generation(mem: &GuestMem, generation: u64) -> Result<()> {
    mem.write_obj(generation, GuestAddress(GENID_ADDR))
        .map_err(write_err("generation id"))
}

fn seg(selector: u16, type_: u8, dpl: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets segment, control and general registers so the vCPU starts at `entry` in ring 3.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("get_sregs"))?;
    sregs.cs = seg(USER_CS, 0xb, 3, true);
    let data = seg(USER_DS, 0x3, 3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 2,
        present: 1,
        limit: 0xffff,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NX;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("set_sregs"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("set_fpu"))?;

    let regs = kvm_regs {
        rip: entry,
        rflags: ENTRY_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("set_regs"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_like_the_sdm() {
        // 64-bit ring-3 code: present, DPL 3, code, L=1, G=1.
        assert_eq!(gdt_entry(0xa0fb, 0, 0xfffff), 0x00af_fb00_0000_ffff);
        assert_eq!(gdt_entry(0xc0f3, 0, 0xfffff), 0x00cf_f300_0000_ffff);
    }
}
