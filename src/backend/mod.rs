//! Compute backends. The CPU backend runs everywhere; the CUDA backend (feature `cuda`)
//! runs the same forward pass with swk's own kernels.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod stream;

use crate::model::Architecture;

/// The families the CUDA backend runs, for messages.
pub const CUDA_FAMILIES: &str =
    "llama, mistral, qwen2, qwen3, phi3, olmo, olmo2, gemma, gemma2 and gemma3";

/// Whether the CUDA backend runs this family's forward pass (the Llama family: Llama,
/// Mistral, Qwen2, Qwen3, Phi-3 with its fused projections, OLMo and OLMo 2 with their
/// norms, Gemma 1/2/3 with theirs); MoE, DeepSeek, GPT-2 and GPT-NeoX run on the CPU
/// backend.
pub fn cuda_runs(arch: Architecture) -> bool {
    matches!(
        arch,
        Architecture::Llama
            | Architecture::Mistral
            | Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Phi3
            | Architecture::Olmo
            | Architecture::Olmo2
            | Architecture::Gemma
            | Architecture::Gemma2
            | Architecture::Gemma3
    )
}
