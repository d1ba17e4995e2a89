//! Compute backends. The CPU backend runs everywhere; the CUDA backend (feature `cuda`)
//! runs the same forward pass with swk's own kernels.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod stream;

use crate::model::Architecture;

/// The families the CUDA backend runs, for messages.
pub const CUDA_FAMILIES: &str = "every family swk knows";

/// Whether the CUDA backend runs this family's forward pass: every dense family (Llama,
/// Mistral, Qwen2, Qwen3, Phi-3, OLMo, OLMo 2, Gemma 1/2/3, GPT-2, GPT-NeoX), the mixtures
/// of experts Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE, and DeepSeek V2/V3 (latent attention;
/// all experts routed on the host). Every family today; kept so a new CPU-only family has
/// one place to say so.
pub fn cuda_runs(arch: Architecture) -> bool {
    let _ = arch;
    true
}
