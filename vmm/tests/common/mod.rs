//! Helpers shared by the vmm integration tests.
#![allow(dead_code)] // (each test binary uses a part)
pub mod elf;
pub mod vm;
