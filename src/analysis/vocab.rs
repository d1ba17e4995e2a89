//! Vocabulary effects: how the next-token distribution changes when the edits are applied.
//!
//! For every position of every sample that predicts a next token, both runs' log-softmax
//! (f64) are compared: per token id the mean change in log-probability and in probability over
//! all positions, KL(base ‖ edited) per position, and the change in the log-likelihood of the
//! tokens that actually follow. Without edits every difference is exactly zero (the two runs
//! compute the same bits).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::analysis::plot::{self, Bar};
use crate::analysis::{log_sum_exp, token_label_with};
use crate::edit::{EditGuard, EditTarget, WeightEdit};
use crate::eval::generate::argmax;
use crate::eval::logits::LogitsBackend;
use crate::io::tokenizer::Tokenizer;
use crate::{Error, Model, Result};

/// Settings of [`vocab_effects`].
#[derive(Debug, Clone, Serialize)]
pub struct VocabConfig {
    /// How many tokens to list among the largest gains and losses.
    pub top_k: usize,
    /// Keep the full per-token mean log-probability change in the report.
    pub include_all: bool,
}

impl Default for VocabConfig {
    fn default() -> Self {
        VocabConfig { top_k: 20, include_all: false }
    }
}

/// One token's mean shift over all scored positions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenShift {
    /// Token id.
    pub id: u32,
    /// Decoded text (Debug-quoted), or `#id` without a tokenizer.
    pub token: String,
    /// Mean of `log p_edited - log p_base` (nats).
    pub mean_logprob_change: f64,
    /// Mean probability without the edits.
    pub mean_prob_base: f64,
    /// Mean probability with the edits.
    pub mean_prob_edited: f64,
}

/// A token as the actual next token of the text.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetShift {
    /// Token id.
    pub id: u32,
    /// Decoded text.
    pub token: String,
    /// How often it was the next token.
    pub count: usize,
    /// Mean change of its log-likelihood where it was the next token (nats).
    pub mean_logprob_change: f64,
}

/// What the edits do to next-token distributions.
#[derive(Debug, Clone, Serialize)]
pub struct VocabReport {
    /// The edits compared against the unedited model.
    pub edits: Vec<WeightEdit>,
    /// Samples run.
    pub samples: usize,
    /// Positions compared (each predicts the next token of its sample).
    pub positions: usize,
    /// Mean KL(base ‖ edited) per position (nats).
    pub mean_kl: f64,
    /// Largest KL at one position.
    pub max_kl: f64,
    /// Fraction of positions whose most likely token is unchanged.
    pub top1_agreement: f64,
    /// Perplexity of the actual next tokens without the edits.
    pub base_perplexity: f64,
    /// Perplexity of the actual next tokens with the edits.
    pub edited_perplexity: f64,
    /// Mean |log-probability change| over the whole vocabulary.
    pub mean_abs_logprob_change: f64,
    /// Tokens with the largest mean log-probability gain.
    pub gainers: Vec<TokenShift>,
    /// Tokens with the largest mean log-probability loss.
    pub losers: Vec<TokenShift>,
    /// Tokens with the largest mean probability gain (where the probability mass goes).
    pub prob_gainers: Vec<TokenShift>,
    /// Tokens with the largest mean probability loss.
    pub prob_losers: Vec<TokenShift>,
    /// Next tokens of the text (seen at least twice) that lost the most log-likelihood.
    pub target_losers: Vec<TargetShift>,
    /// Mean log-probability change of every token id (only with `include_all`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_change: Option<Vec<f32>>,
}

/// Vocabulary width of one parallel task.
const CHUNK: usize = 2048;

/// Compare next-token distributions over `samples` with and without `edits` (restored
/// before returning). Each sample runs from an empty cache; every position but the last
/// predicts the token after it. `on_sample(done, total)` reports progress.
pub fn vocab_effects(
    model: &mut Model,
    samples: &[Vec<u32>],
    edits: &[WeightEdit],
    cfg: &VocabConfig,
    on_sample: impl FnMut(usize, usize),
) -> Result<VocabReport> {
    let tok = model.tokenizer.clone();
    vocab_effects_with(model, tok.as_ref(), samples, edits, cfg, on_sample)
}

