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
    let half = head_dim / 2;
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
    let op = |o: &mut [f32], g: &[f32], u: &[f32]| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
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
