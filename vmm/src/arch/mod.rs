//! x86_64 specifics: memory layout, boot CPU state, CPUID and the MP table.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
