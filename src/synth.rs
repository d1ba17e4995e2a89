//! Synthetic Llama models from a seed: random weights of any shape, and small models with
//! planted super weights whose coordinates are known, for testing detection end to end.
//!
//! # Determinism
//!
//! Every tensor draws from its own SplitMix64 streams, seeded from the model seed and the
//! tensor's name, one stream per fixed-size chunk. Generation runs in parallel (rayon over
//! tensors and chunks) and yields the same bits for any number of threads.
//!
//! [`planted`] (plant.rs) builds small Llamas with planted super weights whose coordinates
//! are known, [`families::plant_arch`] the same in the other dense families; [`save_llama`]
//! writes a Llama as a Hugging Face directory.

pub mod families;
pub mod plant;
pub mod save;

pub use save::save_llama;

pub use plant::{
    planted, planted_group, planted_moe, Plant, PlantSite, PlantTruth, PlantedWeight,
    SuperExpertSite,
};

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::model::arch;
use crate::model::weights::fnv1a;
use crate::model::{Architecture, Format, ModelConfig, ModelSource, Tensor, Weights};
use crate::{Error, Model, Result};

/// Standard deviation of random linear and embedding weights (Llama's `initializer_range`).
pub const LINEAR_STD: f32 = 0.02;
/// Standard deviation of the noise around 1 in RMSNorm weights.
pub const NORM_STD: f32 = 0.02;
/// Elements per independently seeded random stream.
const CHUNK: usize = 1 << 15;

/// SplitMix64: a tiny, fast, splittable 64-bit generator (Steele, Lea and Flood 2014), with
/// Box–Muller normals.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
    spare: Option<f64>,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed, spare: None }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (`n` must be positive; returns 0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Two independent standard normals (Box–Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }

    /// One standard normal (the second of each Box–Muller pair is kept for the next call).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (a, b) = self.normal_pair();
        self.spare = Some(b);
        a
    }

    /// Shuffle `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Mix two 64-bit values into a well-spread seed.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(a ^ b.rotate_left(29) ^ 0x5851_f42d_4c95_7f2d);
    r.next_u64() ^ SplitMix64::new(b).next_u64()
}

/// The seed of a tensor's random streams: a function of the model seed and the tensor name
/// only, so a tensor's values do not depend on which other tensors exist or on threads.
pub fn tensor_seed(seed: u64, name: &str) -> u64 {
    mix(seed, fnv1a(0xcbf2_9ce4_8422_2325, name.as_bytes()))
}

/// Fill `data` with `mean + std · N(0, 1)`, deterministically from `seed`, in parallel.
pub fn fill_normal(data: &mut [f32], seed: u64, mean: f32, std: f32) {
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = SplitMix64::new(mix(seed, i as u64));
        for pair in chunk.chunks_mut(2) {
            let (a, b) = rng.normal_pair();
            pair[0] = mean + std * a as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = mean + std * b as f32;
            }
        }
    });
}

/// Shapes of a synthetic Llama.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SynthSpec {
    /// Residual stream width.
    pub hidden: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Query heads (`head_dim = hidden / heads`).
    pub heads: usize,
    /// Key/value heads (fewer than `heads` for GQA).
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Whether the LM head shares the embedding (no `lm_head.weight`).
    pub tie_embeddings: bool,
}

impl SynthSpec {
    /// A tiny model for tests: 64 wide, 4 layers, 4 heads, 256 tokens.
    pub fn tiny() -> Self {
        SynthSpec {
            hidden: 64,
            intermediate: 192,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            vocab: 256,
            tie_embeddings: false,
        }
    }

