//! Helpers shared by the vmm integration tests.
pub mod elf;
