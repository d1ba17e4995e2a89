//! Activations copied out of a device pass at hook points: [`CudaModel::capture`], the
//! device's counterpart of the CPU's read-only hooks (`analysis::capture`), for the analyses
//! that look inside the pass (cascade, trace, groups).
//!
//! A pass with taps copies each requested activation into its own device buffer as the pass
//! produces it (`swk_copy_rows`; attention weights are written by the attention kernel itself
//! when `attn.hook_pattern` is asked for), and downloads them all once the pass is done. The
//! points, their layouts and the layers that have them are the CPU's: a point the family's
//! CPU forward does not hook (a sparse layer's `mlp.hook_pre`, a parallel block's
//! `hook_resid_mid`) is absent from the result here too.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use super::driver::{CudaDevice, CudaSlice};
use super::forward::CudaKvCache;
use super::model::CudaModel;
use crate::hooks::{HookKind, HookPoint};
use crate::model::arch::Logits;
use crate::{Error, Result};

/// The points a pass copies out, and the device buffers holding what it copied:
/// `(buffer, width)` per point, `rows × width` values.
pub(crate) struct Taps {
    points: HashSet<HookPoint>,
    taken: RefCell<HashMap<HookPoint, (CudaSlice<f32>, usize)>>,
}

impl Taps {
    /// Taps at `points`.
    pub(crate) fn new(points: &[HookPoint]) -> Self {
        Taps { points: points.iter().copied().collect(), taken: RefCell::new(HashMap::new()) }
    }

    /// Whether `(layer, kind)` is tapped.
    pub(crate) fn wants(&self, layer: usize, kind: HookKind) -> bool {
        self.points.contains(&HookPoint { layer, kind })
    }

    /// A fresh device buffer of `rows × width` values for `(layer, kind)` for a kernel to write
    /// into; its address, or 0 when the point is not tapped.
    pub(crate) fn slot(
        &self,
        dev: &CudaDevice,
        layer: usize,
        kind: HookKind,
        rows: usize,
        width: usize,
    ) -> Result<u64> {
        if !self.wants(layer, kind) {
            return Ok(0);
        }
        let point = HookPoint { layer, kind };
        let mut taken = self.taken.borrow_mut();
        if taken.contains_key(&point) {
            return Err(Error::Backend(format!("{point} was tapped twice in one pass")));
        }
        let buf = dev.alloc::<f32>((rows * width).max(1))?;
        let at = dev.ptr(&buf);
        taken.insert(point, (buf, width));
        Ok(at)
    }

    /// Copy `rows × width` values at device address `src` out as `(layer, kind)`, when tapped.
    pub(crate) fn copy(
        &self,
        dev: &CudaDevice,
        layer: usize,
        kind: HookKind,
        src: u64,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let dst = self.slot(dev, layer, kind, rows, width)?;
        if dst != 0 && rows > 0 {
            dev.copy_rows((src, width, 1), (dst, width), rows, width, width)?;
        }
        Ok(())
    }

    /// Download everything tapped: `rows × width` values per point.
    fn download(self, dev: &CudaDevice, rows: usize) -> Result<HashMap<HookPoint, Vec<f32>>> {
        self.taken
            .into_inner()
            .into_iter()
            .map(|(p, (buf, width))| Ok((p, dev.download(&buf, 0, rows * width)?)))
            .collect()
    }
}

impl CudaModel {
    /// The activations at `points` of one forward pass over `tokens` from an empty cache (no
    /// logits): `[tokens, width]` per point, laid out as the CPU's hooks see them (see
    /// [`HookKind`]). A point the family does not have at that layer is absent, as on the
    /// CPU; a layer past the model's is an error.
    pub fn capture(
        &self,
        tokens: &[u32],
        points: &[HookPoint],
    ) -> Result<HashMap<HookPoint, Vec<f32>>> {
        let n = self.config.num_layers;
        if let Some(p) = points.iter().find(|p| p.layer >= n) {
            return Err(Error::Invalid(format!("{p} is past the model's {n} layers")));
        }
        let taps = Taps::new(points);
        let mut cache = CudaKvCache::new(self);
        self.run_tapped(&mut [(tokens, &mut cache)], None, Logits::None, Some(&taps))?;
        taps.download(&self.dev, tokens.len())
    }
}

impl crate::analysis::CaptureBackend for CudaModel {
    fn capture(
        &self,
        tokens: &[u32],
        points: &[HookPoint],
    ) -> Result<HashMap<HookPoint, Vec<f32>>> {
        CudaModel::capture(self, tokens, points)
    }
}
