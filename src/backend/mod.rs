//! Compute backends. The CPU backend runs everywhere; the CUDA backend (feature `cuda`)
//! runs the same forward pass with swk's own kernels.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod stream;

use crate::model::Architecture;

/// The families the CUDA backend runs, for messages.
pub const CUDA_FAMILIES: &str = "the dense (non-MoE)";

/// Whether the CUDA backend runs this family's forward pass: every dense family (Llama,
/// Mistral, Qwen2, Qwen3, Phi-3, OLMo, OLMo 2, Gemma 1/2/3, GPT-2, GPT-NeoX); mixtures of
/// experts (and DeepSeek) run on the CPU backend.
pub fn cuda_runs(arch: Architecture) -> bool {
    !arch.is_moe()
}
