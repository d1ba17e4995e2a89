//! Generation experiments: greedy continuations of the same prompts by the unedited model and
//! with the edited weights scaled by each factor (0 zeroes them, the paper's ablation; 1.5–3
//! amplifies them).

use serde::Serialize;

use crate::analysis::log_sum_exp;
use crate::edit::{EditGuard, EditOp, EditTarget, WeightEdit};
use crate::eval::generate::greedy_with;
use crate::eval::logits::LogitsBackend;
use crate::io::tokenizer::Tokenizer;
use crate::{Error, Model, Result};

/// Settings of [`compare_generate`].
#[derive(Debug, Clone, Serialize)]
pub struct CompareConfig {
    /// Scale factors applied to every edited weight (0: zeroed).
    pub factors: Vec<f32>,
    /// Tokens to generate at most per continuation.
    pub max_new_tokens: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig { factors: vec![0.0, 0.5, 2.0, 3.0], max_new_tokens: 24 }
    }
}

/// One continuation.
#[derive(Debug, Clone, Serialize)]
pub struct Continuation {
    /// `baseline`, or `x{factor}`.
    pub label: String,
    /// The scale factor (None for the unedited model).
    pub factor: Option<f32>,
    /// Generated token ids (a stop token included when produced).
    pub tokens: Vec<u32>,
    /// Decoded text (without special tokens); empty without a tokenizer.
    pub text: String,
    /// Probability of the first generated token.
    pub first_token_prob: f64,
    /// Mean log-probability of the generated tokens (nats).
    pub mean_logprob: f64,
}

/// The continuations of one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct PromptComparison {
    /// The prompt's token ids.
    pub prompt_tokens: Vec<u32>,
    /// The prompt as text (decoded; empty without a tokenizer).
    pub prompt: String,
    /// Baseline first, then one per factor.
    pub continuations: Vec<Continuation>,
}

/// Every comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// The weights that are scaled (their `op` is replaced by each factor).
    pub edits: Vec<WeightEdit>,
    /// The settings.
    pub config: CompareConfig,
    /// One per prompt.
    pub prompts: Vec<PromptComparison>,
}

/// The edits with their operation replaced by scaling by `factor` (0: set to zero).
pub fn scaled(edits: &[WeightEdit], factor: f32) -> Vec<WeightEdit> {
    let op = if factor == 0.0 { EditOp::Zero } else { EditOp::Scale(factor) };
    edits.iter().map(|e| WeightEdit { op, ..e.clone() }).collect()
}

/// Greedy continuations of every prompt: unedited, then with the edited weights scaled by
/// each factor (restored before returning). `on_step(done, total)` reports progress.
pub fn compare_generate(
    model: &mut Model,
    prompts: &[Vec<u32>],
    edits: &[WeightEdit],
    cfg: &CompareConfig,
    on_step: impl FnMut(usize, usize),
) -> Result<CompareReport> {
    let tok = model.tokenizer.clone();
    compare_generate_with(model, tok.as_ref(), prompts, edits, cfg, on_step)
}

/// [`compare_generate`] on any backend (the CPU [`Model`], or the CUDA backend's
/// `CudaModel`), with `tok` for the stop tokens and the texts (None: no stop, empty texts).
pub fn compare_generate_with<B: LogitsBackend + EditTarget>(
    model: &mut B,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    edits: &[WeightEdit],
    cfg: &CompareConfig,
    mut on_step: impl FnMut(usize, usize),
) -> Result<CompareReport> {
    if let Some(f) = cfg.factors.iter().find(|f| !f.is_finite()) {
        return Err(Error::Invalid(format!("scale factor {f} is not finite")));
    }
    let total = prompts.len() * (cfg.factors.len() + 1);
    let stops: Vec<u32> = tok.map(|t| t.eos_ids().to_vec()).unwrap_or_default();
    let decode = |ids: &[u32]| tok.and_then(|t| t.decode(ids, true).ok()).unwrap_or_default();
    let mut out = Vec::new();
    let mut done = 0;
    for p in prompts {
        if p.is_empty() {
            return Err(Error::Invalid("a prompt tokenizes to nothing".into()));
        }
        let variants = std::iter::once(None).chain(cfg.factors.iter().copied().map(Some));
        let mut continuations = Vec::new();
        for factor in variants {
            let mut g = EditGuard::new(&mut *model);
            let label = match factor {
                None => "baseline".to_string(),
                Some(f) => {
                    g.apply_all(&scaled(edits, f))?;
                    format!("x{f}")
                }
            };
            let mut logps = Vec::new();
            let tokens = greedy_with(&*g, p, cfg.max_new_tokens, &stops, |next, logits| {
                logps.push(logits[next as usize] as f64 - log_sum_exp(logits))
            })?;
            continuations.push(Continuation {
                label,
                factor,
                text: decode(&tokens),
                first_token_prob: logps.first().map_or(0.0, |l| l.exp()),
                mean_logprob: logps.iter().sum::<f64>() / logps.len().max(1) as f64,
                tokens,
            });
            drop(g);
            done += 1;
            on_step(done, total);
        }
        out.push(PromptComparison { prompt_tokens: p.clone(), prompt: decode(p), continuations });
    }
    Ok(CompareReport { edits: edits.to_vec(), config: cfg.clone(), prompts: out })
}
