//! CPU kernels: f32 GEMM (via the `gemm` crate), RMSNorm, RoPE, causal attention, SiLU·mul and
//! residual add with fused spike statistics. Rows are tokens; all buffers are row-major.

use rayon::prelude::*;

use crate::hooks::ChannelMax;

/// Up to this many rows, [`linear`] streams each weight row once against all rows of `x`
/// (memory-bound, like a GEMV); above it, it calls the `gemm` crate, whose packing pays off.
pub const SMALL_BATCH: usize = 48;

/// `out[t, o] = Σ_i x[t, i] · w[o, i]` (+ `bias[o]`): a linear layer with HF weight layout
/// `[out, in]`. `x` is `[rows, in]`, `out` is `[rows, out]`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    rows: usize,
    n_in: usize,
    n_out: usize,
) {
    assert_eq!(x.len(), rows * n_in, "linear: x is not [rows, in]");
    assert_eq!(w.len(), n_out * n_in, "linear: w is not [out, in]");
    assert_eq!(out.len(), rows * n_out, "linear: out is not [rows, out]");
    if rows <= SMALL_BATCH {
        linear_small(x, w, out, rows, n_in, n_out);
    } else {
        linear_gemm(x, w, out, rows, n_in, n_out);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(n_out).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
    }
}

/// Few rows: parallel over blocks of weight rows; each weight row is read once and dotted
/// with every row of `x` (which stays in cache). Each output is one dot product computed by one
/// task, so the result does not depend on the thread count.
fn linear_small(x: &[f32], w: &[f32], out: &mut [f32], rows: usize, n_in: usize, n_out: usize) {
    const BLOCK: usize = 16;
    // Computed transposed ([out, rows]) so that tasks own contiguous chunks, then transposed.
    let mut out_t = vec![0f32; n_out * rows];
    out_t.par_chunks_mut(BLOCK * rows).zip(w.par_chunks(BLOCK * n_in)).for_each(|(o, wb)| {
        for (orow, wrow) in o.chunks_mut(rows).zip(wb.chunks(n_in)) {
            for (t, slot) in orow.iter_mut().enumerate() {
                *slot = dot(&x[t * n_in..(t + 1) * n_in], wrow);
            }
        }
    });
    for (o, col) in out_t.chunks(rows).enumerate() {
        for (t, &v) in col.iter().enumerate() {
            out[t * n_out + o] = v;
        }
    }
}

/// Dot product with 16 independent accumulators (vectorized; AVX2+FMA when the CPU has it).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..16 {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail = x.mul_add(*y, tail);
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

/// Many rows: the `gemm` crate (packed, cache-blocked, multi-threaded).
fn linear_gemm(x: &[f32], w: &[f32], out: &mut [f32], rows: usize, n_in: usize, n_out: usize) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the slices have the lengths asserted in `linear`; strides describe x as
    // [rows, in] row-major, wᵀ as [in, out] (column stride n_in, row stride 1), out as
    // [rows, out] row-major.
    unsafe {
        gemm::gemm(
            rows,
            n_out,
            n_in,
            out.as_mut_ptr(),
            1,
            n_out as isize,
            false,
            x.as_ptr(),
            1,
            n_in as isize,
            w.as_ptr(),
            n_in as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// RMSNorm of each row of `x` (width `n`) into `out`: `w ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32], n: usize) {
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = w * (x * inv);
        }
    });
}

/// Rotate each head of `x` (`[rows, n_heads * head_dim]`) in place, HF "rotate_half" layout:
/// pairs are `(i, i + head_dim/2)`, angle `pos · inv_freq[i]` for row `t` at `pos0 + t`.
pub fn rope(x: &mut [f32], inv_freq: &[f32], pos0: usize, n_heads: usize, head_dim: usize) {
    debug_assert_eq!(inv_freq.len() * 2, head_dim);
    rope_partial(x, inv_freq, pos0, n_heads, head_dim);
}

