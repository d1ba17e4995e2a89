//! Fast causal confirmation: perplexity of a short text with edits applied, re-running only
//! the blocks an edit can change.
//!
//! The unedited run of each window keeps the residual stream entering every block and the KV
//! cache. An edit in block `L` leaves blocks `< L` untouched, so the edited run starts at `L`
//! from the stored residual, with the stored keys/values of the earlier blocks. Results equal
//! a full pass bit for bit (same kernels, same inputs).

use crate::edit::{EditGuard, WeightEdit};
use crate::eval::ppl;
use crate::hooks::{HookKind, HookPoint, Hooks};
use crate::model::arch::{ForwardOptions, Input, KvCache, Logits};
use crate::{Model, Result};

struct Window {
    fed: Vec<u32>,
    /// Residual stream entering block `l` for l in 0..layers, and leaving the last block.
    resid: Vec<Vec<f32>>,
    cache: KvCache,
}

/// The baseline state of a confirmation text.
pub struct Confirmer {
    windows: Vec<Window>,
    nll_sum: f64,
    scored: usize,
}

/// The first block an edit of `tensor` can change (0 for the embedding, the number of layers
/// for the final norm and head).
pub fn first_block(model: &Model, tensor: &str) -> usize {
    if let Some(rest) = tensor.strip_prefix("model.layers.") {
        if let Some(l) = rest.split('.').next().and_then(|l| l.parse().ok()) {
            return l;
        }
    }
    match tensor {
        "model.norm.weight" | "lm_head.weight" => model.config.num_layers,
        _ => 0,
    }
}

impl Confirmer {
    /// Run the unedited model over `tokens` (perplexity protocol, windows of `context`) and keep
    /// what the edited runs need.
    pub fn new(model: &Model, tokens: &[u32], context: usize) -> Result<Self> {
        Self::from_windows(model, ppl::windows(model, tokens, context)?)
    }

    /// Run the unedited model over ready-made perplexity windows (see [`ppl::windows`]) and
    /// keep what the edited runs need.
    pub fn from_windows(model: &Model, fed_windows: Vec<Vec<u32>>) -> Result<Self> {
        let n = model.config.num_layers;
        let mut windows = Vec::new();
        let (mut nll_sum, mut scored) = (0.0, 0);
        for fed in fed_windows {
            if fed.len() < 2 {
                continue;
            }
            let mut resid = vec![Vec::new(); n + 1];
            let mut cache = KvCache::new(model);
            let logits = {
                let slots = std::sync::Mutex::new(&mut resid);
                let mut hooks = Hooks::new();
                let grab = |p: HookPoint, a: &mut crate::hooks::Activation<'_>| {
                    let idx = if p.kind == HookKind::ResidPost { p.layer + 1 } else { p.layer };
                    if let Ok(mut s) = slots.lock() {
                        s[idx] = a.data.to_vec();
                    }
                };
                for l in 0..n {
                    hooks.add(HookPoint { layer: l, kind: HookKind::ResidPre }, grab);
                }
                hooks.add(HookPoint { layer: n - 1, kind: HookKind::ResidPost }, grab);
                model.forward(
                    &fed,
                    &mut cache,
                    ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::All },
                )?
            };
            let (s, k) = ppl::score(&logits, &fed, model.config.vocab_size);
            nll_sum += s;
            scored += k;
            windows.push(Window { fed, resid, cache });
        }
        if scored == 0 {
            return Err(crate::Error::Invalid(
                "the confirmation text is too short to score any token".into(),
            ));
        }
        Ok(Confirmer { windows, nll_sum, scored })
    }

    /// Perplexity without edits.
    pub fn baseline_perplexity(&self) -> f64 {
        (self.nll_sum / self.scored as f64).exp()
    }

    /// Tokens scored.
    pub fn tokens_scored(&self) -> usize {
        self.scored
    }

    /// Perplexity with `edits` applied (restored before returning).
    pub fn perplexity_with(&self, model: &mut Model, edits: &[WeightEdit]) -> Result<f64> {
        let first = edits.iter().map(|e| first_block(model, &e.tensor)).min().unwrap_or(0);
        let mut g = EditGuard::new(model);
        g.apply_all(edits)?;
        let mut nll_sum = 0.0;
        for w in &self.windows {
            let mut cache = w.cache.clone();
            let input = if first == 0 {
                cache.clear();
                Input::Tokens(&w.fed)
            } else {
                Input::Residual { layer: first, x: &w.resid[first], pos0: 0 }
            };
            let logits = g.forward_input(
                input,
                &mut cache,
                ForwardOptions { logits: Logits::All, ..Default::default() },
            )?;
            nll_sum += ppl::score(&logits, &w.fed, g.config.vocab_size).0;
        }
        Ok((nll_sum / self.scored as f64).exp())
    }
}
