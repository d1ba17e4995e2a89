//! What the device's forward pass does differently per family, decided once from the config.
//! The CPU backend keeps one module per family (`model::arch`); the device runs one block
//! whose switches are these, each mirroring the CPU module named beside it.

use super::kernels::Activation;
use crate::model::{Architecture, ModelConfig};

/// The norm in front of attention, the MLP or the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Norm {
    /// None: the sublayer reads x itself (OLMo 2's block inputs).
    Identity,
    /// RMSNorm by `w`, or by `1 + w` with `plus_one` (Gemma).
    Rms {
        /// Multiply by `1 + w` (Gemma's zero-centred norm weights).
        plus_one: bool,
    },
    /// LayerNorm, with weight and bias when `affine` (GPT-2, GPT-NeoX), none otherwise (OLMo).
    Layer {
        /// Whether the norm has weight and bias tensors.
        affine: bool,
    },
}

/// Where q and k are normalized before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QkNorm {
    /// No QK-norm.
    None,
    /// RMSNorm over each head (Qwen3, Gemma 3).
    PerHead,
    /// RMSNorm over each row's whole q and whole k (OLMo 2).
    Whole,
}

/// One family's switches of the device block.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Block {
    /// Before attention (`input_layernorm`) and the MLP (`mlp_norm`).
    pub(crate) norm: Norm,
    /// The MLP's pre-norm tensor (Gemma 2/3 have their own; the others reuse
    /// `post_attention_layernorm`).
    pub(crate) mlp_norm: &'static str,
    /// Before the LM head (`model.norm`).
    pub(crate) final_norm: Norm,
    /// RMSNorm of what attention and the MLP write, before each residual add (OLMo 2, Gemma
    /// 2/3): `post_attention_layernorm`, `post_feedforward_layernorm`.
    pub(crate) post_norms: bool,
    /// q, k, v are row blocks of `self_attn.qkv_proj` (Phi-3, GPT-2, GPT-NeoX).
    pub(crate) fused_qkv: bool,
    /// gate and up are row blocks of `mlp.gate_up_proj` (Phi-3).
    pub(crate) fused_gate_up: bool,
    /// q, k, v have biases.
    pub(crate) qkv_bias: bool,
    /// o_proj has a bias.
    pub(crate) o_bias: bool,
    /// q, k, v clamped to ±this (OLMo's and OLMoE's `clip_qkv`).
    pub(crate) clip_qkv: Option<f32>,
    /// The clamp comes after the QK-norm (OLMoE), not before it (OLMo 2).
    pub(crate) clip_after_qk_norm: bool,
    /// The QK-norm.
    pub(crate) qk_norm: QkNorm,
    /// RoPE on q and k (all but GPT-2).
    pub(crate) rope: bool,
    /// Attention scores soft-capped (Gemma 2).
    pub(crate) attn_softcap: Option<f32>,
    /// `act(gate) ⊙ up` (else `act(up)`: GPT-2, GPT-NeoX).
    pub(crate) gated: bool,
    /// The MLP activation (Gemma: tanh GELU whatever its config says, as on the CPU).
    pub(crate) act: Activation,
    /// Attention and MLP both read the block input (GPT-NeoX `use_parallel_residual`).
    pub(crate) parallel: bool,
    /// Multiplier of the embedding (√hidden for Gemma, else 1).
    pub(crate) embed_scale: f32,
    /// Learned position embeddings added to the token embedding (GPT-2).
    pub(crate) positions: bool,
    /// Final logits soft-capped (Gemma 2).
    pub(crate) final_softcap: Option<f32>,
    /// DeepSeek's multi-head latent attention (mla.rs) instead of q/k/v projections.
    pub(crate) mla: bool,
}

