//! Device memory a model takes on swk's CUDA backend, worked out from its config alone (no
//! weights read, no device needed): every weight resident, or the layers streamed through one
//! slot ([`crate::backend::stream`]), and the bytes a streamed pass copies to the device.
//! `swk info` prints it; the CUDA backend (feature `cuda`) sizes its uploads and decides
//! `--stream auto` with the same sums.

use serde::Serialize;

use super::stream::{layer_plan, LayerPart, SlotLayout};
use super::WeightDtype;
use crate::model::{Architecture, LazyModel, ModelConfig};
use crate::{Error, Result};

/// Every tensor the CUDA forward pass reads for a model of `c`'s shapes: (name, HF shape,
/// whether it is a matrix stored in the weight dtype; norms, biases and routers stay f32).
/// No `lm_head` when the embedding is tied.
pub fn plan_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    let mut v = outside_plan(c);
    for l in 0..c.num_layers {
        for (suffix, shape, matrix) in layer_plan(c, l) {
            v.push((format!("model.layers.{l}.{suffix}"), shape, matrix));
        }
    }
    v
}

/// The tensors of [`plan_shapes`] outside the layers.
fn outside_plan(c: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    let h = c.hidden_size;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h], true)];
    if c.architecture != Architecture::Olmo {
        // OLMo's final LayerNorm has no parameters.
        v.push(("model.norm.weight".to_string(), vec![h], false));
    }
    if matches!(c.architecture, Architecture::Gpt2 | Architecture::GptNeoX) {
        v.push(("model.norm.bias".to_string(), vec![h], false));
    }
    if c.architecture == Architecture::Gpt2 {
        let positions = vec![c.max_position_embeddings, h];
        v.push(("model.embed_positions.weight".to_string(), positions, false));
    }
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![c.vocab_size, h], true));
    }
    v
}

/// Check that `lazy` holds every tensor [`plan_shapes`] expects of its config, in that shape,
/// so that sizes worked out from the config are the model's own: an error names the first
/// tensor missing or misshapen (a config that does not describe its weights).
pub fn check_shapes(lazy: &LazyModel) -> Result<()> {
    // Each layer and each routed expert has tensors of its own: a config declaring more than
    // the files hold tensors is refused before its plan is built.
    let c = &lazy.config;
    let tensors = lazy.names().count();
    let experts = c.family.moe.as_ref().map_or(0, |m| m.num_experts);
    if c.num_layers > tensors || experts > tensors {
        return Err(Error::format(
            &lazy.source.path,
            format!(
                "the config declares {} layers and {experts} experts a layer, but the files \
                 hold only {tensors} tensors",
                c.num_layers
            ),
        ));
    }
    for (name, shape, _) in plan_shapes(c) {
        let found = lazy.shape(&name).map_err(|_| {
            Error::format(
                &lazy.source.path,
                format!("tensor `{name}` (shape {shape:?} by the config) is missing"),
            )
        })?;
        if found != shape.as_slice() {
            return Err(Error::format(
                &lazy.source.path,
                format!("tensor `{name}` has shape {found:?}; the config implies {shape:?}"),
            ));
        }
    }
    Ok(())
}

/// Device bytes of `plan`'s tensors, matrices in `dtype` (saturating: a config of absurd
/// sizes gives `usize::MAX`, which fits no device).
fn plan_bytes(plan: &[(String, Vec<usize>, bool)], dtype: WeightDtype) -> usize {
    plan.iter().fold(0usize, |sum, (_, s, m)| {
        let width = if *m { dtype.bytes() } else { 4 };
        sum.saturating_add(s.iter().fold(width, |b, &d| b.saturating_mul(d)))
    })
}

/// Device bytes every weight of `c` takes in `dtype` (a resident upload). Works layer by
/// layer, so a config's sizes are never all held at once.
pub fn weight_bytes(c: &ModelConfig, dtype: WeightDtype) -> usize {
    (0..c.num_layers).fold(resident_bytes(c, dtype), |sum, l| {
        sum.saturating_add(plan_bytes(&layer_plan(c, l), dtype))
    })
}

/// Device bytes of the tensors outside the layers (embedding, final norm, LM head): what
/// stays resident when the layers are streamed.
pub fn resident_bytes(c: &ModelConfig, dtype: WeightDtype) -> usize {
    plan_bytes(&outside_plan(c), dtype)
}

