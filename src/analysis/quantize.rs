//! Super-outlier-aware quantization (Yu et al. 2024, §4): round-to-nearest asymmetric min-max
//! quantization of every linear weight in blocks, with or without holding out the super
//! weights, and with optional outlier clipping by z-score.
//!
//! A tensor is flattened (row-major, HF layout) and cut into blocks of `block_size` values
//! (a block may span rows; a block size above the tensor's size quantizes it as one block).
//! Per block, with `L = 2^bits - 1` levels:
//!
//! 1. *Clipping* (optional): values whose `|w|` lies more than `z` standard deviations above
//!    the block's mean `|w|` are clipped to `±(mean + z·std)`.
//! 2. `scale = (max - min) / L`, `zero = round(-min / scale)`,
//!    `w ← (clamp(round(w / scale) + zero, 0, L) - zero) · scale`.
//! 3. *Hold-out*: the held-out weights (the super weights) take no part in the block's
//!    statistics and keep their full-precision value.
//!
//! The quantized weights are written through a [`Rewrite`] of the backend (the CPU model or
//! a device), which keeps one copy of each tensor's original bits in host memory and writes
//! it back when dropped, on error and on panic too (a per-element restore log would cost far
//! more memory than the weights themselves).

use std::collections::BTreeMap;
use std::ops::Deref;

use rayon::prelude::*;
use serde::Serialize;

use crate::analysis::log_sum_exp;
use crate::edit::{EditTarget, WeightEdit};
use crate::eval::logits::LogitsBackend;
use crate::eval::ppl;
use crate::{Error, Model, Result};

/// How to quantize.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QuantSpec {
    /// Bits per weight (1 to 16).
    pub bits: u32,
    /// Values per block.
    pub block_size: usize,
    /// Clip outliers above this z-score of |w| (per block) before quantizing.
    pub clip_z: Option<f32>,
}

/// What one quantization pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QuantStats {
    /// Tensors quantized.
    pub tensors: usize,
    /// Weights quantized.
    pub weights: usize,
    /// Weights held out (kept in full precision).
    pub held_out: usize,
    /// Weights clipped.
    pub clipped: usize,
    /// Mean squared quantization error over all quantized weights.
    pub mse: f64,
}

/// Whole tensors of a backend overwritten for a while: each tensor's original bits are read
/// once, before its first write, and written back by [`Rewrite::restore`] or on drop (also
/// when an error or a panic unwinds through it). Derefs to the backend, so it can run while
/// changed.
pub struct Rewrite<'a, B: EditTarget> {
    target: &'a mut B,
    saved: Vec<(String, Vec<u32>)>,
}

impl<'a, B: EditTarget> Rewrite<'a, B> {
    /// Open a scope on `target`.
    pub fn new(target: &'a mut B) -> Self {
        Rewrite { target, saved: Vec::new() }
    }

    /// The original bits of `tensor`, read and kept on first use.
    fn original(&mut self, tensor: &str) -> Result<&[u32]> {
        let k = match self.saved.iter().position(|(n, _)| n == tensor) {
            Some(k) => k,
            None => {
                let len = self.target.shape_of(tensor)?.iter().product();
                let bits = self.target.read_range(tensor, 0, len)?;
                self.saved.push((tensor.to_string(), bits));
                self.saved.len() - 1
            }
        };
        Ok(&self.saved[k].1)
    }

    /// The original values of `tensor` as f32 (a bf16 device's stored values, widened).
    pub fn values(&mut self, tensor: &str) -> Result<Vec<f32>> {
        Ok(self.original(tensor)?.iter().map(|&b| f32::from_bits(b)).collect())
    }

    /// Overwrite the whole of `tensor` with `values` (its original kept first).
    pub fn write(&mut self, tensor: &str, values: &[f32]) -> Result<()> {
        let len = self.original(tensor)?.len();
        if values.len() != len {
            return Err(Error::tensor(
                tensor,
                format!("{} values written over {len} elements", values.len()),
            ));
        }
        let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        self.target.write_range(tensor, 0, &bits)
    }

    /// Write every saved tensor back now (newest first); returns how many were restored.
    /// Every tensor is tried; the first failure is returned after.
    pub fn restore(&mut self) -> Result<usize> {
        let (mut n, mut first_err) = (0, None);
        while let Some((name, bits)) = self.saved.pop() {
            match self.target.write_range(&name, 0, &bits) {
                Ok(()) => n += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(n), Err)
    }
}

impl<B: EditTarget> Deref for Rewrite<'_, B> {
    type Target = B;
    fn deref(&self) -> &B {
        self.target
    }
}