/// Causal attention of `rows` new queries against the cache.
///
/// `q` is `[rows, n_heads * hd]`, queries at positions `pos0..pos0+rows`; `k`, `v` are the
/// cache `[pos0 + rows, n_kv * hd]`. Query head `h` reads kv head `h / (n_heads / n_kv)`.
/// With `window = Some(w)` a query at `p` sees keys `p - w < j <= p`. Writes `[rows, n_heads*hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    rows: usize,
    pos0: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    window: Option<usize>,
) {
    debug_assert_eq!(q.len(), rows * n_heads * hd);
    debug_assert_eq!(out.len(), rows * n_heads * hd);
    debug_assert!(k.len() >= (pos0 + rows) * n_kv * hd && v.len() == k.len());
    let group = n_heads / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let kv_w = n_kv * hd;
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (t, h) = (idx / n_heads, idx % n_heads);
        let p = pos0 + t;
        let kvh = h / group;
        let qh = &q[t * n_heads * hd + h * hd..][..hd];
        let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let mut scores: Vec<f32> = (first..=p)
            .map(|j| {
                let kj = &k[j * kv_w + kvh * hd..][..hd];
                qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (s, j) in scores.iter().zip(first..=p) {
            let w = s / sum;
            let vj = &v[j * kv_w + kvh * hd..][..hd];
            o.iter_mut().zip(vj).for_each(|(o, v)| *o += w * v);
        }
    });
}

/// Rows per parallel task in the fused element-wise kernels. Fixed (not derived from the
/// thread count) so that spike statistics are identical for any number of threads.
const ROWS_PER_TASK: usize = 8;

/// `out = silu(gate) ⊙ up`, row by row (width `n`). When `stats` is given, each column's
/// max |out| and its token position (`pos0 + row`) are reduced in the same pass.
pub fn silu_mul(
    gate: &[f32],
    up: &[f32],
    out: &mut [f32],
    n: usize,
    pos0: usize,
    stats: Option<&mut [ChannelMax]>,
) {
    gated_mul(gate, up, out, n, pos0, stats, Act::Silu);
}

/// `x += y`, row by row (width `n`). When `stats` is given, each column's max |y| and its
/// token position are reduced in the same pass.
pub fn add_residual(
    x: &mut [f32],
    y: &[f32],
    n: usize,
    pos0: usize,
    stats: Option<&mut [ChannelMax]>,
) {
    let op = |x: &mut [f32], y: &[f32], _: &[f32]| x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    match stats {
        None => x.par_chunks_mut(n).zip(y.par_chunks(n)).for_each(|(x, y)| op(x, y, y)),
        Some(stats) => fused_rows(x, y, y, n, pos0, stats, Reduce::A, op),
    }
}

/// Fold each column's max |a| over the rows of `a` (width `n`) into `stats` (a plain pass,
/// used only where a hook rewrote an activation after its fused statistics were taken).
pub fn column_max(a: &[f32], n: usize, pos0: usize, stats: &mut [ChannelMax]) {
    for (r, row) in a.chunks(n).enumerate() {
        fold_max(stats, row, pos0 + r);
    }
}

fn fold_max(stats: &mut [ChannelMax], row: &[f32], position: usize) {
    for (m, &v) in stats.iter_mut().zip(row) {
        if v.abs() > m.abs {
            *m = ChannelMax { value: v, abs: v.abs(), position };
        }
    }
}

/// Which row a fused kernel reduces: its output, or its first input.
#[derive(Clone, Copy)]
enum Reduce {
    Out,
    A,
}

