//! Compute backends. The CPU backend runs everywhere; the CUDA backend (feature `cuda`)
//! runs the same forward pass with swk's own kernels.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod stream;

use crate::model::Architecture;

/// The families the CUDA backend runs, for messages.
pub const CUDA_FAMILIES: &str = "every family but DeepSeek V2/V3";

/// Whether the CUDA backend runs this family's forward pass: every dense family (Llama,
/// Mistral, Qwen2, Qwen3, Phi-3, OLMo, OLMo 2, Gemma 1/2/3, GPT-2, GPT-NeoX) and the
/// mixtures of experts Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE (routed on the host); DeepSeek
/// V2/V3 (latent attention, grouped routing) run on the CPU backend.
pub fn cuda_runs(arch: Architecture) -> bool {
    !arch.is_deepseek()
}
