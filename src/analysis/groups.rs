//! Group screening: massive activations written by several down_proj weights across layers,
//! none decisive alone.
//!
//! 1. One forward pass per prompt captures the residual stream leaving every block and every
//!    down_proj input. A *massive activation* is an entry `a = resid[l][t, d]` with `|a| > 100`
//!    and `|a| > 1000 ×` the median `|a|` of the layer's residual stream (all positions and
//!    dims, as `swk cascade` and Sun et al. 2024 measure it). Per hidden dim `d`
//!    the entry of largest `|a|` meeting the criterion is kept (its layer is the *peak layer*,
//!    its position the one studied), with the first layer where `d` met it.
//! 2. Writers: in every block up to the peak layer, the terms `w[d, c] · x[t, c]` of row `d` of
//!    `down_proj` at that position; per layer the `per_layer` largest that push toward `a`'s
//!    sign and reach `min_share · |a|`, then the `max_members` largest overall. (Contributions
//!    are those of the down_proj output, before any post-MLP norm; MoE layers are skipped.)
//! 3. Each writer is zeroed alone, then all of them together; perplexity of a text over the
//!    unedited baseline gives each one's and the group's ratio (on the CPU through
//!    [`Confirmer`](crate::confirm::Confirmer): every run starts at the first edited block
//!    from the stored residual stream and KV cache; on a device through [`groups_with`];
//!    single ratios are shared between activations). A *group* is decisive jointly (ratio above
//!    `decisive_ratio`) while no member is alone. A group is then pruned greedily, weakest
//!    contribution first, to a smaller set that stays decisive.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;

use crate::analysis::CaptureBackend;
use crate::detect::{ConfirmBaseline, DetectBackend};
use crate::edit::{EditOp, WeightEdit};
use crate::eval::ppl;
use crate::hooks::{HookKind, HookPoint};
use crate::{Error, Model, Result};

/// Settings of [`groups`].
#[derive(Debug, Clone, Serialize)]
pub struct GroupsConfig {
    /// A massive activation exceeds this |value| (Sun et al.: 100).
    pub min_abs: f32,
    /// ... and this multiple of the median |value| of its layer's residual stream (Sun et al.:
    /// 1000).
    pub min_ratio_to_median: f32,
    /// Writers kept per layer.
    pub per_layer: usize,
    /// A writer's term must reach this fraction of |activation|.
    pub min_share: f32,
    /// Most writers per activation.
    pub max_members: usize,
    /// Perplexity ratio above which an ablation is decisive.
    pub decisive_ratio: f64,
    /// Perplexity window (text tokens).
    pub context: usize,
    /// Prune decisive groups greedily to a smaller decisive subset.
    pub prune: bool,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            min_abs: 100.0,
            min_ratio_to_median: 1000.0,
            per_layer: 2,
            min_share: 0.05,
            max_members: 8,
            decisive_ratio: 2.0,
            context: 32,
            prune: true,
        }
    }
}

/// A massive activation (Sun et al.) of the residual stream.
#[derive(Debug, Clone, Serialize)]
pub struct MassiveActivation {
    /// Hidden dim.
    pub dim: usize,
    /// Prompt index.
    pub prompt: usize,
    /// Token position of the largest |value|.
    pub position: usize,
    /// First block after which the dim met the criterion (at any position).
    pub first_layer: usize,
    /// Block after which |value| is largest.
    pub peak_layer: usize,
    /// Signed value there.
    pub value: f32,
    /// |value| over the median |value| of its layer's residual stream.
    pub ratio_to_median: f32,
}

/// One writer of a massive activation.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// Layer of the down_proj.
    pub layer: usize,
    /// Row (the activation's dim).
    pub row: usize,
    /// Column.
    pub col: usize,
    /// The weight.
    pub value: f32,
    /// The down_proj input at the activation's position.
    pub input: f32,
    /// `value · input`, its term of the row.
    pub contribution: f32,
    /// Perplexity ratio with this weight alone zeroed.
    pub single_ratio: f64,
}

/// What the ablations say about one massive activation's writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Jointly decisive, no member decisive alone.
    Group,
    /// At least one member is decisive alone (a super weight).
    Single,
    /// Not even jointly decisive.
    NotDecisive,
    /// No down_proj term writes it (attention-made, or written by MoE experts).
    NoWriters,
}

/// The writers of one massive activation and their ablations.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationGroup {
    /// The activation.
    pub activation: MassiveActivation,
    /// Its writers, largest |contribution| first.
    pub members: Vec<Member>,
    /// Perplexity ratio with every member zeroed.
    pub joint_ratio: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
    /// For a group of more than two: the subset left by greedy pruning.
    pub minimal: Option<MinimalGroup>,
}

/// A subset of a group's members that stays decisive.
#[derive(Debug, Clone, Serialize)]
pub struct MinimalGroup {
    /// Its members, `(layer, row, col)`.
    pub members: Vec<(usize, usize, usize)>,
    /// Perplexity ratio with them zeroed.
    pub ratio: f64,
}

