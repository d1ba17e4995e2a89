//! Greedy generation with a KV cache.

use crate::model::arch::{ForwardOptions, KvCache, Logits};
use crate::{Model, Result};

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedily extend `prompt` by up to `max_new` tokens, stopping at an end-of-generation token.
/// Returns the new token ids (the stop token included when one was produced).
pub fn greedy(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let stops: Vec<u32> =
        model.tokenizer.as_ref().map(|t| t.eos_ids().to_vec()).unwrap_or_default();
    let mut cache = KvCache::new(model);
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..max_new {
        let logits = model.forward(
            &input,
            &mut cache,
            ForwardOptions { logits: Logits::Last, ..Default::default() },
        )?;
        let next = argmax(&logits);
        out.push(next);
        on_token(next);
        if stops.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