    /// Llama-2-7B's shapes (6.7 B parameters, 27 GB of f32).
    pub fn llama2_7b() -> Self {
        SynthSpec {
            hidden: 4096,
            intermediate: 11008,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            vocab: 32000,
            tie_embeddings: false,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    /// Check that the shapes make a valid Llama.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("synthetic model: {msg}")));
        let named = [
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("vocab", self.vocab),
        ];
        if let Some((name, _)) = named.iter().find(|(_, v)| *v == 0) {
            return bad(format!("`{name}` must be positive"));
        }
        if self.hidden % self.heads != 0 {
            return bad(format!(
                "hidden {} is not a multiple of heads {}",
                self.hidden, self.heads
            ));
        }
        if self.heads % self.kv_heads != 0 {
            return bad(format!(
                "heads {} are not a multiple of kv_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim()));
        }
        if u32::try_from(self.vocab).is_err() {
            return bad(format!("vocab {} does not fit token ids (u32)", self.vocab));
        }
        Ok(())
    }

    /// The model configuration these shapes describe (Llama, RoPE θ = 500 000, ε = 1e-5).
    pub fn config(&self) -> Result<ModelConfig> {
        self.validate()?;
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim(),
            vocab_size: self.vocab,
            max_position_embeddings: 4096,
            rope_theta: 500_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: self.tie_embeddings,
            attention_bias: false,
            sliding_window: None,
            family: Default::default(),
        })
    }
}

/// How a tensor is initialized.
#[derive(Clone, Copy)]
enum Init {
    /// `N(0, LINEAR_STD)`.
    Linear,
    /// `1 + N(0, NORM_STD)`.
    Norm,
}

/// Every tensor of a Llama with `c`'s shapes, in HF naming.
fn tensor_plan(c: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut plan = vec![
        ("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h], Init::Linear),
        ("model.norm.weight".to_string(), vec![h], Init::Norm),
    ];
    if !c.tie_word_embeddings {
        plan.push(("lm_head.weight".to_string(), vec![c.vocab_size, h], Init::Linear));
    }
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        plan.extend([
            (format!("{p}.input_layernorm.weight"), vec![h], Init::Norm),
            (format!("{p}.post_attention_layernorm.weight"), vec![h], Init::Norm),
            (format!("{p}.self_attn.q_proj.weight"), vec![qd, h], Init::Linear),
            (format!("{p}.self_attn.k_proj.weight"), vec![kvd, h], Init::Linear),
            (format!("{p}.self_attn.v_proj.weight"), vec![kvd, h], Init::Linear),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, qd], Init::Linear),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h], Init::Linear),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h], Init::Linear),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i], Init::Linear),
        ]);
    }
    plan
}

fn synthetic_source(seed: u64, start: Instant) -> ModelSource {
    ModelSource {
        spec: "synthetic".to_string(),
        path: PathBuf::from("synthetic"),
        format: Format::Safetensors,
        load_seconds: start.elapsed().as_secs_f64(),
        name: Some(format!("synthetic-llama-seed-{seed}")),
    }
}

/// A Llama with random weights: linear weights and embeddings `N(0, 0.02)`, RMSNorm weights
/// `1 + N(0, 0.02)`, no tokenizer. Identical bits for the same `spec` and `seed`, whatever the
/// number of threads. Errors when the shapes are not a valid Llama.
pub fn random_llama(spec: &SynthSpec, seed: u64) -> Result<Model> {
    let start = Instant::now();
    let config = spec.config()?;
    let tensors: Vec<(String, Tensor)> = tensor_plan(&config)
        .into_par_iter()
        .map(|(name, shape, init)| {
            let n: usize = shape.iter().product();
            let mut data = vec![0f32; n];
            let (mean, std) = match init {
                Init::Linear => (0.0, LINEAR_STD),
                Init::Norm => (1.0, NORM_STD),
            };
            fill_normal(&mut data, tensor_seed(seed, &name), mean, std);
            let t = Tensor::new(&name, shape, data, "F32")?;
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    let mut weights = Weights::new();
    for (name, t) in tensors {
        weights.insert(name, t);
    }
    let mut model =
        Model { config, weights, tokenizer: None, source: synthetic_source(seed, start) };
    arch::validate(&model)?;
    model.source.load_seconds = start.elapsed().as_secs_f64();
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_normal_ish() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut r = SplitMix64::new(42);
        let xs: Vec<f64> = (0..20_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        assert!((0..1000).all(|_| r.below(10) < 10));
    }

    #[test]
    fn random_llama_is_reproducible_and_valid() {
        let spec = SynthSpec { layers: 2, ..SynthSpec::tiny() };
        let a = random_llama(&spec, 1).unwrap();
        let b = random_llama(&spec, 1).unwrap();
        let c = random_llama(&spec, 2).unwrap();
        assert_eq!(a.weights.checksum(), b.weights.checksum());
        assert_ne!(a.weights.checksum(), c.weights.checksum());
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let d = one.install(|| random_llama(&spec, 1).unwrap());
        assert_eq!(a.weights.checksum(), d.weights.checksum());
        let bad = SynthSpec { hidden: 30, heads: 4, ..SynthSpec::tiny() };
        assert!(random_llama(&bad, 0).is_err());
    }
}
