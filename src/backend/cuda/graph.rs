//! CUDA graphs of whole forward passes, for the passes detection repeats with the same shape:
//! spike-statistics passes over a prompt and the scoring of confirmation windows, each from an
//! empty cache. The first pass of a shape runs normally (sizing every scratch buffer), then
//! is captured once into a graph over buffers the graph keeps; later passes of that shape
//! upload their tokens and replay the graph: one launch instead of ~25 per layer. Weights
//! are read through their device addresses, so in-place edits are seen by every replay.
//!
//! Off by default ([`CudaModel::set_graphs`]); a failed capture (e.g. a cuBLAS that
//! allocates while capturing) turns graphs off for the model and says why
//! ([`CudaModel::graph_error`]), and the pass runs the normal way.

use std::collections::HashMap;

use super::driver::{CudaGraph, CudaSlice};

use super::forward::{logit_rows, Acts, CudaKvCache, Pass};
use super::linear::Scratch;
use super::model::CudaModel;
use crate::hooks::SpikeStats;
use crate::model::arch::Logits;
use crate::{Error, Result};

/// What a captured pass is for: tokens, whether it gathers spike statistics, which logits.
pub(crate) type GraphKey = (usize, bool, u8);

/// A captured pass and the buffers it reads and writes.
pub(crate) struct GraphPass {
    tok: CudaSlice<u32>,
    _cache: CudaKvCache,
    _x: CudaSlice<f32>,
    acts: Acts,
    out: Option<CudaSlice<f32>>,
    _scratch: Scratch,
    graph: CudaGraph,
}

/// Passes kept per model (each holds its activations and a KV cache of its length).
const MAX_GRAPHS: usize = 8;

fn key(t: usize, stats: bool, logits: Logits) -> GraphKey {
    let l = match logits {
        Logits::All => 0,
        Logits::Last => 1,
        Logits::None => 2,
    };
    (t, stats, l)
}

impl CudaModel {
    /// Capture and replay CUDA graphs for repeated detection passes and perplexity windows
    /// (one graph per pass shape, its inputs refreshed before each replay; see graph.rs).
    /// Streamed models never use graphs; mixtures of experts only for passes whose sparse
    /// layers route on the device ([`CudaModel::set_device_routing`]: at most 16 tokens).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.forget_graphs();
        }
    }

    /// Whether graphs are in use (for a mixture of experts: for its short passes).
    pub fn graphs(&self) -> bool {
        self.graphs && self.graph_error().is_none() && !self.is_streamed()
    }

    /// Whether a pass of `t` tokens can be a graph: a mixture of experts routed on the host
    /// stops between its kernels for the router's download, which no graph holds.
    fn graphable(&self, t: usize) -> bool {
        self.graphs() && (self.config.family.moe.is_none() || self.routes_on_device(t))
    }

    /// How many captured passes are held for replay.
    pub fn graphs_held(&self) -> usize {
        self.graph_cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drop the captured passes (after a switch that changes what a pass launches).
    pub(crate) fn forget_graphs(&self) {
        self.graph_cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Why graph capture failed, if it did (graphs are then off for this model).
    pub fn graph_error(&self) -> Option<String> {
        self.graph_failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One pass over `tokens` from an empty cache, replayed from a graph: merges spike
    /// statistics into `stats` and hands the device logits (rows per `logits`) to `then`.
    /// `Ok(None)` when graphs are off or capture failed: the caller runs the pass normally.
    pub(crate) fn run_graph<R>(
        &self,
        tokens: &[u32],
        stats: Option<&mut SpikeStats>,
        logits: Logits,
        then: impl FnOnce(Option<&CudaSlice<f32>>) -> Result<R>,
    ) -> Result<Option<R>> {
        if tokens.is_empty() || !self.graphable(tokens.len()) {
            return Ok(None);
        }
        self.check_tokens(tokens)?;
        self.check_stats(stats.as_deref())?;
        self.dev.bind()?;
        let k = key(tokens.len(), stats.is_some(), logits);
        let mut cache = self.graph_cache.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(&k) {
            match self.capture_pass(tokens.len(), stats.is_some(), logits) {
                Ok(g) => {
                    if cache.len() >= MAX_GRAPHS {
                        cache.clear();
                    }
                    cache.insert(k, g);
                }
                Err(e) => {
                    *self.graph_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(e.to_string());
                    return Ok(None);
                }
            }
        }
        let g = cache.get_mut(&k).ok_or_else(|| Error::Backend("graph vanished".into()))?;
        self.dev.upload_into(tokens, &mut g.tok)?;
        self.dev.launch_graph(&g.graph)?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats {
            self.merge_keys(&g.acts, s, &mut guard)?;
        }
        drop(guard);
        let r = then(g.out.as_ref())?;
        self.dev.synchronize()?;
        Ok(Some(r))
    }

    /// Buffers for a pass of `t` tokens, one normal run over them (so every scratch buffer
    /// has its size before capture, when nothing may be allocated), then the capture.
    fn capture_pass(&self, t: usize, stats: bool, logits: Logits) -> Result<GraphPass> {
        let c = &self.config;
        let dev = &self.dev;
        let mut cache = CudaKvCache::new(self);
        self.reserve(&mut cache, t)?;
        let tok = dev.zeros::<u32>(t)?;
        let x = dev.alloc::<f32>(t * c.hidden_size)?;
        let mut acts = Acts::alloc(dev, c, (t, self.device_route_limit()), stats)?;
        let rows = logit_rows(logits, t);
        let out = match &rows {
            Some(r) => Some(dev.alloc::<f32>(r.len() * c.vocab_size)?),
            None => None,
        };
        // The graph keeps its own GEMM scratch: the model's may be reallocated by later passes
        // of other shapes, and a graph must never see its buffers move.
        let mut own = Scratch::default();
        let sc = &mut own;
        let mut enqueue = |acts: &mut Acts| -> Result<()> {
            if let Some(k) = acts.keys.as_mut() {
                dev.memset_zeros(k)?;
            }
            self.embed_into(dev.ptr(&tok), dev.ptr(&x), t, 0)?;
            self.layers(&[Pass { t, x: dev.ptr(&x), cache: &cache }], acts, sc, None)?;
            if let (Some(r), Some(o)) = (&rows, &out) {
                self.head_into(dev.ptr(&x), r.clone(), dev.ptr(o), sc)?;
            }
            Ok(())
        };
        enqueue(&mut acts)?;
        dev.synchronize()?;
        let graph = dev.capture(|| enqueue(&mut acts))?;
        Ok(GraphPass { tok, _cache: cache, _x: x, acts, out, _scratch: own, graph })
    }
}

/// The per-model graph store.
pub(crate) type GraphCache = std::sync::Mutex<HashMap<GraphKey, GraphPass>>;
