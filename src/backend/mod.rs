//! Compute backends. The CPU backend runs everywhere; the CUDA backend (feature `cuda`)
//! runs the same forward pass with swk's own kernels.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod stream;

use crate::model::Architecture;

/// Whether the CUDA backend runs this family's forward pass (the Llama family: Llama,
/// Mistral, Qwen2, Qwen3); the others run on the CPU backend.
pub fn cuda_runs(arch: Architecture) -> bool {
    matches!(
        arch,
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3
    )
}