/// [`vocab_effects`] on any backend (the CPU [`Model`], or the CUDA backend's `CudaModel`),
/// tokens labelled with `tok` (None: `#id`).
pub fn vocab_effects_with<B: LogitsBackend + EditTarget>(
    model: &mut B,
    tok: Option<&Tokenizer>,
    samples: &[Vec<u32>],
    edits: &[WeightEdit],
    cfg: &VocabConfig,
    mut on_sample: impl FnMut(usize, usize),
) -> Result<VocabReport> {
    let v = model.vocab();
    let mut sum_d = vec![0f64; v];
    let mut sum_pb = vec![0f64; v];
    let mut sum_pe = vec![0f64; v];
    let (mut kl_sum, mut kl_max, mut agree, mut positions) = (0f64, 0f64, 0usize, 0usize);
    let (mut nll_b, mut nll_e) = (0f64, 0f64);
    let mut targets: BTreeMap<u32, (usize, f64)> = BTreeMap::new();
    for (si, s) in samples.iter().enumerate() {
        if s.len() < 2 {
            on_sample(si + 1, samples.len());
            continue;
        }
        let n = s.len() - 1;
        let base = model.all_logits(s)?;
        let edited = {
            let mut g = EditGuard::new(&mut *model);
            g.apply_all(edits)?;
            g.all_logits(s)?
        };
        let rows = |l: &[f32]| -> Vec<f64> { l.par_chunks(v).take(n).map(log_sum_exp).collect() };
        let (lse_b, lse_e) = (rows(&base), rows(&edited));
        // Per vocabulary chunk: accumulate over positions; per-position KL partial sums.
        let kl_parts: Vec<Vec<f64>> = sum_d
            .par_chunks_mut(CHUNK)
            .zip(sum_pb.par_chunks_mut(CHUNK))
            .zip(sum_pe.par_chunks_mut(CHUNK))
            .enumerate()
            .map(|(c, ((d, pb), pe))| {
                let lo = c * CHUNK;
                (0..n)
                    .map(|p| {
                        let (b, e) =
                            (&base[p * v + lo..][..d.len()], &edited[p * v + lo..][..d.len()]);
                        let mut kl = 0f64;
                        let slots = d.iter_mut().zip(pb.iter_mut()).zip(pe.iter_mut());
                        for (((d, pb), pe), (&b, &e)) in slots.zip(b.iter().zip(e)) {
                            let lb = b as f64 - lse_b[p];
                            let le = e as f64 - lse_e[p];
                            let (qb, qe) = (lb.exp(), le.exp());
                            *d += le - lb;
                            *pb += qb;
                            *pe += qe;
                            kl += qb * (lb - le);
                        }
                        kl
                    })
                    .collect()
            })
            .collect();
        for p in 0..n {
            let kl: f64 = kl_parts.iter().map(|k| k[p]).sum();
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            let (rb, re) = (&base[p * v..][..v], &edited[p * v..][..v]);
            agree += usize::from(argmax(rb) == argmax(re));
            let t = s[p + 1];
            let lb = rb[t as usize] as f64 - lse_b[p];
            let le = re[t as usize] as f64 - lse_e[p];
            nll_b -= lb;
            nll_e -= le;
            let e = targets.entry(t).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += le - lb;
        }
        positions += n;
        on_sample(si + 1, samples.len());
    }
    if positions == 0 {
        return Err(Error::Invalid("no sample has two tokens to compare".into()));
    }
    let np = positions as f64;
    let shift = |id: usize| TokenShift {
        id: id as u32,
        token: token_label_with(tok, id as u32),
        mean_logprob_change: sum_d[id] / np,
        mean_prob_base: sum_pb[id] / np,
        mean_prob_edited: sum_pe[id] / np,
    };
    let top = |key: &dyn Fn(usize) -> f64, descending: bool| -> Vec<TokenShift> {
        let mut ids: Vec<usize> = (0..v).collect();
        let cmp = |a: &usize, b: &usize| {
            let o = key(*a).total_cmp(&key(*b));
            if descending {
                o.reverse()
            } else {
                o
            }
        };
        let k = cfg.top_k.min(v);
        if k == 0 {
            return Vec::new();
        }
        ids.select_nth_unstable_by(k - 1, cmp);
        ids.truncate(k);
        ids.sort_by(cmp);
        ids.into_iter().map(shift).collect()
    };
    let dlog = |id: usize| sum_d[id];
    let dprob = |id: usize| sum_pe[id] - sum_pb[id];
    let mut target_losers: Vec<TargetShift> = targets
        .iter()
        .filter(|(_, (c, _))| *c >= 2)
        .map(|(&id, &(count, s))| TargetShift {
            id,
            token: token_label_with(tok, id),
            count,
            mean_logprob_change: s / count as f64,
        })
        .collect();
    target_losers.sort_by(|a, b| a.mean_logprob_change.total_cmp(&b.mean_logprob_change));
    target_losers.truncate(cfg.top_k);
    Ok(VocabReport {
        edits: edits.to_vec(),
        samples: samples.len(),
        positions,
        mean_kl: kl_sum / np,
        max_kl: kl_max,
        top1_agreement: agree as f64 / np,
        base_perplexity: (nll_b / np).exp(),
        edited_perplexity: (nll_e / np).exp(),
        mean_abs_logprob_change: sum_d.iter().map(|d| d.abs()).sum::<f64>() / (np * v as f64),
        gainers: top(&dlog, true),
        losers: top(&dlog, false),
        prob_gainers: top(&dprob, true),
        prob_losers: top(&dprob, false),
        target_losers,
        logprob_change: cfg.include_all.then(|| sum_d.iter().map(|d| (d / np) as f32).collect()),
    })
}

/// Bar chart of the probability gainers (green) and losers (red): mean probability change in
/// percentage points, labelled with the tokens.
pub fn plot(report: &VocabReport, path: &Path) -> Result<()> {
    let bars: Vec<Bar> = report
        .prob_gainers
        .iter()
        .map(|t| (t, 2))
        .chain(report.prob_losers.iter().rev().map(|t| (t, 1)))
        .map(|(t, group)| Bar {
            label: t.token.clone(),
            value: 100.0 * (t.mean_prob_edited - t.mean_prob_base),
            group,
        })
        .collect();
    let title = format!(
        "Next-token probability shift with {} edit(s) (mean KL {:.3} nats)",
        report.edits.len(),
        report.mean_kl
    );
    plot::bar_chart(path, &title, "mean probability change (percentage points)", &bars)
}