/// Floats a layer's KV cache on the CUDA backend holds per position: `(keys, values)`.
/// Ordinary attention keeps `num_kv_heads · head_dim` of each. Latent attention (DeepSeek)
/// keeps only `[c | k_rope]` (`kv_lora_rank + qk_rope_head_dim`) as a single shared key and
/// no values: the device runs it absorbed (see `backend::cuda::mla`).
pub fn kv_cache_widths(c: &ModelConfig) -> (usize, usize) {
    match &c.family.deepseek {
        Some(d) => (d.kv_lora_rank.saturating_add(d.qk_rope_head_dim), 0),
        None => {
            let w = c.num_kv_heads.saturating_mul(c.head_dim);
            (w, w)
        }
    }
}

/// Device bytes of the KV cache of a model of `c`'s shapes holding `positions` positions:
/// f32 rows of [`kv_cache_widths`] in every layer (saturating).
pub fn kv_cache_bytes(c: &ModelConfig, positions: usize) -> usize {
    let (k, v) = kv_cache_widths(c);
    [c.num_layers, k.saturating_add(v), 4, positions]
        .iter()
        .fold(1usize, |b, &d| b.saturating_mul(d))
}

/// A model's device memory on the CUDA backend in one weight dtype, in bytes. See the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// The weight dtype (`bf16`, `f16`, `f32`); vectors are f32 in every case.
    pub dtype: &'static str,
    /// Every weight resident (`--stream never`).
    pub resident: usize,
    /// Streamed (`--stream always`): the tensors outside the layers plus one slot.
    pub streamed: usize,
    /// The slot: the largest layer, each tensor aligned.
    pub slot: usize,
    /// Bytes a streamed pass copies to the device when it reads whole layers: every layer.
    pub whole_pass: usize,
    /// The KV cache (f32 rows of [`kv_cache_widths`] in every layer) per position.
    pub kv_cache_per_token: usize,
    #[serde(skip)]
    layers: Vec<LayerBytes>,
    #[serde(skip)]
    top_k: usize,
}

/// One layer's slot bytes: whole, without its routed experts, and one routed expert.
#[derive(Debug, Clone, PartialEq)]
struct LayerBytes {
    whole: usize,
    base: usize,
    expert: usize,
    experts: usize,
}

impl MemoryPlan {
    /// The plan of a model of `c`'s shapes with `dtype` weights.
    pub fn new(c: &ModelConfig, dtype: WeightDtype) -> Self {
        let layers: Vec<LayerBytes> = (0..c.num_layers)
            .map(|l| {
                let s = SlotLayout::new(c, l, dtype);
                let len = |p| s.part_range(p).map_or(0, |r| r.len());
                LayerBytes {
                    whole: s.bytes,
                    base: len(LayerPart::Base),
                    expert: len(LayerPart::Expert(0)),
                    experts: s.experts(),
                }
            })
            .collect();
        let slot = layers.iter().map(|l| l.whole).max().unwrap_or(0);
        MemoryPlan {
            dtype: dtype.name(),
            resident: weight_bytes(c, dtype),
            streamed: resident_bytes(c, dtype) + slot,
            slot,
            whole_pass: layers.iter().map(|l| l.whole).sum(),
            kv_cache_per_token: kv_cache_bytes(c, 1),
            layers,
            top_k: c.family.moe.as_ref().map_or(0, |m| m.top_k),
        }
    }