impl Block {
    /// The switches of `c`'s family.
    pub(crate) fn of(c: &ModelConfig) -> Block {
        use Architecture as A;
        let arch = c.architecture;
        let gpt = matches!(arch, A::Gpt2 | A::GptNeoX);
        let gemma = arch.is_gemma();
        let norm = match arch {
            A::Olmo2 => Norm::Identity,
            A::Olmo => Norm::Layer { affine: false },
            _ if gpt => Norm::Layer { affine: true },
            _ => Norm::Rms { plus_one: gemma },
        };
        let final_norm = match norm {
            Norm::Identity => Norm::Rms { plus_one: false },
            n => n,
        };
        Block {
            norm,
            mlp_norm: match arch {
                A::Gemma2 | A::Gemma3 => "pre_feedforward_layernorm",
                _ => "post_attention_layernorm",
            },
            final_norm,
            post_norms: matches!(arch, A::Olmo2 | A::Gemma2 | A::Gemma3),
            fused_qkv: arch == A::Phi3 || gpt,
            fused_gate_up: arch == A::Phi3,
            qkv_bias: crate::backend::stream::has_qkv_bias(c),
            o_bias: crate::backend::stream::has_o_proj_bias(c),
            clip_qkv: match arch {
                A::Olmo | A::Olmo2 | A::Olmoe => c.family.clip_qkv.map(|v| v as f32),
                _ => None,
            },
            clip_after_qk_norm: arch == A::Olmoe,
            qk_norm: match arch {
                A::Qwen3 | A::Gemma3 | A::Qwen3Moe => QkNorm::PerHead,
                A::Olmo2 | A::Olmoe => QkNorm::Whole,
                _ => QkNorm::None,
            },
            rope: arch != A::Gpt2,
            attn_softcap: c.family.attn_logit_softcapping.map(|s| s as f32),
            gated: arch.gated_mlp(),
            act: if gemma { Activation::GeluTanh } else { c.family.hidden_act.into() },
            parallel: arch == A::GptNeoX && c.family.parallel_residual,
            embed_scale: if gemma { (c.hidden_size as f32).sqrt() } else { 1.0 },
            positions: arch == A::Gpt2,
            final_softcap: c.family.final_logit_softcapping.map(|s| s as f32),
            mla: arch.is_deepseek(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(fixture: &str) -> ModelConfig {
        crate::Model::load(&super::super::tiny_fixture(fixture)).expect("fixture").config
    }

    fn block(fixture: &str) -> Block {
        Block::of(&config(fixture))
    }

    #[test]
    fn each_family_gets_its_switches() {
        let llama = block("llama");
        assert_eq!(llama.norm, Norm::Rms { plus_one: false });
        assert_eq!(llama.mlp_norm, "post_attention_layernorm");
        assert!(llama.rope && llama.gated && !llama.fused_qkv && !llama.post_norms);
        assert_eq!(
            (llama.act, llama.embed_scale, llama.qk_norm),
            (Activation::Silu, 1.0, QkNorm::None)
        );

        let phi3 = block("phi3");
        assert!(phi3.fused_qkv && phi3.fused_gate_up && !phi3.qkv_bias);

        let olmo = block("olmo");
        assert_eq!(
            (olmo.norm, olmo.final_norm),
            (Norm::Layer { affine: false }, Norm::Layer { affine: false })
        );
        assert_eq!(olmo.clip_qkv, Some(0.5));
        let olmo2 = block("olmo2");
        assert_eq!((olmo2.norm, olmo2.final_norm), (Norm::Identity, Norm::Rms { plus_one: false }));
        assert!(olmo2.post_norms);
        assert_eq!(olmo2.qk_norm, QkNorm::Whole);

        let gemma2 = block("gemma2");
        assert_eq!(gemma2.norm, Norm::Rms { plus_one: true });
        assert_eq!(gemma2.mlp_norm, "pre_feedforward_layernorm");
        assert_eq!(gemma2.act, Activation::GeluTanh);
        assert!(
            gemma2.post_norms && gemma2.attn_softcap.is_some() && gemma2.final_softcap.is_some()
        );
        assert_eq!(gemma2.embed_scale, (config("gemma2").hidden_size as f32).sqrt());
        assert_eq!(block("gemma3").qk_norm, QkNorm::PerHead);
        assert_eq!(block("qwen3").qk_norm, QkNorm::PerHead);

        let gpt2 = block("gpt2");
        assert!(!gpt2.rope && !gpt2.gated && gpt2.fused_qkv && gpt2.qkv_bias && gpt2.o_bias);
        assert!(gpt2.positions && !gpt2.parallel);
        assert_eq!(gpt2.norm, Norm::Layer { affine: true });
        let neox = block("gpt_neox");
        assert!(neox.rope && !neox.gated && !neox.positions);
        assert_eq!(neox.act, Activation::Gelu);
        assert_ne!(neox.parallel, block("gpt_neox_seq").parallel);

        // Mixtures of experts: the attention of their dense relatives.
        let olmoe = block("olmoe");
        assert_eq!((olmoe.qk_norm, olmoe.clip_qkv), (QkNorm::Whole, Some(0.5)));
        assert!(olmoe.clip_after_qk_norm && !olmo.clip_after_qk_norm);
        assert_eq!(block("qwen3_moe").qk_norm, QkNorm::PerHead);
        let qwen2_moe = block("qwen2_moe");
        assert!(qwen2_moe.qkv_bias && !qwen2_moe.o_bias);
        assert_eq!(block("mixtral"), Block { ..llama.clone() });
        assert_eq!(block("deepseek_v3"), Block { mla: true, ..llama });
    }
}