impl<B: EditTarget> Drop for Rewrite<'_, B> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("swk: restoring quantized tensors failed: {e}");
        }
    }
}

/// The tensors quantized: every 2-D weight inside the blocks (attention and MLP
/// projections; not the embedding or the LM head), only those whose name contains `only`
/// when given (e.g. `down_proj`).
pub fn linear_tensors(model: &Model, only: Option<&str>) -> Vec<String> {
    model
        .weights
        .iter()
        .filter(|(name, t)| name.starts_with("model.layers.") && t.shape.len() == 2)
        .filter(|(name, _)| only.is_none_or(|o| name.contains(o)))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Quantize one block in place (see the module docs); `held` are local indices kept as they
/// are. Returns (values clipped, sum of squared errors).
pub fn quantize_block(
    w: &mut [f32],
    bits: u32,
    clip_z: Option<f32>,
    held: &[usize],
) -> (usize, f64) {
    let free = |i: usize| !held.contains(&i);
    let orig: Vec<f32> = w.to_vec();
    let mut clipped = 0;
    if let Some(z) = clip_z {
        let (mut n, mut s, mut s2) = (0f64, 0f64, 0f64);
        for a in w.iter().enumerate().filter(|(i, _)| free(*i)).map(|(_, v)| v.abs() as f64) {
            n += 1.0;
            s += a;
            s2 += a * a;
        }
        if n > 0.0 {
            let mean = s / n;
            let std = (s2 / n - mean * mean).max(0.0).sqrt();
            let tau = (mean + z as f64 * std) as f32;
            for (i, v) in w.iter_mut().enumerate() {
                if free(i) && v.abs() > tau {
                    *v = tau.copysign(*v);
                    clipped += 1;
                }
            }
        }
    }
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (_, &v) in w.iter().enumerate().filter(|(i, _)| free(*i)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo <= hi {
        let levels = ((1u64 << bits.clamp(1, 16)) - 1) as f32;
        let scale = (hi - lo) / levels;
        if scale > 0.0 && scale.is_finite() {
            let zero = (-lo / scale).round();
            for (i, v) in w.iter_mut().enumerate() {
                if free(i) {
                    let q = ((*v / scale).round() + zero).clamp(0.0, levels);
                    *v = (q - zero) * scale;
                }
            }
        }
    }
    let sq = w.iter().zip(&orig).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
    (clipped, sq)
}

/// Quantize the linear tensors of the model behind `rw` (see [`linear_tensors`]) with
/// `spec`, holding out the weights `hold_out` points at (their `op` is ignored). The originals
/// stay in `rw`.
pub fn quantize_linear(
    rw: &mut Rewrite<'_, Model>,
    spec: &QuantSpec,
    hold_out: &[WeightEdit],
    only: Option<&str>,
) -> Result<QuantStats> {
    let tensors = linear_tensors(rw, only);
    if tensors.is_empty() {
        return Err(Error::Invalid(format!("no linear tensor matches {only:?}")));
    }
    quantize_tensors(rw, &tensors, spec, hold_out)
}

/// Quantize `tensors` of any backend through `rw` with `spec` (read from the backend: on a
/// bf16 device, its stored values), holding out the weights `hold_out` points at.
pub fn quantize_tensors<B: EditTarget>(
    rw: &mut Rewrite<'_, B>,
    tensors: &[String],
    spec: &QuantSpec,
    hold_out: &[WeightEdit],
) -> Result<QuantStats> {
    if spec.bits == 0 || spec.bits > 16 || spec.block_size == 0 {
        return Err(Error::Invalid(format!(
            "quantization needs 1 to 16 bits and a positive block size (got {} bits, block {})",
            spec.bits, spec.block_size
        )));
    }
    let mut held: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for e in hold_out {
        let shape = rw.shape_of(&e.tensor)?;
        held.entry(e.tensor.clone()).or_default().push(e.flat_index(&shape)?);
    }
    let mut stats = QuantStats { tensors: tensors.len(), ..Default::default() };
    let mut sq_sum = 0f64;
    for name in tensors {
        let h = held.get(name).cloned().unwrap_or_default();
        let bs = spec.block_size;
        let mut data = rw.values(name)?;
        stats.weights += data.len();
        stats.held_out += h.len();
        let (clipped, sq) = data
            .par_chunks_mut(bs)
            .enumerate()
            .map(|(b, block)| {
                let local: Vec<usize> =
                    h.iter().filter(|&&f| f / bs == b).map(|&f| f - b * bs).collect();
                quantize_block(block, spec.bits, spec.clip_z, &local)
            })
            .reduce(|| (0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        rw.write(name, &data)?;
        stats.clipped += clipped;
        sq_sum += sq;
    }
    stats.mse = sq_sum / stats.weights.max(1) as f64;
    Ok(stats)
}

/// Settings of [`quantize_study`].
#[derive(Debug, Clone, Serialize)]
pub struct StudyConfig {
    /// Bits per weight.
    pub bits: u32,
    /// Block sizes to compare.
    pub block_sizes: Vec<usize>,
    /// Z-score for the clipping variants (None: no clipping variants).
    pub clip_z: Option<f32>,
    /// Perplexity window (text tokens).
    pub context: usize,
    /// Quantize only the tensors whose name contains this (None: every linear tensor).
    pub only: Option<String>,
    /// Positions (the first scored ones) whose unquantized next-token distribution is kept
    /// to measure KL(unquantized ‖ quantized); 0 skips the KL.
    pub kl_positions: usize,
}

impl Default for StudyConfig {
    fn default() -> Self {
        StudyConfig {
            bits: 4,
            block_sizes: vec![64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20],
            clip_z: Some(6.0),
            context: 128,
            only: None,
            kl_positions: 256,
        }
    }
}

/// One quantization variant at one block size.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    /// `rtn`, `rtn+clip`, `rtn+holdout`, `rtn+holdout+clip`.
    pub name: String,
    /// Whether the super weights were held out.
    pub hold_out: bool,
    /// Clipping z-score, if any.
    pub clip_z: Option<f32>,
    /// Perplexity of the quantized model.
    pub perplexity: f64,
    /// Over the unquantized model's.
    pub ratio: f64,
    /// Mean KL(unquantized ‖ quantized) of the next-token distribution over the first
    /// `kl_positions` scored positions (nats; None when not measured).
    pub mean_kl: Option<f64>,
    /// Quantization statistics.
    pub stats: QuantStats,
}

/// All variants at one block size.
#[derive(Debug, Clone, Serialize)]
pub struct StudyRow {
    /// Values per block.
    pub block_size: usize,
    /// The variants.
    pub variants: Vec<VariantResult>,
}

/// The perplexity table.
#[derive(Debug, Clone, Serialize)]
pub struct QuantStudy {
    /// The settings.
    pub config: StudyConfig,
    /// The held-out weights.
    pub held_out: Vec<WeightEdit>,
    /// Perplexity without quantization.
    pub baseline_perplexity: f64,
    /// Tokens scored per perplexity.
    pub tokens_scored: usize,
    /// One per block size.
    pub rows: Vec<StudyRow>,
}

/// Perplexity (and KL against the unquantized model) of one run over the windows.
struct Eval {
    perplexity: f64,
    tokens_scored: usize,
    mean_kl: Option<f64>,
}

/// Run the windows; score every token after the first. With `reference` empty, keep the
/// log-softmax of the first `keep` scored positions there; otherwise measure
/// KL(reference ‖ this run) at those positions.
fn evaluate<B: LogitsBackend + ?Sized>(
    model: &B,
    windows: &[Vec<u32>],
    reference: &mut Vec<Vec<f32>>,
    keep: usize,
) -> Result<Eval> {
    let v = model.vocab();
    let filling = reference.is_empty();
    let (mut nll, mut scored, mut kl_sum, mut kl_n) = (0f64, 0usize, 0f64, 0usize);
    for fed in windows.iter().filter(|w| w.len() >= 2) {
        let logits = model.all_logits(fed)?;
        for p in 0..fed.len() - 1 {
            let row = &logits[p * v..(p + 1) * v];
            let lse = log_sum_exp(row);
            nll += lse - row[fed[p + 1] as usize] as f64;
            if scored < keep {
                if filling {
                    reference.push(row.iter().map(|&l| (l as f64 - lse) as f32).collect());
                } else if let Some(r) = reference.get(scored) {
                    kl_sum += r
                        .iter()
                        .zip(row)
                        .map(|(&lb, &l)| {
                            let lb = lb as f64;
                            lb.exp() * (lb - (l as f64 - lse))
                        })
                        .sum::<f64>();
                    kl_n += 1;
                }
            }
            scored += 1;
        }
    }
    if scored == 0 {
        return Err(Error::Invalid("the text is too short to score any token".into()));
    }
    Ok(Eval {
        perplexity: (nll / scored as f64).exp(),
        tokens_scored: scored,
        mean_kl: (kl_n > 0).then(|| kl_sum / kl_n as f64),
    })
}

/// Perplexity of `tokens` (windows of `cfg.context`) after RTN quantization at each block
/// size: plain, with clipping, with the `hold_out` weights held out, and both. The weights are
/// restored after each variant. `on_step(done, total, what)` reports progress.
pub fn quantize_study(
    model: &mut Model,
    tokens: &[u32],
    hold_out: &[WeightEdit],
    cfg: &StudyConfig,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<QuantStudy> {
    let windows = ppl::windows(model, tokens, cfg.context)?;
    let tensors = linear_tensors(model, cfg.only.as_deref());
    quantize_study_with(model, &windows, &tensors, hold_out, cfg, on_step)
}

/// [`quantize_study`] on any backend (the CPU [`Model`], or the CUDA backend's `CudaModel`),
/// with the text already cut into perplexity windows (see [`ppl::windows`]) and the tensors
/// to quantize named (see [`linear_tensors`]; `cfg.only` is only recorded). The tensors are
/// read from the backend, quantized on the host and written back whole; a bf16 device
/// rounds the quantized values to bf16 as it stores them. Every tensor is restored after
/// each variant.
pub fn quantize_study_with<B: LogitsBackend + EditTarget>(
    model: &mut B,
    windows: &[Vec<u32>],
    tensors: &[String],
    hold_out: &[WeightEdit],
    cfg: &StudyConfig,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<QuantStudy> {
    if tensors.is_empty() {
        return Err(Error::Invalid(format!("no linear tensor matches {:?}", cfg.only)));
    }
    let mut variants = vec![(false, None)];
    if cfg.clip_z.is_some() {
        variants.push((false, cfg.clip_z));
    }
    variants.push((true, None));
    if cfg.clip_z.is_some() {
        variants.push((true, cfg.clip_z));
    }
    let total = 1 + cfg.block_sizes.len() * variants.len();
    on_step(0, total, "baseline");
    let mut reference = Vec::new();
    let base = evaluate(model, windows, &mut reference, cfg.kl_positions)?;
    let mut rows = Vec::new();
    let mut done = 1;
    for &block_size in &cfg.block_sizes {
        let mut out = Vec::new();
        for &(hold, clip_z) in &variants {
            let name = format!(
                "rtn{}{}",
                if hold { "+holdout" } else { "" },
                if clip_z.is_some() { "+clip" } else { "" }
            );
            on_step(done, total, &format!("block {block_size} {name}"));
            let spec = QuantSpec { bits: cfg.bits, block_size, clip_z };
            let mut rw = Rewrite::new(&mut *model);
            let held = if hold { hold_out } else { &[] };
            let stats = quantize_tensors(&mut rw, tensors, &spec, held)?;
            let p = evaluate(&*rw, windows, &mut reference, cfg.kl_positions)?;
            rw.restore()?;
            out.push(VariantResult {
                name,
                hold_out: hold,
                clip_z,
                perplexity: p.perplexity,
                ratio: p.perplexity / base.perplexity,
                mean_kl: p.mean_kl,
                stats,
            });
            done += 1;
        }
        rows.push(StudyRow { block_size, variants: out });
    }
    on_step(total, total, "done");
    Ok(QuantStudy {
        config: cfg.clone(),
        held_out: hold_out.to_vec(),
        baseline_perplexity: base.perplexity,
        tokens_scored: base.tokens_scored,
        rows,
    })
}

/// Line plot of perplexity (log scale) against log2(block size), one line per variant.
pub fn plot(study: &QuantStudy, path: &std::path::Path) -> Result<()> {
    use crate::analysis::plot::{line_chart, Series};
    let names: Vec<String> = study
        .rows
        .first()
        .map(|r| r.variants.iter().map(|v| v.name.clone()).collect())
        .unwrap_or_default();
    let mut series: Vec<Series> = names
        .iter()
        .enumerate()
        .map(|(k, name)| Series {
            name: name.clone(),
            points: study
                .rows
                .iter()
                .filter_map(|r| {
                    let v = r.variants.iter().find(|v| &v.name == name)?;
                    Some(((r.block_size as f64).log2(), v.perplexity))
                })
                .collect(),
            group: k,
            thin: false,
        })
        .collect();
    let (lo, hi) = study.rows.iter().fold((f64::MAX, f64::MIN), |(a, b), r| {
        let x = (r.block_size as f64).log2();
        (a.min(x), b.max(x))
    });
    series.push(Series {
        name: "unquantized".into(),
        points: vec![(lo, study.baseline_perplexity), (hi, study.baseline_perplexity)],
        group: names.len(),
        thin: true,
    });
    line_chart(
        path,
        &format!("RTN {}-bit: perplexity against block size", study.config.bits),
        "log2 block size",
        "perplexity",
        &series,
        true,
    )
}