/// Run `op(out_row, a_row, b_row)` over all rows in parallel tasks of [`ROWS_PER_TASK`] rows,
/// folding each column's max |·| of the chosen row into `stats` while the row is cache-hot;
/// partial results merge in task order (earliest position wins ties).
#[allow(clippy::too_many_arguments)]
fn fused_rows(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    pos0: usize,
    stats: &mut [ChannelMax],
    reduce: Reduce,
    op: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    let step = ROWS_PER_TASK * n;
    let partials: Vec<Vec<ChannelMax>> = out
        .par_chunks_mut(step)
        .zip(a.par_chunks(step))
        .zip(b.par_chunks(step))
        .enumerate()
        .map(|(task, ((o, a), b))| {
            let mut local = vec![ChannelMax::default(); n];
            for (r, ((o, a), b)) in o.chunks_mut(n).zip(a.chunks(n)).zip(b.chunks(n)).enumerate() {
                op(o, a, b);
                let row: &[f32] = match reduce {
                    Reduce::Out => o,
                    Reduce::A => a,
                };
                fold_max(&mut local, row, pos0 + task * ROWS_PER_TASK + r);
            }
            local
        })
        .collect();
    for p in &partials {
        for (s, p) in stats.iter_mut().zip(p) {
            if p.abs > s.abs {
                *s = *p;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels of the non-Llama families (Gemma, Phi-3, OLMo, GPT-2, GPT-NeoX).
// ---------------------------------------------------------------------------------------------

/// RMSNorm of each `n`-wide row of `x` in place: `w ⊙ x / sqrt(mean(x²) + eps)` (per-head
/// QK-norm: `n = head_dim`, `w` shared by the heads).
pub fn rmsnorm_in_place(x: &mut [f32], w: &[f32], eps: f64, n: usize) {
    x.par_chunks_mut(n).for_each(|x| {
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for (x, &w) in x.iter_mut().zip(w) {
            *x = w * (*x * inv);
        }
    });
}

/// LayerNorm of each row of `x` (width `n`) into `out`:
/// `(x - mean(x)) / sqrt(var(x) + eps) ⊙ w + b`, with `w = 1` and `b = 0` when absent (OLMo's
/// non-parametric norm). Mean and variance are accumulated in f64.
pub fn layernorm(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
    out: &mut [f32],
    n: usize,
) {
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = x.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (c, (o, &x)) in o.iter_mut().zip(x).enumerate() {
            let mut y = ((x as f64 - mean) * inv) as f32;
            if let Some(w) = w {
                y *= w[c];
            }
            if let Some(b) = b {
                y += b[c];
            }
            *o = y;
        }
    });
}

/// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`):
/// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`.
#[inline]
pub fn gelu_tanh_scalar(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// GELU, exact: `x/2 · (1 + erf(x/√2))`.
#[inline]
pub fn gelu_erf_scalar(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// The error function, to about 1e-15: below |x| = 3 the series
/// `erf(x) = 2/√π · e^(-x²) · Σ (2x²)ⁿ x / (1·3·…·(2n+1))` (all terms positive, so no
/// cancellation), above it the continued fraction of erfc.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let (two_a2, mut term) = (2.0 * a * a, a);
        let mut sum = a;
        for n in 1..200 {
            term *= two_a2 / (2 * n + 1) as f64;
            sum += term;
            if term < 1e-17 * sum {
                break;
            }
        }
        std::f64::consts::FRAC_2_SQRT_PI * (-a * a).exp() * sum
    } else if a < 7.0 {
        // erfc(a) = e^(-a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    r.copysign(x)
}

/// `out = gelu_tanh(gate) ⊙ up`, row by row (width `n`) — Gemma's GeGLU. With `stats`, each
/// column's max |out| and its position are reduced in the same pass (as [`silu_mul`]).
pub fn gelu_tanh_mul(
    gate: &[f32],
    up: &[f32],
    out: &mut [f32],
    n: usize,
    pos0: usize,
    stats: Option<&mut [ChannelMax]>,
) {
    gated_mul(gate, up, out, n, pos0, stats, Act::GeluTanh);
}

/// `out = gelu_erf(gate) ⊙ up` (exact GELU), with optional fused column maxima.
pub fn gelu_mul(
    gate: &[f32],
    up: &[f32],
    out: &mut [f32],
    n: usize,
    pos0: usize,
    stats: Option<&mut [ChannelMax]>,
) {
    gated_mul(gate, up, out, n, pos0, stats, Act::Gelu);
}

/// Which element-wise activation [`activate`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `x · sigmoid(x)`.
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// GELU, exact (erf).
    Gelu,
}

impl Act {
    /// The activation of one value.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::GeluTanh => gelu_tanh_scalar(x),
            Act::Gelu => gelu_erf_scalar(x),
        }
    }
}

/// `out = act(x)` row by row (width `n`) — the un-gated MLPs of GPT-2 and GPT-NeoX. With
/// `stats`, each column's max |out| and its position are reduced in the same pass.
pub fn activate(
    x: &[f32],
    out: &mut [f32],
    act: Act,
    n: usize,
    pos0: usize,
    stats: Option<&mut [ChannelMax]>,
) {
    let op = move |o: &mut [f32], x: &[f32], _: &[f32]| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = act.apply(x);
        }
    };
    match stats {
        None => out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| op(o, x, x)),
        Some(stats) => fused_rows(out, x, x, n, pos0, stats, Reduce::Out, op),
    }
}