    /// At most the bytes a streamed pass of `tokens` tokens copies to the device. A mixture of
    /// experts that routes fewer token-expert pairs (`tokens × top_k`) than a layer has
    /// experts reads each sparse layer without its routed experts, then each chosen expert
    /// once (at most that many; fewer when tokens agree): the CUDA backend's selective
    /// reading, on by default. Any other pass reads whole layers ([`Self::whole_pass`]).
    pub fn pass_bytes(&self, tokens: usize) -> usize {
        let rows = tokens.saturating_mul(self.top_k);
        let most = self.layers.iter().map(|l| l.experts).max().unwrap_or(0);
        if rows >= most {
            return self.whole_pass;
        }
        self.layers
            .iter()
            .map(|l| match l.experts {
                0 => l.whole,
                e => l.base + rows.min(e) * l.expert,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_saturate() {
        let mut c = crate::synth::SynthSpec::llama2_7b().config().unwrap();
        c.hidden_size = 1 << 40;
        c.intermediate_size = 1 << 40;
        assert_eq!(weight_bytes(&c, WeightDtype::Bf16), usize::MAX);
    }

    #[test]
    fn llama2_7b_in_bf16() {
        let c = crate::synth::SynthSpec::llama2_7b().config().unwrap();
        let params = c.parameter_count() as usize;
        let bf16 = MemoryPlan::new(&c, WeightDtype::Bf16);
        // 32 layers: 4 attention matrices of 4096², 3 MLP matrices of 4096 × 11008 and two
        // f32 norms; embedding and head 32000 × 4096; a final f32 norm.
        let layer = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 2 * 4 * 4096;
        let outside = 2 * 2 * 32000 * 4096 + 4 * 4096;
        assert_eq!(bf16.resident, 32 * layer + outside);
        assert_eq!(bf16.resident, 13_477_363_712, "the H200 runs' 13.48 GB");
        assert!(bf16.slot >= layer && bf16.slot < layer + 9 * 256, "{}", bf16.slot);
        assert_eq!(bf16.streamed, outside + bf16.slot);
        assert_eq!(bf16.whole_pass, 32 * bf16.slot);
        assert_eq!(bf16.kv_cache_per_token, 32 * 2 * 4096 * 4);
        // Dense: every pass reads whole layers.
        assert_eq!((bf16.pass_bytes(1), bf16.pass_bytes(9)), (bf16.whole_pass, bf16.whole_pass));
        assert_eq!(MemoryPlan::new(&c, WeightDtype::F32).resident, 4 * params);
    }

    #[test]
    fn a_mixture_of_experts_reads_only_routed_experts_on_short_passes() {
        // OLMoE-1B-7B's shapes.
        let j = serde_json::json!({
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
            "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
            "norm_topk_prob": false, "vocab_size": 50304, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
        });
        let c = ModelConfig::from_hf_value(std::path::Path::new("olmoe.json"), &j).unwrap();
        let moe = c.family.moe.clone().unwrap();
        assert_eq!((moe.num_experts, moe.top_k), (64, 8));
        let p = MemoryPlan::new(&c, WeightDtype::Bf16);
        let expert = 2 * 3 * c.hidden_size * moe.expert_intermediate;
        let per_layer = |tokens: usize| p.layers[0].base + (tokens * 8).min(64) * expert;
        assert!(p.layers.iter().all(|l| l.expert == expert && l.experts == 64));
        assert_eq!(p.pass_bytes(1), c.num_layers * per_layer(1));
        assert_eq!(p.pass_bytes(7), c.num_layers * per_layer(7));
        // 8 tokens route 64 pairs: as many as there are experts, so whole layers.
        assert_eq!(p.pass_bytes(8), p.whole_pass);
        assert!(p.pass_bytes(1) < p.whole_pass / 4);
        assert_eq!(p.whole_pass, c.num_layers * (p.layers[0].base + 64 * expert));
    }

    /// DeepSeek-V3/R1 (671B) at its published shapes: the sizes the README gives.
    #[test]
    fn deepseek_v3_in_bf16() {
        let j = serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
            "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "vocab_size": 129280, "n_group": 8, "topk_group": 4, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false
        });
        let c = ModelConfig::from_hf_value(std::path::Path::new("deepseek_v3.json"), &j).unwrap();
        let p = MemoryPlan::new(&c, WeightDtype::Bf16);
        let gb = |b: usize| b as f64 / 1e9;
        eprintln!(
            "resident {:.1} GB, streamed {:.1} GB, slot {:.1} GB, whole pass {:.0} GB, \
             9 tokens {:.0} GB, 1 token {:.0} GB, kv {} B/token",
            gb(p.resident),
            gb(p.streamed),
            gb(p.slot),
            gb(p.whole_pass),
            gb(p.pass_bytes(9)),
            gb(p.pass_bytes(1)),
            p.kv_cache_per_token
        );
        let expert = 2 * 3 * 7168 * 2048;
        assert!(p.layers[3].expert == expert && p.layers[3].experts == 256);
        assert_eq!(p.layers[..3].iter().map(|l| l.experts).sum::<usize>(), 0, "3 dense layers");
        assert_eq!(p.streamed - p.slot, 2 * 2 * 129280 * 7168 + 4 * 7168, "embedding and head");
        assert_eq!((gb(p.streamed - p.slot) * 10.0).round(), 37.0, "3.7 GB resident");
        assert_eq!(gb(p.slot).round(), 23.0, "a 23 GB slot");
        assert_eq!((gb(p.whole_pass) / 100.0).round(), 13.0, "1.3 TB a whole-layer pass");
        assert_eq!((gb(p.pass_bytes(9)) / 100.0).round(), 4.0, "0.4 TB a 9-token pass");
        assert_eq!(p.kv_cache_per_token, 61 * (512 + 64) * 4, "the latent cache: 141 kB");
    }
}
