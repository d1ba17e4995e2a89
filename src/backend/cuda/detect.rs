//! Detection on the device: [`CudaModel`] implements [`DetectBackend`], so
//! [`crate::detect::detect_with`] runs the paper's iteration and causal confirmation with
//! device forward passes (fused spike statistics) and device-memory edits.
//!
//! Confirmation re-scores every window from its first token with the edit applied (the CPU
//! backend restarts from the stored residual of the edited layer; on the GPU a full window
//! costs milliseconds).

use super::forward::CudaKvCache;
use super::model::{CudaModel, DevData};
use crate::detect::{ConfirmBaseline, DetectBackend};
use crate::edit::{EditGuard, WeightEdit};
use crate::hooks::SpikeStats;
use crate::model::arch::Logits;
use crate::model::ModelConfig;
use crate::{Error, Model, Result};

/// The unedited confirmation scores on the device.
pub struct CudaBaseline {
    windows: Vec<Vec<u32>>,
    nll_sum: f64,
    scored: usize,
}

impl ConfirmBaseline for CudaBaseline {
    fn baseline_perplexity(&self) -> f64 {
        (self.nll_sum / self.scored as f64).exp()
    }
    fn tokens_scored(&self) -> usize {
        self.scored
    }
}

impl CudaModel {
    /// Elements `start..start + len` of a tensor (row-major, HF shape) as f32 on the host.
    /// A streamed layer's tensor is read from the model's files, edits applied.
    pub fn download_range(&self, name: &str, start: usize, len: usize) -> Result<Vec<f32>> {
        if let Some(st) = self.stream.as_ref().filter(|st| st.entry(name).is_some()) {
            let v = st.values(name)?;
            return start
                .checked_add(len)
                .and_then(|end| v.get(start..end))
                .map(<[f32]>::to_vec)
                .ok_or_else(|| {
                    Error::tensor(
                        name,
                        format!("elements {start}..+{len} out of range ({} elements)", v.len()),
                    )
                });
        }
        self.dev.bind()?;
        let (t, data) = self.storage(name)?;
        if start.checked_add(len).is_none_or(|end| end > t.len()) {
            return Err(Error::tensor(
                name,
                format!("elements {start}..{} out of range ({} elements)", start + len, t.len()),
            ));
        }
        let at = t.offset + start;
        match data {
            DevData::F32(d) => self.dev.download(d, at, len),
            DevData::Half(d, dt) => Ok(self
                .dev
                .download(d, at, len)?
                .into_iter()
                .map(|b| f32::from_bits(dt.decode(b as u32)))
                .collect()),
        }
    }
}

impl DetectBackend for CudaModel {
    type Baseline = CudaBaseline;

    fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    fn spike_stats(&self, tokens: &[u32], stats: &mut SpikeStats) -> Result<()> {
        stats.reset();
        if self.run_graph(tokens, Some(&mut *stats), Logits::None, |_| Ok(()))?.is_none() {
            self.forward(tokens, &mut CudaKvCache::new(self), Some(stats), Logits::None)?;
        }
        Ok(())
    }

    fn down_proj_row(&self, layer: usize, row: usize) -> Result<Vec<f32>> {
        let name = Model::down_proj_name(layer);
        let cols = crate::edit::EditTarget::shape_of(self, &name)?.get(1).copied().unwrap_or(0);
        self.download_range(&name, row * cols, cols)
    }

    fn weights_checksum(&self) -> Result<u64> {
        self.checksum()
    }

    fn confirm_baseline(&self, windows: &[Vec<u32>]) -> Result<CudaBaseline> {
        let p = self.perplexity(windows, 0, |_, _| {})?;
        Ok(CudaBaseline { windows: windows.to_vec(), nll_sum: p.nll_sum, scored: p.tokens_scored })
    }

    fn confirm_with(&mut self, base: &CudaBaseline, edits: &[WeightEdit]) -> Result<f64> {
        let mut g = EditGuard::new(self);
        g.apply_all(edits)?;
        Ok(g.perplexity(&base.windows, 0, |_, _| {})?.perplexity)
    }
}