/// `out = act(gate) ⊙ up` row by row, with optional fused column maxima of `out`.
fn gated_mul(
    gate: &[f32],
    up: &[f32],
    out: &mut [f32],
    n: usize,
    pos0: usize,
    stats: Option<&mut [ChannelMax]>,
    act: Act,
) {
    let op = move |o: &mut [f32], g: &[f32], u: &[f32]| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = act.apply(g) * u;
        }
    };
    match stats {
        None => out
            .par_chunks_mut(n)
            .zip(gate.par_chunks(n))
            .zip(up.par_chunks(n))
            .for_each(|((o, g), u)| op(o, g, u)),
        Some(stats) => fused_rows(out, gate, up, n, pos0, stats, Reduce::Out, op),
    }
}

/// `x = cap · tanh(x / cap)` element-wise (Gemma's logit soft-capping).
pub fn softcap(x: &mut [f32], cap: f32) {
    x.par_iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// Clamp every element of `x` to `[-c, c]` (OLMo's `clip_qkv`).
pub fn clamp(x: &mut [f32], c: f32) {
    x.par_iter_mut().for_each(|v| *v = v.clamp(-c, c));
}

/// Like [`rope`], but only the first `2 · inv_freq.len()` dims of each head rotate (partial
/// rotary, GPT-NeoX / Phi): pairs are `(i, i + r/2)` with `r = 2 · inv_freq.len()`; the other
/// `head_dim - r` dims pass through.
pub fn rope_partial(x: &mut [f32], inv_freq: &[f32], pos0: usize, n_heads: usize, head_dim: usize) {
    let half = inv_freq.len();
    x.par_chunks_mut(n_heads * head_dim).enumerate().for_each(|(t, row)| {
        let pos = (pos0 + t) as f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|&f| {
                let a = (pos * f) as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    });
}

/// How [`attention_with`] scores keys.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    /// Multiplier of `q·k` (`1/√head_dim` in most models).
    pub scale: f32,
    /// A query at `p` sees keys `p - w < j <= p` when `Some(w)`.
    pub window: Option<usize>,
    /// Scores become `cap · tanh(s / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// Causal attention like [`attention`], with the score scale, window and soft-cap of
/// `params`. When `pattern` is given it receives the softmax weights
/// `[rows, n_heads, pos0 + rows]` (zero outside the causal window).
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    rows: usize,
    pos0: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    params: AttnParams,
    pattern: Option<&mut [f32]>,
) {
    debug_assert_eq!(q.len(), rows * n_heads * hd);
    debug_assert_eq!(out.len(), rows * n_heads * hd);
    debug_assert!(k.len() >= (pos0 + rows) * n_kv * hd && v.len() == k.len());
    let group = n_heads / n_kv;
    let kv_w = n_kv * hd;
    let kv_len = pos0 + rows;
    let weights = |idx: usize| -> (usize, usize, Vec<f32>) {
        let (t, h) = (idx / n_heads, idx % n_heads);
        let p = pos0 + t;
        let kvh = h / group;
        let qh = &q[t * n_heads * hd + h * hd..][..hd];
        let first = params.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let mut scores: Vec<f32> = (first..=p)
            .map(|j| {
                let kj = &k[j * kv_w + kvh * hd..][..hd];
                let s = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * params.scale;
                match params.softcap {
                    Some(cap) => cap * (s / cap).tanh(),
                    None => s,
                }
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        scores.iter_mut().for_each(|s| *s /= sum);
        (first, kvh, scores)
    };
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (first, kvh, w) = weights(idx);
        o.fill(0.0);
        for (s, j) in w.iter().zip(first..) {
            let vj = &v[j * kv_w + kvh * hd..][..hd];
            o.iter_mut().zip(vj).for_each(|(o, v)| *o += s * v);
        }
    });
    if let Some(pattern) = pattern {
        debug_assert_eq!(pattern.len(), rows * n_heads * kv_len);
        pattern.par_chunks_mut(kv_len).enumerate().for_each(|(idx, o)| {
            let (first, _, w) = weights(idx);
            o.fill(0.0);
            o[first..first + w.len()].copy_from_slice(&w);
        });
    }
}