/// The report of [`groups`].
#[derive(Debug, Clone, Serialize)]
pub struct GroupsReport {
    /// The settings.
    pub config: GroupsConfig,
    /// Perplexity without edits.
    pub baseline_perplexity: f64,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Per massive activation (by dim), largest |value| first.
    pub activations: Vec<ActivationGroup>,
    /// How many are groups.
    pub groups: usize,
    /// Edited perplexity runs made.
    pub perplexity_runs: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Massive activations of `resid` (per block, `[tokens, hidden]`), by dim.
fn massive(
    resid: &[Vec<f32>],
    h: usize,
    prompt: usize,
    cfg: &GroupsConfig,
) -> Vec<MassiveActivation> {
    let mut by_dim: BTreeMap<usize, MassiveActivation> = BTreeMap::new();
    for (l, x) in resid.iter().enumerate() {
        let med = super::median_abs(x);
        for (t, row) in x.chunks(h).enumerate() {
            for (d, &a) in row.iter().enumerate() {
                if !(a.abs() > cfg.min_abs && a.abs() > cfg.min_ratio_to_median * med) {
                    continue;
                }
                let ratio = if med > 0.0 { a.abs() / med } else { f32::INFINITY };
                let e = by_dim.entry(d).or_insert(MassiveActivation {
                    dim: d,
                    prompt,
                    position: t,
                    first_layer: l,
                    peak_layer: l,
                    value: a,
                    ratio_to_median: ratio,
                });
                if a.abs() > e.value.abs() {
                    (e.position, e.peak_layer, e.value, e.ratio_to_median) = (t, l, a, ratio);
                }
            }
        }
    }
    by_dim.into_values().collect()
}

/// The down_proj terms writing `m` (see the module docs), largest first.
fn writers<B: CaptureBackend>(
    model: &B,
    m: &MassiveActivation,
    post: &[Option<Vec<f32>>],
    cfg: &GroupsConfig,
) -> Result<Vec<Member>> {
    let sign = m.value.signum();
    let mut all = Vec::new();
    for (l, x) in post.iter().enumerate().take(m.peak_layer + 1) {
        // A layer without a dense down_proj (a sparse layer) has no mlp.hook_post either.
        let Some(x) = x else { continue };
        let name = Model::down_proj_name(l);
        let (rows, cols) = match model.shape_of(&name)?[..] {
            [rows, cols] => (rows, cols),
            _ => return Err(Error::tensor(name, "not a matrix")),
        };
        if m.dim >= rows || x.len() < (m.position + 1) * cols {
            continue;
        }
        let xr = &x[m.position * cols..(m.position + 1) * cols];
        let wr = &model.down_proj_row(l, m.dim)?;
        let mut terms: Vec<(usize, f32)> =
            wr.iter().zip(xr).map(|(w, x)| w * x).enumerate().collect();
        terms.sort_by(|a, b| (b.1 * sign).total_cmp(&(a.1 * sign)));
        for &(c, term) in terms.iter().take(cfg.per_layer) {
            if term * sign >= cfg.min_share * m.value.abs() {
                all.push(Member {
                    layer: l,
                    row: m.dim,
                    col: c,
                    value: wr[c],
                    input: xr[c],
                    contribution: term,
                    single_ratio: f64::NAN,
                });
            }
        }
    }
    all.sort_by(|a, b| b.contribution.abs().total_cmp(&a.contribution.abs()));
    all.truncate(cfg.max_members);
    Ok(all)
}

fn zero(m: &Member) -> WeightEdit {
    WeightEdit::down_proj(m.layer, m.row, m.col, EditOp::Zero)
}

/// Find massive activations over `prompts`, their down_proj writers, and which are written by
/// groups of weights decisive only together (perplexity of `text` in windows of
/// `cfg.context`). Weights are restored before this returns. `on_step(done, total, what)`
/// reports progress.
pub fn groups(
    model: &mut Model,
    prompts: &[Vec<u32>],
    text: &[u32],
    cfg: &GroupsConfig,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<GroupsReport> {
    let start = Instant::now();
    let found = massive_writers(model, prompts, cfg, &mut on_step)?;
    let windows = ppl::windows(model, text, cfg.context)?;
    judge(model, found, &windows, cfg, start, on_step)
}

/// [`groups`] on any backend that captures activations (the CPU [`Model`], or the CUDA
/// backend's `CudaModel`), the text already cut into perplexity windows (see
/// [`ppl::windows`]): the massive activations, their writers (weights read through the
/// backend: on a bf16 device, its stored values) and every ablation.
pub fn groups_with<B: CaptureBackend>(
    backend: &mut B,
    prompts: &[Vec<u32>],
    windows: &[Vec<u32>],
    cfg: &GroupsConfig,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<GroupsReport> {
    let start = Instant::now();
    let found = massive_writers(&*backend, prompts, cfg, &mut on_step)?;
    judge(backend, found, windows, cfg, start, on_step)
}

/// Step 1 and 2 of the module docs on `model`: the massive activations over `prompts` (one per
/// hidden dim, largest |value| first) and each one's down_proj writers.
fn massive_writers<B: CaptureBackend>(
    model: &B,
    prompts: &[Vec<u32>],
    cfg: &GroupsConfig,
    on_step: &mut impl FnMut(usize, usize, &str),
) -> Result<Vec<(MassiveActivation, Vec<Member>)>> {
    let c = model.model_config();
    let (n, h) = (c.num_layers, c.hidden_size);
    let mut found: BTreeMap<usize, (MassiveActivation, Vec<Member>)> = BTreeMap::new();
    for (pi, tokens) in prompts.iter().enumerate() {
        if tokens.is_empty() {
            return Err(Error::Invalid(format!("prompt {pi} tokenizes to nothing")));
        }
        on_step(0, 1, "capturing activations");
        let mut points = Vec::with_capacity(2 * n);
        for l in 0..n {
            points.push(HookPoint { layer: l, kind: HookKind::ResidPost });
            points.push(HookPoint { layer: l, kind: HookKind::MlpPost });
        }
        let mut cap = model.capture(tokens, &points)?;
        let resid: Vec<Vec<f32>> = (0..n)
            .map(|l| {
                cap.remove(&HookPoint { layer: l, kind: HookKind::ResidPost }).unwrap_or_default()
            })
            .collect();
        let post: Vec<Option<Vec<f32>>> =
            (0..n).map(|l| cap.remove(&HookPoint { layer: l, kind: HookKind::MlpPost })).collect();
        for m in massive(&resid, h, pi, cfg) {
            if found.get(&m.dim).is_some_and(|(old, _)| old.value.abs() >= m.value.abs()) {
                continue;
            }
            let w = writers(model, &m, &post, cfg)?;
            found.insert(m.dim, (m, w));
        }
    }
    let mut list: Vec<(MassiveActivation, Vec<Member>)> = found.into_values().collect();
    list.sort_by(|a, b| b.0.value.abs().total_cmp(&a.0.value.abs()));
    Ok(list)
}

/// Step 3 of the module docs on `backend`: each writer zeroed alone, all together, and the
/// groups pruned, by the perplexity of `windows`.
fn judge<B: DetectBackend>(
    model: &mut B,
    list: Vec<(MassiveActivation, Vec<Member>)>,
    windows: &[Vec<u32>],
    cfg: &GroupsConfig,
    start: Instant,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<GroupsReport> {
    on_step(0, 1, "baseline perplexity");
    let confirmer = model.confirm_baseline(windows)?;
    let base = confirmer.baseline_perplexity();
    let mut runs = 0usize;
    let mut single: HashMap<(usize, usize, usize), f64> = HashMap::new();
    let total = list.len();
    let mut out = Vec::with_capacity(total);
    for (k, (act, mut members)) in list.into_iter().enumerate() {
        on_step(k, total, &format!("dim {} ({} writers)", act.dim, members.len()));
        if members.is_empty() {
            out.push(ActivationGroup {
                activation: act,
                members,
                joint_ratio: None,
                verdict: Verdict::NoWriters,
                minimal: None,
            });
            continue;
        }
        for m in &mut members {
            let key = (m.layer, m.row, m.col);
            m.single_ratio = match single.get(&key) {
                Some(&r) => r,
                None => {
                    runs += 1;
                    let r = model.confirm_with(&confirmer, &[zero(m)])? / base;
                    single.insert(key, r);
                    r
                }
            };
        }
        let all: Vec<WeightEdit> = members.iter().map(zero).collect();
        runs += 1;
        let joint = model.confirm_with(&confirmer, &all)? / base;
        let verdict = if members.iter().any(|m| m.single_ratio > cfg.decisive_ratio) {
            Verdict::Single
        } else if joint > cfg.decisive_ratio {
            Verdict::Group
        } else {
            Verdict::NotDecisive
        };
        let mut minimal = None;
        if verdict == Verdict::Group && cfg.prune && members.len() > 2 {
            let mut keep: Vec<bool> = vec![true; members.len()];
            let mut ratio = joint;
            // Weakest contribution first (members are sorted strongest first).
            for i in (0..members.len()).rev() {
                keep[i] = false;
                let edits: Vec<WeightEdit> =
                    members.iter().zip(&keep).filter(|(_, &k)| k).map(|(m, _)| zero(m)).collect();
                if edits.len() < 2 {
                    keep[i] = true;
                    continue;
                }
                runs += 1;
                let r = model.confirm_with(&confirmer, &edits)? / base;
                if r > cfg.decisive_ratio {
                    ratio = r;
                } else {
                    keep[i] = true;
                }
            }
            let coords: Vec<(usize, usize, usize)> = members
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(m, _)| (m.layer, m.row, m.col))
                .collect();
            minimal = Some(MinimalGroup { members: coords, ratio });
        }
        out.push(ActivationGroup {
            activation: act,
            members,
            joint_ratio: Some(joint),
            verdict,
            minimal,
        });
    }
    on_step(total, total, "done");
    Ok(GroupsReport {
        config: cfg.clone(),
        baseline_perplexity: base,
        tokens_scored: confirmer.tokens_scored(),
        groups: out.iter().filter(|g| g.verdict == Verdict::Group).count(),
        activations: out,
        perplexity_runs: runs,
        seconds: start.elapsed().as_secs_f64(),
    })
}
