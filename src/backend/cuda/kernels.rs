//! The kernels of `kernels/*.cu`: their names, launch configurations (pure functions, unit
//! tested without a GPU), host mirrors of their bit-level helpers, and typed launchers.
//!
//! Launchers take raw device addresses (`u64`, a `CUdeviceptr`): the backend runs everything
//! on one stream, so stream order alone makes every read see the writes before it.

use crate::hooks::ChannelMax;
use crate::{Error, Result};

/// Threads per block of the element-wise and per-row kernels.
pub const BLOCK: u32 = 256;
/// Threads per block of the attention kernels.
pub const ATTENTION_BLOCK: u32 = 128;
/// Most keys per tile of `swk_attention_tiled` (fewer when the device's shared memory holds
/// fewer).
pub const ATTENTION_TILE: usize = 1024;
/// Queries per block of `swk_attention_rows` (kernels/attention.cu's `ATTENTION_ROWS`): rows
/// times the heads of a KV head it groups.
pub const ATTENTION_ROWS: usize = 16;
/// Output dims each thread of `swk_attention_rows` accumulates (`ATTENTION_ROW_DIMS`): it
/// takes head dims up to `ATTENTION_ROW_DIMS * ATTENTION_BLOCK`.
pub const ATTENTION_ROW_DIMS: usize = 2;
/// Output dims each thread of `swk_attention_rows_wide` accumulates
/// (`ATTENTION_WIDE_DIMS`): head dims up to `ATTENTION_WIDE_DIMS * ATTENTION_BLOCK` (640:
/// DeepSeek's 576-wide latent rows).
pub const ATTENTION_WIDE_DIMS: usize = 5;
/// Keys per tile of the row-block kernels, largest first: the first whose shared memory fits.
pub const ATTENTION_ROW_TILES: [usize; 5] = [32, 16, 8, 4, 2];
/// Keys per block of `swk_attention_split` at least (a row with fewer is not split).
pub const ATTENTION_SPLIT_KEYS: usize = 512;
/// Most blocks one row's keys are split over.
pub const ATTENTION_MAX_SPLITS: usize = 64;
/// Most query rows a split attention takes (decoding; longer passes run in row blocks).
pub const ATTENTION_SPLIT_ROWS: usize = 16;
/// Output dims each thread of `swk_attention_tiled` accumulates (kernels/attention.cu's
/// `ATTENTION_DIMS`): it takes head dims up to `ATTENTION_DIMS * ATTENTION_BLOCK`.
pub const ATTENTION_DIMS: usize = 8;
/// Rows one thread walks in the fused statistics kernels (`swk_act_mul`, `swk_add_residual`)
/// before its single `atomicMax`; more when the grid's y dimension would overflow.
pub const STATS_ROWS_PER_BLOCK: usize = 16;
/// Output tile edge of `swk_gemm_*`.
pub const GEMM_TILE: usize = 64;
/// Largest row count `swk_gemv_*` handles (decode, detection prompts); larger products use
/// `swk_gemm_*`.
pub const GEMV_MAX_ROWS: usize = 16;
/// Output columns per block of `swk_gemv_*` (one per lane; its 8 warps split k).
pub const GEMV_COLS: usize = 32;
/// Largest grid y/z dimension CUDA allows.
pub const MAX_GRID_YZ: u64 = 65_535;
/// Largest grid x dimension CUDA allows.
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// Blocks of the grid-stride kernels (conversions, fills, checksums): enough to fill any
/// current GPU, few enough that the per-block atomics of the checksum stay cheap.
pub const GRID_STRIDE_BLOCKS: u64 = 4096;
/// Dynamic shared memory every device grants without opting in.
pub const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// Every kernel the host loads, by its `extern "C"` name (sorted). A unit test checks that
/// this is exactly the set defined in `kernels/*.cu` and that each is in the fatbin.
pub const KERNELS: &[&str] = &[
    "swk_act_mul",
    "swk_act_mul_grouped",
    "swk_add_bias",
    "swk_add_halves",
    "swk_add_residual",
    "swk_add_rmsnorm",
    "swk_attention",
    "swk_attention_merge",
    "swk_attention_rows",
    "swk_attention_rows_wide",
    "swk_attention_split",
    "swk_attention_tiled",
    "swk_bf16_to_f32",
    "swk_checksum_u16",
    "swk_checksum_u32",
    "swk_clamp",
    "swk_column_max",
    "swk_column_max_grouped",
    "swk_copy_rows",
    "swk_edit_u16",
    "swk_edit_u32",
    "swk_embed_bf16",
    "swk_embed_f16",
    "swk_embed_f32",
    "swk_f16_to_f32",
    "swk_f32_to_bf16",
    "swk_f32_to_f16",
    "swk_fill_normal_bf16",
    "swk_fill_normal_f16",
    "swk_fill_normal_f32",
    "swk_gather_u16",
    "swk_gather_u32",
    "swk_gemm_bf16",
    "swk_gemm_f16",
    "swk_gemm_f32",
    "swk_gemm_grouped_bf16",
    "swk_gemm_grouped_f16",
    "swk_gemm_grouped_f32",
    "swk_gemm_mma_act_bf16",
    "swk_gemm_mma_act_f16",
    "swk_gemm_mma_act_grouped_bf16",
    "swk_gemm_mma_act_grouped_f16",
    "swk_gemm_mma_bf16",
    "swk_gemm_mma_f16",
    "swk_gemm_mma_grouped_bf16",
    "swk_gemm_mma_grouped_f16",
    "swk_gemv_bf16",
    "swk_gemv_f16",
    "swk_gemv_f32",
    "swk_gemv_grouped_bf16",
    "swk_gemv_grouped_f16",
    "swk_gemv_grouped_f32",
    "swk_layernorm",
    "swk_mla_absorb_q_bf16",
    "swk_mla_absorb_q_f16",
    "swk_mla_absorb_q_f32",
    "swk_mla_absorb_v_bf16",
    "swk_mla_absorb_v_f16",
    "swk_mla_absorb_v_f32",
    "swk_moe_combine",
    "swk_moe_route",
    "swk_moe_route_tokens",
    "swk_nll",
    "swk_qkv_rope",
    "swk_rmsnorm",
    "swk_rope",
    "swk_rope_at",
    "swk_scatter_u16",
    "swk_scatter_u32",
    "swk_sigmoid_gate_add",
    "swk_softcap",
    "swk_split_bf16",
];

/// Warps of `swk_moe_route`'s one block (and of each block of `swk_moe_route_tokens`): one
/// per token, at most this many.
pub const ROUTE_MAX_WARPS: usize = 16;

/// How `swk_moe_route` scores a token's experts (its `scoring` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum RouteScoring {
    /// `moe::route`: softmax; the entropy of the f32 probabilities.
    Softmax = 0,
    /// `deepseek::route` with softmax scores (V2).
    DeepseekSoftmax = 1,
    /// `deepseek::route` with sigmoid scores (V3).
    DeepseekSigmoid = 2,
}

/// A mixture of experts' routing rule as `swk_moe_route` takes it (see kernels/route.cu).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteRule {
    /// How scores are made.
    pub scoring: RouteScoring,
    /// Expert groups (`n_group`; 1 without groups).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// How a group is scored (groups off when `None` or `n_group` is 1).
    pub group_score: crate::model::config::GroupScore,
    /// Whether the k weights are renormalized to sum to one.
    pub renorm: bool,
    /// Added to the renormalization's sum (DeepSeek: 1e-20).
    pub eps: f32,
    /// Factor on the weights (DeepSeek's `routed_scaling_factor`, else 1).
    pub scale: f32,
}

/// The launches that route `tokens` tokens on the device (see kernels/route.cu).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteLaunches {
    /// `swk_moe_route_tokens`, for more than [`ROUTE_MAX_WARPS`] tokens: a warp per token,
    /// [`ROUTE_MAX_WARPS`] a block.
    pub tokens: Option<Launch>,
    /// `swk_moe_route`'s one block: a warp per token up to [`ROUTE_MAX_WARPS`] (routing them
    /// itself when `tokens` is None).
    pub dispatch: Launch,
}

/// How `tokens` tokens are routed on the device: up to [`ROUTE_MAX_WARPS`] by
/// `swk_moe_route`'s one block alone; more by `swk_moe_route_tokens` over as many blocks as
/// they need, then that block for the dispatch.
pub fn moe_route(tokens: usize) -> Result<RouteLaunches> {
    let warps = tokens.clamp(1, ROUTE_MAX_WARPS) as u32;
    let dispatch = Launch::new((1, 1, 1), 32 * warps, 0)?;
    let tokens = if tokens > ROUTE_MAX_WARPS {
        let blocks = tokens.div_ceil(ROUTE_MAX_WARPS) as u64;
        Some(Launch::new((blocks, 1, 1), 32 * ROUTE_MAX_WARPS as u32, 0)?)
    } else {
        None
    };
    Ok(RouteLaunches { tokens, dispatch })
}

/// The MLP activation of `swk_act_mul` (its `act` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Activation {
    /// `x · sigmoid(x)`.
    Silu = 0,
    /// GELU, tanh approximation (Gemma, GPT-2).
    GeluTanh = 1,
    /// GELU, exact (erf; GPT-NeoX).
    Gelu = 2,
}

impl From<crate::model::config::HiddenAct> for Activation {
    fn from(a: crate::model::config::HiddenAct) -> Self {
        use crate::model::config::HiddenAct;
        match a {
            HiddenAct::Silu => Activation::Silu,
            HiddenAct::GeluTanh => Activation::GeluTanh,
            HiddenAct::Gelu => Activation::Gelu,
        }
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
}

impl Launch {
    fn new(grid: (u64, u64, u64), block: u32, shared_bytes: usize) -> Result<Self> {
        let bad = |what: &str| Error::Backend(format!("launch too large: {what} (grid {grid:?})"));
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Err(Error::Backend(format!("empty launch (grid {grid:?})")));
        }
        if grid.0 > MAX_GRID_X {
            return Err(bad("grid x"));
        }
        if grid.1 > MAX_GRID_YZ || grid.2 > MAX_GRID_YZ {
            return Err(bad("grid y/z"));
        }
        let shared = u32::try_from(shared_bytes).map_err(|_| bad("shared memory"))?;
        Ok(Launch {
            grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block: (block, 1, 1),
            shared_bytes: shared,
        })
    }

    /// Total threads launched.
    pub fn threads(&self) -> u64 {
        let g = self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64;
        g * self.block.0 as u64 * self.block.1 as u64 * self.block.2 as u64
    }
}

/// One thread per element of `n` (ceil(n / BLOCK) blocks of [`BLOCK`]).
pub fn elementwise(n: u64) -> Result<Launch> {
    Launch::new((n.div_ceil(BLOCK as u64), 1, 1), BLOCK, 0)
}

/// A grid-stride loop over `n` elements: at most [`GRID_STRIDE_BLOCKS`] blocks.
pub fn grid_stride(n: u64) -> Result<Launch> {
    Launch::new((n.div_ceil(BLOCK as u64).clamp(1, GRID_STRIDE_BLOCKS), 1, 1), BLOCK, 0)
}

/// `swk_qkv_rope`: grid y = 3 (q, k, v), x covering one thread per (row, head, dim pair or
/// unrotated dim) of the larger of q (`n_heads`) and k, v (`n_kv`).
pub fn qkv_rope(
    rows: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    rot_half: usize,
) -> Result<Launch> {
    let per = (rows * n_heads.max(n_kv) * (head_dim - rot_half.min(head_dim))) as u64;
    Launch::new((per.div_ceil(BLOCK as u64), 3, 1), BLOCK, 0)
}

/// One block of [`BLOCK`] per row (RMSNorm, NLL).
pub fn per_row(rows: usize) -> Result<Launch> {
    Launch::new((rows as u64, 1, 1), BLOCK, 0)
}

/// The fused statistics kernels: x over columns, y over groups of rows. Returns the launch
/// and the rows per group (at least [`STATS_ROWS_PER_BLOCK`], more when `rows` would need
/// more than 65 535 groups).
pub fn column_stats(rows: usize, n: usize) -> Result<(Launch, usize)> {
    let per = STATS_ROWS_PER_BLOCK.max(rows.div_ceil(MAX_GRID_YZ as usize));
    let l =
        Launch::new(((n as u64).div_ceil(BLOCK as u64), rows.div_ceil(per) as u64, 1), BLOCK, 0)?;
    Ok((l, per))
}

/// [`column_stats`] for `groups` groups of at most `max_rows` rows each (grid z: the group;
/// `swk_act_mul_grouped`, `swk_column_max_grouped`).
pub fn column_stats_grouped(max_rows: usize, n: usize, groups: usize) -> Result<(Launch, usize)> {
    let (l, per) = column_stats(max_rows.max(1), n)?;
    let l = Launch::new((l.grid.0 as u64, l.grid.1 as u64, groups as u64), BLOCK, 0)?;
    Ok((l, per))
}

/// Rows of x that `swk_gemm_mma_bf16` (the `mma` engine's tensor-core product) takes at most.
pub const MMA_MAX_ROWS: usize = 16;
/// Weight rows of one `swk_gemm_mma_bf16` block: 8 warps of 16.
pub const MMA_COLS: usize = 128;
/// Most k of x's terms a `swk_gemm_mma_*` block stages at a time (a block covering more
/// stages them in rounds): they then fit in the 48 KiB of shared memory every device grants
/// (2 terms × 16 rows × 736 padded × 2 bytes).
pub const MMA_MAX_STAGE: usize = 704;

/// Elements from one staged row of x's terms to the next in `swk_gemm_mma_*` for a `stage`
/// (a multiple of 32): padded so that a quarter warp's two rows fall on different
/// shared-memory banks (mirrors the kernel's `mma_stage_row`).
pub fn mma_stage_row(stage: usize) -> usize {
    if stage % 64 == 0 {
        stage + 32
    } else {
        stage
    }
}

/// How `swk_gemm_mma_*` covers a product: its launch, the k range of a block (`slab`, a
/// multiple of 32, staged `stage` k at a time) and the number of ranges (`slabs`, grid y;
/// more than one needs partial sums, `slabs × rows × n` f32, and a zeroed counter per column
/// range, grid x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaPlan {
    /// The launch: grid (column ranges, slabs), 256 threads, the staged terms' shared memory.
    pub launch: Launch,
    /// k per slab.
    pub slab: usize,
    /// k staged at a time (at most [`MMA_MAX_STAGE`]).
    pub stage: usize,
    /// Slabs (grid y).
    pub slabs: usize,
}

/// What `swk_gemm_mma_*` reads as x (`MmaX` in kernels/mma.cu): f32 rows `ld` elements apart,
/// or the MLP's activation, made from the gate and up products as the product reads it, as
/// `swk_act_mul` makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaInput {
    /// x, or the up product.
    pub x: u64,
    /// The gate product (0: none, an un-gated activation of `x`).
    pub gate: u64,
    /// Elements from one row to the next.
    pub ld: usize,
    /// The activation; None: x as it is.
    pub act: Option<Activation>,
    /// The first row's position, and where the activation's spike keys go (0: nowhere).
    pub keys: (usize, u64),
}

impl MmaInput {
    /// f32 rows at `x`, `ld` elements apart.
    pub fn rows(x: u64, ld: usize) -> Self {
        MmaInput { x, gate: 0, ld, act: None, keys: (0, 0) }
    }
}

/// The plan of `swk_gemm_mma_*` for `rows` (1..=[`MMA_MAX_ROWS`]) rows of x, `n` weight rows
/// and `k` (a multiple of 8): k is cut into slabs until the grid has about `target_blocks`
/// blocks, since a product of few column ranges alone would leave most of the device idle;
/// no more, since each slab's partial sums are written and added again.
pub fn mma(rows: usize, n: usize, k: usize, target_blocks: usize) -> Result<MmaPlan> {
    if rows == 0 || rows > MMA_MAX_ROWS || n == 0 || k == 0 || k % 8 != 0 {
        return Err(Error::Backend(format!(
            "the tensor-core product takes 1 to {MMA_MAX_ROWS} rows and k a multiple of 8 \
             (rows {rows}, n {n}, k {k})"
        )));
    }
    let cols = n.div_ceil(MMA_COLS);
    let chunks = k.div_ceil(32);
    let wanted = target_blocks.div_ceil(cols).clamp(1, chunks);
    let slab = chunks.div_ceil(wanted) * 32;
    let slabs = k.div_ceil(slab);
    let stage = slab.min(MMA_MAX_STAGE);
    let shared = 2 * MMA_MAX_ROWS * mma_stage_row(stage) * 2;
    let launch = Launch::new((cols as u64, slabs as u64, 1), 256, shared)?;
    Ok(MmaPlan { launch, slab, stage, slabs })
}

/// `swk_gemm_mma_grouped_bf16` over `groups` groups of at most [`MMA_MAX_ROWS`] rows, `n`
/// weight rows and `k` (a multiple of 8): its launch (grid (column ranges, 1, groups)) and
/// the k staged at a time (each block covers the whole of k, stage by stage).
pub fn mma_grouped(n: usize, k: usize, groups: usize) -> Result<(Launch, usize)> {
    if n == 0 || k == 0 || k % 8 != 0 || groups == 0 {
        return Err(Error::Backend(format!(
            "the grouped tensor-core product takes k a multiple of 8 (n {n}, k {k}, {groups} groups)"
        )));
    }
    let stage = (k.div_ceil(32) * 32).min(MMA_MAX_STAGE);
    let shared = 2 * MMA_MAX_ROWS * mma_stage_row(stage) * 2;
    let launch = Launch::new((n.div_ceil(MMA_COLS) as u64, 1, groups as u64), 256, shared)?;
    Ok((launch, stage))
}

/// Most keys any of `rows` queries at `pos0..` sees, with an optional sliding window.
pub fn attention_max_keys(rows: usize, pos0: usize, window: Option<usize>) -> usize {
    let last = pos0 + rows; // keys of the last query: positions < last
    match window {
        Some(w) if w > 0 => w.min(last),
        _ => last,
    }
}

/// Dynamic shared memory of `swk_attention`: reduction scratch, one query head, the scores
/// of `max_keys` keys (of one tile for `swk_attention_tiled` and `swk_attention_split`).
pub fn attention_shared_bytes(head_dim: usize, max_keys: usize) -> usize {
    (32 + head_dim + max_keys) * std::mem::size_of::<f32>()
}

/// Dynamic shared memory of the row-block kernels with tiles of `tile` keys: the block's
/// queries, a tile of keys (rows padded by one float) and of values (none when
/// `values_are_keys`), the weights, and three floats per row.
pub fn attention_rows_shared_bytes(head_dim: usize, tile: usize, values_are_keys: bool) -> usize {
    let (r, lq) = (ATTENTION_ROWS, head_dim + 1);
    let values = if values_are_keys { 0 } else { tile * head_dim };
    (r * lq + tile * lq + values + r * tile + 3 * r) * std::mem::size_of::<f32>()
}

/// The shape of one attention launch: `rows` queries at positions `pos0..` of `heads` heads
/// (over `kv_heads` key/value heads) of `head_dim`, within a sliding `window` when set.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query rows.
    pub rows: usize,
    /// Position of the first.
    pub pos0: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Width of a head (of a key and a value row).
    pub head_dim: usize,
    /// Sliding window (None or Some(0): none).
    pub window: Option<usize>,
    /// Whether the values are the keys' own rows (latent attention's cache): the row-block
    /// kernels then read a tile once for both. The launch's key and value pointers must
    /// then be equal, and differ otherwise.
    pub values_are_keys: bool,
}

/// What the device allows an attention launch: its opt-in shared memory per block, whether
/// row blocks and splits may run (not when the pattern hook wants the weights, which only
/// `swk_attention` and `swk_attention_tiled` write), and the least keys per split.
#[derive(Clone, Copy, Debug)]
pub struct AttentionLimits {
    /// Dynamic shared memory a block may use, in bytes.
    pub shared: usize,
    /// Whether `swk_attention_rows` and `swk_attention_split` may run.
    pub blocks: bool,
    /// Keys per split at least ([`ATTENTION_SPLIT_KEYS`]).
    pub split_keys: usize,
    /// Whether head dims up to `ATTENTION_ROW_DIMS * ATTENTION_BLOCK` take
    /// `swk_attention_rows` (always, but in tests that run `swk_attention_rows_wide` on
    /// small heads).
    pub narrow_rows: bool,
}

/// A split attention's second launch and its sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSplit {
    /// Blocks each row's keys are split over.
    pub splits: usize,
    /// Keys per split.
    pub chunk: usize,
    /// `swk_attention_merge`'s launch.
    pub merge: Launch,
}

impl AttentionSplit {
    /// The partial results' floats: `splits` of (max, sum, head_dim accumulators) per row
    /// and head.
    pub fn partial_floats(&self, s: &AttentionShape) -> usize {
        s.rows * s.heads * self.splits * (s.head_dim + 2)
    }
}

/// How an attention launch runs: the kernel, its launch, its tile of keys, and for a split
/// its merge.
#[derive(Clone, Copy, Debug)]
pub struct AttentionPlan {
    /// `swk_attention`, `swk_attention_rows`, `swk_attention_rows_wide`,
    /// `swk_attention_tiled` or `swk_attention_split`.
    pub kernel: &'static str,
    /// The kernel's launch ([`ATTENTION_BLOCK`] threads).
    pub launch: Launch,
    /// Keys per tile (0 for `swk_attention`, which holds them all).
    pub tile: usize,
    /// Heads of one KV head a `swk_attention_rows` block takes (1 otherwise).
    pub group: usize,
    /// When each row's keys are split over blocks (`swk_attention_split`, or
    /// `swk_attention_rows` decoding), the merge of their partial results.
    pub split: Option<AttentionSplit>,
}

/// Blocks a row's keys are split over: none (1) past [`ATTENTION_SPLIT_ROWS`] rows or up to
/// `split_keys` keys, else one per `split_keys` keys, at most [`ATTENTION_MAX_SPLITS`].
fn attention_splits(rows: usize, keys: usize, split_keys: usize) -> usize {
    let split_keys = split_keys.max(1);
    if rows > ATTENTION_SPLIT_ROWS || keys <= split_keys {
        return 1;
    }
    keys.div_ceil(split_keys).min(ATTENTION_MAX_SPLITS)
}

/// The heads of one KV head a `swk_attention_rows` block takes: the largest divisor of
/// `heads / kv_heads` up to [`ATTENTION_ROWS`].
pub fn attention_group(heads: usize, kv_heads: usize) -> usize {
    let g = heads / kv_heads.max(1);
    (1..=g.min(ATTENTION_ROWS)).rev().find(|d| g % d == 0).unwrap_or(1)
}

/// The attention kernel for a launch of shape `s` under `limits`:
/// * with `limits.blocks`, head dims up to `ATTENTION_ROW_DIMS * ATTENTION_BLOCK`, and more
///   than one query a block (a prefill, or heads sharing a KV head): `swk_attention_rows`,
///   [`attention_group`] heads times 16 / group rows a block, grid (⌈rows / rows a block⌉,
///   heads / group, splits), the largest of [`ATTENTION_ROW_TILES`] that fits; decoding past
///   `limits.split_keys` keys splits each row's keys over blocks, merged by
///   `swk_attention_merge`; head dims up to `ATTENTION_WIDE_DIMS * ATTENTION_BLOCK` the same
///   way in `swk_attention_rows_wide`;
/// * with `limits.blocks`, other decoding past `limits.split_keys` keys:
///   `swk_attention_split`, grid (rows, heads, splits), then `swk_attention_merge`, grid
///   (rows, heads);
/// * else `swk_attention`, grid (rows, heads), when the longest row's scores fit;
/// * else `swk_attention_tiled` (the softmax online over tiles of keys, any length).
///
/// Splits take at least `limits.split_keys` keys each, at most [`ATTENTION_MAX_SPLITS`] a
/// row, for at most [`ATTENTION_SPLIT_ROWS`] rows. Tiles of the last two are
/// [`ATTENTION_TILE`] keys, or as many as `limits.shared` holds. Errors when no kernel takes
/// the head dim.
pub fn attention(s: &AttentionShape, limits: &AttentionLimits) -> Result<AttentionPlan> {
    let (rows, head_dim, shared) = (s.rows, s.head_dim, limits.shared);
    let plan = |kernel, launch, tile| AttentionPlan { kernel, launch, tile, group: 1, split: None };
    let keys = attention_max_keys(rows, s.pos0, s.window);
    let grid = (rows as u64, s.heads as u64, 1);
    let merge = || Launch::new(grid, ATTENTION_BLOCK, 0);
    let group = attention_group(s.heads, s.kv_heads);
    let dims = |per_thread: usize| head_dim <= per_thread * ATTENTION_BLOCK as usize;
    let rows_kernel = if limits.narrow_rows && dims(ATTENTION_ROW_DIMS) {
        Some("swk_attention_rows")
    } else {
        dims(ATTENTION_WIDE_DIMS).then_some("swk_attention_rows_wide")
    };
    if let (true, Some(kernel), true) = (limits.blocks, rows_kernel, rows > 1 || group > 1) {
        let fits = ATTENTION_ROW_TILES
            .into_iter()
            .map(|tile| (tile, attention_rows_shared_bytes(head_dim, tile, s.values_are_keys)))
            .find(|&(_, bytes)| bytes <= shared);
        if let Some((tile, bytes)) = fits {
            let per_block = ATTENTION_ROWS / group;
            let splits = attention_splits(rows, keys, limits.split_keys);
            // A block's keys: its rows' windows together, up to per_block - 1 more than a row's.
            let chunk = (keys + per_block - 1).div_ceil(splits);
            let blocks = (rows.div_ceil(per_block) as u64, (s.heads / group) as u64, splits as u64);
            let launch = Launch::new(blocks, ATTENTION_BLOCK, bytes)?;
            let split =
                (splits > 1).then(|| merge().map(|merge| AttentionSplit { splits, chunk, merge }));
            let split = split.transpose()?;
            return Ok(AttentionPlan { kernel, launch, tile, group, split });
        }
    }
    let tile = (shared / 4).saturating_sub(32 + head_dim).min(ATTENTION_TILE);
    let max_dims = ATTENTION_DIMS * ATTENTION_BLOCK as usize;
    let online = head_dim <= max_dims && tile > 0;
    let splits = attention_splits(rows, keys, limits.split_keys);
    if limits.blocks && online && splits > 1 {
        let chunk = keys.div_ceil(splits);
        let tile = tile.min(chunk);
        let bytes = attention_shared_bytes(head_dim, tile);
        let launch =
            Launch::new((rows as u64, s.heads as u64, splits as u64), ATTENTION_BLOCK, bytes)?;
        let split = Some(AttentionSplit { splits, chunk, merge: merge()? });
        return Ok(AttentionPlan { kernel: "swk_attention_split", launch, tile, group: 1, split });
    }
    let bytes = attention_shared_bytes(head_dim, keys);
    if bytes <= shared {
        return Ok(plan("swk_attention", Launch::new(grid, ATTENTION_BLOCK, bytes)?, 0));
    }
    if !online {
        return Err(Error::Backend(format!(
            "attention over {keys} positions at head_dim {head_dim}: the tiled kernel takes head \
             dims up to {max_dims} and needs shared memory for at least one key ({} bytes; this \
             device allows {shared})",
            attention_shared_bytes(head_dim, 1)
        )));
    }
    let l = Launch::new(grid, ATTENTION_BLOCK, attention_shared_bytes(head_dim, tile))?;
    Ok(plan("swk_attention_tiled", l, tile))
}

/// Query rows each block of `swk_mla_absorb_*` walks (kernels/mla.cu's `MLA_ROWS`).
pub const MLA_ROWS: usize = 16;

/// `swk_mla_absorb_q_*` over `rows` tokens of `heads` heads, `kvr` latent columns: a thread
/// per column, [`MLA_ROWS`] rows a block.
pub fn mla_absorb_q(rows: usize, heads: usize, kvr: usize) -> Result<Launch> {
    let z = (rows as u64).div_ceil(MLA_ROWS as u64);
    Launch::new(((kvr as u64).div_ceil(BLOCK as u64), heads as u64, z), BLOCK, 0)
}

/// `swk_mla_absorb_v_*` over `rows` tokens of `heads` heads, `vd` value dims: a warp per
/// dim (8 a block), [`MLA_ROWS`] rows a block.
pub fn mla_absorb_v(rows: usize, heads: usize, vd: usize) -> Result<Launch> {
    let z = (rows as u64).div_ceil(MLA_ROWS as u64);
    Launch::new(((vd as u64).div_ceil(BLOCK as u64 / 32), heads as u64, z), BLOCK, 0)
}

/// `swk_gemm_*`: 64×64 output tiles over `[rows, n]`.
pub fn gemm_tiled(rows: usize, n: usize) -> Result<Launch> {
    Launch::new(
        ((n as u64).div_ceil(GEMM_TILE as u64), (rows as u64).div_ceil(GEMM_TILE as u64), 1),
        BLOCK,
        0,
    )
}

/// `swk_gemv_*`: [`GEMV_COLS`] output columns per block of 256 threads; `rows` must be at
/// most [`GEMV_MAX_ROWS`].
pub fn gemv(rows: usize, n: usize) -> Result<Launch> {
    if rows > GEMV_MAX_ROWS {
        return Err(Error::Backend(format!(
            "gemv handles at most {GEMV_MAX_ROWS} rows, got {rows}"
        )));
    }
    Launch::new(((n as u64).div_ceil(GEMV_COLS as u64), 1, 1), BLOCK, 0)
}

/// The launches of one grouped product over `groups` groups of rows (grid y: the group),
/// each group computed as its own [`gemv`] or [`gemm_tiled`] launch would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedLaunches {
    /// `swk_gemv_grouped_*`, for the groups of at most [`GEMV_MAX_ROWS`] rows (none when
    /// every group is larger).
    pub gemv: Option<Launch>,
    /// `swk_gemm_grouped_*`, the larger groups in 64×64 tiles numbered along grid x, as many
    /// blocks as the largest group needs (none when no group is larger).
    pub tiles: Option<Launch>,
}

/// The launches for `groups` groups of `min_rows..=max_rows` rows each, `n` columns wide
/// (see [`GroupedLaunches`]).
pub fn gemm_grouped(
    (min_rows, max_rows): (usize, usize),
    n: usize,
    groups: usize,
) -> Result<GroupedLaunches> {
    let gemv = (min_rows <= GEMV_MAX_ROWS)
        .then(|| Launch::new(((n as u64).div_ceil(GEMV_COLS as u64), groups as u64, 1), BLOCK, 0))
        .transpose()?;
    let tiles = (max_rows > GEMV_MAX_ROWS)
        .then(|| {
            let t = gemm_tiled(max_rows, n)?;
            Launch::new((t.grid.0 as u64 * t.grid.1 as u64, groups as u64, 1), BLOCK, 0)
        })
        .transpose()?;
    Ok(GroupedLaunches { gemv, tiles })
}

/// Split the `n_out` rows of a `[n_out, n_in]` weight into chunks of at most `cap` elements
/// (at least one row each), for widening bf16 weights into an f32 scratch chunk by chunk.
/// Returns `(first row, rows)` pairs covering `0..n_out` in order.
pub fn widen_chunks(n_out: usize, n_in: usize, cap: usize) -> Vec<(usize, usize)> {
    let per = (cap / n_in.max(1)).max(1);
    (0..n_out).step_by(per).map(|o0| (o0, per.min(n_out - o0))).collect()
}

/// A dimension as the `int` the kernels take.
pub fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Backend(format!("{what} = {v} does not fit a 32-bit kernel argument")))
}

/// Host mirror of `spike_key` in kernels/common.cuh: |v| bits in 63..33, `!pos` in 32..1,
/// the sign in bit 0; 0 for zero and NaN (never recorded, as on the CPU).
pub fn spike_key(v: f32, pos: u32) -> u64 {
    let bits = v.to_bits();
    let abs = bits & 0x7fff_ffff;
    if abs == 0 || abs > 0x7f80_0000 {
        return 0;
    }
    ((abs as u64) << 33) | ((!pos as u64) << 1) | (bits >> 31) as u64
}

/// Decode a spike key; `None` for 0 (nothing seen).
pub fn decode_spike_key(key: u64) -> Option<ChannelMax> {
    if key == 0 {
        return None;
    }
    let abs = f32::from_bits((key >> 33) as u32);
    let position = !((key >> 1) as u32) as usize;
    let value = if key & 1 == 1 { -abs } else { abs };
    Some(ChannelMax { value, abs, position })
}

/// Merge one launch's decoded keys into accumulated statistics with the CPU rule: a channel's
/// maximum is replaced only by a strictly larger |value| (earlier calls win ties).
pub fn merge_spike_keys(stats: &mut [ChannelMax], keys: &[u64]) {
    for (s, &k) in stats.iter_mut().zip(keys) {
        if let Some(m) = decode_spike_key(k) {
            if m.abs > s.abs {
                *s = m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor-core product's plans: slabs of whole 32-k chunks that cover k exactly
    /// (none empty), staged in rounds that fit the 48 KiB every device grants, about the
    /// target number of blocks when k allows (two per multiprocessor of an H100 here), and
    /// errors outside 1..=16 rows or for k not a multiple of 8.
    #[test]
    fn mma_plans_cover_k_within_shared_memory() {
        let shapes = [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (32000, 4096)];
        for (n, k) in shapes.into_iter().chain([(64, 64), (150, 200), (40, 1000), (8, 8)]) {
            for rows in [1, 9, 16] {
                let p = mma(rows, n, k, 264).unwrap();
                assert_eq!((p.slab % 32, p.stage % 32), (0, 0), "{n} × {k}");
                assert!(p.slab * p.slabs >= k && (p.slabs - 1) * p.slab < k, "{n} × {k}: {p:?}");
                assert_eq!(p.stage, p.slab.min(MMA_MAX_STAGE), "{n} × {k}");
                assert!(p.launch.shared_bytes as usize <= DEFAULT_SHARED_BYTES, "{n} × {k}");
                assert_eq!(p.launch.grid, (n.div_ceil(MMA_COLS) as u32, p.slabs as u32, 1));
                let blocks = p.launch.grid.0 as usize * p.slabs;
                if k >= 32 * 264 / n.div_ceil(MMA_COLS) {
                    assert!(blocks >= 264, "{n} × {k}: {p:?}");
                }
                assert!(p.slabs == 1 || blocks < 2 * 264, "{n} × {k}: {p:?}");
            }
        }
        // At 7B shapes: o_proj's and down_proj's 32 column ranges are cut into 9 slabs (288
        // blocks; down_proj's slabs of 1248 staged in two rounds); q/k/v's 96 into 3, gate/up's
        // 172 and the LM head's 250 into 2.
        let slabs = |n: usize, k: usize| {
            let p = mma(9, n, k, 264).unwrap();
            (p.slabs, p.slab, p.stage)
        };
        assert_eq!(slabs(4096, 4096), (9, 480, 480));
        assert_eq!(slabs(4096, 11008), (9, 1248, 704));
        assert_eq!(slabs(12288, 4096), (3, 1376, 704));
        assert_eq!(slabs(22016, 4096), (2, 2048, 704));
        assert_eq!(slabs(32000, 4096), (2, 2048, 704));
        assert_eq!(mma_stage_row(704), 736);
        assert_eq!(mma_stage_row(480), 480);
        for (rows, k) in [(0, 64), (17, 64), (4, 60)] {
            assert!(mma(rows, 64, k, 4).is_err(), "rows {rows}, k {k}");
        }
        // The grouped product stages all of k, at most 704 at a time.
        let (l, stage) = mma_grouped(1024, 2048, 40).unwrap();
        assert_eq!((l.grid, stage), ((8, 1, 40), 704));
        assert!(l.shared_bytes as usize <= DEFAULT_SHARED_BYTES);
        assert_eq!(mma_grouped(150, 200, 3).unwrap().1, 224);
        assert!(mma_grouped(64, 60, 3).is_err());
    }

    #[test]
    fn mla_absorption_covers_every_row_head_and_column() {
        // DeepSeek-V3: 128 heads, kv_lora_rank 512, v_head_dim 128; a 9-token prompt and a
        // 512-token window.
        let q = mla_absorb_q(9, 128, 512).unwrap();
        assert_eq!((q.grid, q.block), ((2, 128, 1), (BLOCK, 1, 1)));
        assert_eq!(mla_absorb_q(512, 128, 512).unwrap().grid, (2, 128, 32));
        assert_eq!(mla_absorb_q(17, 4, 24).unwrap().grid, (1, 4, 2));
        // A warp per value dim, 8 a block.
        assert_eq!(mla_absorb_v(9, 128, 128).unwrap().grid, (16, 128, 1));
        assert_eq!(mla_absorb_v(26, 4, 10).unwrap().grid, (2, 4, 2));
        assert!(mla_absorb_q(0, 4, 24).is_err() && mla_absorb_v(9, 0, 10).is_err());
        assert!(mla_absorb_q(MLA_ROWS * (MAX_GRID_YZ as usize + 1), 1, 1).is_err());
    }

    #[test]
    fn kernel_list_is_sorted_and_unique() {
        let mut v = KERNELS.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v, KERNELS);
    }

    #[test]
    fn elementwise_covers_every_element() {
        for n in [1u64, 255, 256, 257, 1 << 20, 4096 * 11008, 32000 * 4096] {
            let l = elementwise(n).unwrap();
            assert_eq!(l.block, (BLOCK, 1, 1));
            assert!(l.threads() >= n, "{n}");
            assert!(l.threads() - n < BLOCK as u64, "{n}: one partial block at most");
        }
        assert!(elementwise(0).is_err(), "empty launches are refused, not sent");
        assert!(elementwise(u64::MAX / 2).is_err());
    }

    #[test]
    fn grid_stride_is_capped() {
        assert_eq!(grid_stride(10).unwrap().grid, (1, 1, 1));
        assert_eq!(grid_stride(257).unwrap().grid, (2, 1, 1));
        assert_eq!(grid_stride(6_700_000_000).unwrap().grid, (GRID_STRIDE_BLOCKS as u32, 1, 1));
        assert_eq!(
            grid_stride(0).unwrap().grid,
            (1, 1, 1),
            "a zero-length checksum still launches once"
        );
    }

    #[test]
    fn grouped_launches_put_the_experts_on_their_own_axis() {
        let launch = |grid| Some(Launch { grid, block: (256, 1, 1), shared_bytes: 0 });
        // 45 experts of OLMoE (expert width 1024, hidden 2048), at most 16 rows each: the
        // gemv's blocks only.
        let l = gemm_grouped((1, 16), 1024, 45).unwrap();
        assert_eq!(
            l,
            GroupedLaunches { gemv: launch((1024 / GEMV_COLS as u32, 45, 1)), tiles: None }
        );
        // Prefill: 17 to 200 rows per expert, 16 tiles of columns by 4 of rows; tiles only.
        let l = gemm_grouped((17, 200), 1024, 45).unwrap();
        assert_eq!(l, GroupedLaunches { gemv: None, tiles: launch((64, 45, 1)) });
        // Both kinds of group: both launches, each sized for its own kind.
        let l = gemm_grouped((9, 200), 2048, 45).unwrap();
        assert_eq!(l, GroupedLaunches { gemv: launch((64, 45, 1)), tiles: launch((128, 45, 1)) });
        let l = gemm_grouped((17, 1000), 2048, 64).unwrap();
        assert_eq!(l.tiles.unwrap().grid, (32 * 16, 64, 1));
        let (l, per) = column_stats_grouped(8, 1024, 45).unwrap();
        assert_eq!((l.grid, per), ((4, 1, 45), STATS_ROWS_PER_BLOCK));
        assert!(column_stats_grouped(8, 1024, 0).is_err(), "no experts: nothing to launch");
        assert!(gemm_grouped((1, 8), 1024, MAX_GRID_YZ as usize + 1).is_err());
        assert!(gemm_grouped((20, 30), 1024, MAX_GRID_YZ as usize + 1).is_err());
    }

    #[test]
    fn routing_spreads_long_passes_over_blocks() {
        let block = |threads| Launch { grid: (1, 1, 1), block: (threads, 1, 1), shared_bytes: 0 };
        // Up to 16 tokens: the dispatch's block routes them itself, a warp each.
        assert_eq!(moe_route(1).unwrap(), RouteLaunches { tokens: None, dispatch: block(32) });
        assert_eq!(moe_route(16).unwrap(), RouteLaunches { tokens: None, dispatch: block(512) });
        // More: a warp per token over ceil(tokens / 16) blocks first.
        let l = moe_route(17).unwrap();
        assert_eq!(
            (l.tokens.map(|t| (t.grid, t.block)), l.dispatch),
            (Some(((2, 1, 1), (512, 1, 1))), block(512))
        );
        assert_eq!(moe_route(2048).unwrap().tokens.map(|t| t.grid), Some((128, 1, 1)));
    }

    #[test]
    fn column_stats_groups_rows() {
        let (l, per) = column_stats(7, 11008).unwrap();
        assert_eq!(per, STATS_ROWS_PER_BLOCK);
        assert_eq!(l.grid, (43, 1, 1));
        let (l, per) = column_stats(512, 4096).unwrap();
        assert_eq!((l.grid, per), ((16, 32, 1), 16));
        // Every row belongs to exactly one group.
        for rows in [1usize, 15, 16, 17, 1000, 2_000_000] {
            let (l, per) = column_stats(rows, 64).unwrap();
            assert!(l.grid.1 as usize * per >= rows);
            assert!((l.grid.1 as usize - 1) * per < rows);
            assert!(l.grid.1 as u64 <= MAX_GRID_YZ);
        }
    }

    /// [`attention`]'s plan for `rows` at `pos0`, `heads` of `hd` (each its own KV head), no
    /// window, under `shared` bytes, row blocks and splits allowed or not, splits of at least
    /// 512 keys.
    fn plan(
        rows: usize,
        pos0: usize,
        heads: usize,
        hd: usize,
        shared: usize,
        blocks: bool,
    ) -> AttentionPlan {
        attention_in(rows, pos0, heads, hd, None, shared, blocks).unwrap()
    }

    fn attention_in(
        rows: usize,
        pos0: usize,
        heads: usize,
        head_dim: usize,
        window: Option<usize>,
        shared: usize,
        blocks: bool,
    ) -> Result<AttentionPlan> {
        let s = AttentionShape {
            rows,
            pos0,
            heads,
            kv_heads: heads,
            head_dim,
            window,
            values_are_keys: false,
        };
        let split_keys = ATTENTION_SPLIT_KEYS;
        attention(&s, &AttentionLimits { shared, blocks, split_keys, narrow_rows: true })
    }

    #[test]
    fn attention_shapes() {
        const SHARED: usize = DEFAULT_SHARED_BYTES;
        // Prefill of 7 tokens, 4 heads of 16, without row blocks (the pattern hook): grid
        // (rows, heads), keys up to position 6.
        let p = plan(7, 0, 4, 16, SHARED, false);
        assert_eq!((p.launch.grid, p.kernel, p.split), ((7, 4, 1), "swk_attention", None));
        assert_eq!(p.launch.block, (ATTENTION_BLOCK, 1, 1));
        assert_eq!(p.launch.shared_bytes as usize, (32 + 16 + 7) * 4);
        // Decode at position 511: 512 keys, one block a head.
        let p = plan(1, 511, 32, 128, SHARED, true);
        assert_eq!((p.launch.grid, p.kernel), ((1, 32, 1), "swk_attention"));
        assert_eq!(p.launch.shared_bytes as usize, (32 + 128 + 512) * 4);
        // A sliding window bounds the keys.
        assert_eq!(attention_max_keys(1, 10_000, Some(4096)), 4096);
        assert_eq!(attention_max_keys(3, 2, Some(4096)), 5);
        assert_eq!(attention_max_keys(3, 2, Some(0)), 5, "window 0 means none");
        // Without splits (the pattern hook): the most keys 48 KiB holds at head_dim 128
        // (12 128), one more, and 20 000 (which an H100's 227 KiB opt-in holds): past the
        // limit, the tiled kernel in its fixed memory.
        let fit = SHARED / 4 - 32 - 128;
        let p = plan(1, fit - 1, 32, 128, SHARED, false);
        assert_eq!((p.launch.shared_bytes as usize, p.kernel), (SHARED, "swk_attention"));
        for pos in [fit, 20_000] {
            let p = plan(1, pos, 32, 128, SHARED, false);
            assert_eq!((p.launch.grid, p.kernel), ((1, 32, 1), "swk_attention_tiled"), "{pos}");
            assert_eq!((p.tile, p.split), (ATTENTION_TILE, None));
            assert_eq!(p.launch.shared_bytes as usize, (32 + 128 + ATTENTION_TILE) * 4);
        }
        assert_eq!(plan(1, 20_000, 32, 128, 227 * 1024, false).kernel, "swk_attention");
        // DeepSeek's absorbed latent attention (one head 576 wide) tiles too.
        let p = plan(1, 200_000, 128, 576, SHARED, false);
        assert_eq!(
            (p.launch.shared_bytes as usize, p.kernel),
            ((32 + 576 + 1024) * 4, "swk_attention_tiled")
        );
        // A device holding fewer keys gets smaller tiles, down to one key; below that, or a
        // head past ATTENTION_DIMS per thread, a clear error.
        assert_eq!(plan(9, 0, 4, 16, (32 + 16 + 5) * 4, false).tile, 5);
        assert_eq!(plan(9, 0, 4, 16, (32 + 16 + 1) * 4, false).tile, 1);
        let e = attention_in(9, 0, 4, 16, None, (32 + 16) * 4, false).unwrap_err().to_string();
        assert!(e.contains("at least one key (196 bytes; this device allows 192)"), "{e}");
        let e = attention_in(1, 20_000, 8, 1032, None, SHARED, true).unwrap_err().to_string();
        assert!(e.contains("head dims up to 1024"), "{e}");
        // A prefill with row blocks: ATTENTION_ROWS query rows a block, the largest tile of
        // keys that fits.
        let p = plan(512, 0, 32, 128, SHARED, true);
        assert_eq!((p.launch.grid, p.kernel, p.tile), ((32, 32, 1), "swk_attention_rows", 32));
        assert_eq!(p.launch.shared_bytes as usize, attention_rows_shared_bytes(128, 32, false));
        let rows_bytes = (16 * 129 + 32 * 129 + 32 * 128 + 16 * 32 + 48) * 4;
        assert_eq!(attention_rows_shared_bytes(128, 32, false), rows_bytes);
        // Values that are the keys' rows take no shared memory of their own.
        assert_eq!(attention_rows_shared_bytes(128, 32, true), rows_bytes - 32 * 128 * 4);
        assert!(rows_bytes <= SHARED);
        let p = attention_in(17, 100, 8, 64, Some(4), SHARED, true).unwrap();
        assert_eq!((p.launch.grid, p.kernel), ((2, 8, 1), "swk_attention_rows"));
        // Gemma's 256: tiles of 8 in 48 KiB, 32 with an H200's opt-in.
        assert_eq!(plan(9, 0, 8, 256, SHARED, true).tile, 8);
        assert_eq!(plan(9, 0, 8, 256, 227 * 1024, true).tile, 32);
        // Rows along x (up to 2³¹ - 1 blocks): a pass of 100 000 tokens either way.
        assert_eq!(plan(100_000, 0, 32, 128, SHARED, true).launch.grid, (6250, 32, 1));
        let p = plan(100_000, 0, 32, 128, SHARED, false);
        assert_eq!((p.launch.grid, p.kernel), ((100_000, 32, 1), "swk_attention_tiled"));
        // Decoding past 512 keys splits each row's keys over blocks of at least 512 (at most
        // 64 blocks), then merges: 4096 keys in 8 splits of 512, tiles of 512.
        let p = plan(1, 4095, 32, 128, SHARED, true);
        assert_eq!((p.launch.grid, p.kernel, p.tile), ((1, 32, 8), "swk_attention_split", 512));
        let sp = p.split.unwrap();
        assert_eq!((sp.splits, sp.chunk, sp.merge.grid), (8, 512, (1, 32, 1)));
        let shape = AttentionShape {
            rows: 1,
            pos0: 4095,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            window: None,
            values_are_keys: false,
        };
        assert_eq!(sp.partial_floats(&shape), 32 * 8 * 130);
        // 513 keys: 2 splits of 257; 100 000 keys: 64 splits of 1563 in tiles of 1024.
        let sp = plan(1, 512, 32, 128, SHARED, true).split.unwrap();
        assert_eq!((sp.splits, sp.chunk), (2, 257));
        let p = plan(1, 99_999, 32, 128, SHARED, true);
        assert_eq!((p.split.unwrap().splits, p.split.unwrap().chunk, p.tile), (64, 1563, 1024));
        // Heads 576 wide (as latent attention's rows) take the wide row kernel, split when
        // decoding up to 16 rows (in 48 KiB, tiles of 2 keys with separate values); a window
        // of 4096 keys bounds the split.
        let p = plan(9, 5000, 128, 576, SHARED, true);
        assert_eq!((p.kernel, p.launch.grid), ("swk_attention_rows_wide", (1, 128, 10)));
        assert_eq!(p.tile, 2);
        let p = attention_in(1, 100_000, 32, 128, Some(4096), SHARED, true).unwrap();
        assert_eq!(p.split.unwrap().splits, 8);
        // No split: 512 keys or fewer, more than 16 rows (of a wide head), the pattern hook.
        for (rows, pos0, hd, blocks) in
            [(1, 511, 128, true), (17, 5000, 576, true), (1, 5000, 128, false)]
        {
            let p = plan(rows, pos0, 32, hd, SHARED, blocks);
            assert!(p.split.is_none(), "rows {rows} at {pos0}, head_dim {hd}: {}", p.kernel);
        }
        for (rows, hd, blocks) in [(9, 641, true), (1, 128, true), (9, 128, false)] {
            let k = plan(rows, 0, 8, hd, SHARED, blocks).kernel;
            assert_eq!(k, "swk_attention", "rows {rows}, head_dim {hd}, row blocks {blocks}");
        }
    }

    /// Grouped-query attention: a row-block takes the heads of one KV head (the largest
    /// divisor of their count up to 16) times 16 / group rows, decoding included, and splits
    /// a decode step's keys over blocks as the split kernel does.
    #[test]
    fn attention_groups_heads_of_a_kv_head() {
        for ((heads, kv), group) in
            [((32, 8), 4), ((28, 4), 7), ((64, 8), 8), ((128, 1), 16), ((40, 40), 1), ((48, 2), 12)]
        {
            assert_eq!(attention_group(heads, kv), group, "{heads} heads over {kv}");
        }
        let limits = AttentionLimits {
            shared: DEFAULT_SHARED_BYTES,
            blocks: true,
            split_keys: ATTENTION_SPLIT_KEYS,
            narrow_rows: true,
        };
        let shape = |rows, pos0, heads, kv_heads, head_dim| AttentionShape {
            rows,
            pos0,
            heads,
            kv_heads,
            head_dim,
            window: None,
            values_are_keys: false,
        };
        // Llama-3-8B (32 heads over 8), decoding after 4095 tokens: 4 heads a block, the 4096
        // keys (and up to 3 more for a block's other rows) in 8 splits of 513.
        let p = attention(&shape(1, 4095, 32, 8, 128), &limits).unwrap();
        assert_eq!((p.kernel, p.group, p.launch.grid), ("swk_attention_rows", 4, (1, 8, 8)));
        let sp = p.split.unwrap();
        assert_eq!((sp.splits, sp.chunk, sp.merge.grid), (8, 513, (1, 32, 1)));
        // ... a short decode context: one block a KV head, no split.
        let p = attention(&shape(1, 100, 32, 8, 128), &limits).unwrap();
        assert_eq!((p.kernel, p.launch.grid, p.split), ("swk_attention_rows", (1, 8, 1), None));
        // A 512-token prefill: 4 rows of 4 heads a block.
        let p = attention(&shape(512, 0, 32, 8, 128), &limits).unwrap();
        assert_eq!((p.group, p.launch.grid), (4, (128, 8, 1)));
        // Qwen2-7B's 28 heads over 4: 7 heads times 2 rows.
        let p = attention(&shape(9, 0, 28, 4, 128), &limits).unwrap();
        assert_eq!((p.group, p.launch.grid), (7, (5, 4, 1)));
        // Without row blocks (the pattern hook) a block per row and head.
        let off = AttentionLimits { blocks: false, ..limits };
        assert_eq!(attention(&shape(1, 4095, 32, 8, 128), &off).unwrap().kernel, "swk_attention");
        // DeepSeek-V3's latent rows (128 heads sharing one 576-wide row, which is also the
        // value): 16 heads a block of the wide kernel, each tile read once for keys and
        // values; tiles of 4 keys in 48 KiB, 32 with an H200's opt-in.
        let latent = AttentionShape { values_are_keys: true, ..shape(1, 4095, 128, 1, 576) };
        let p = attention(&latent, &limits).unwrap();
        assert_eq!((p.kernel, p.group, p.tile), ("swk_attention_rows_wide", 16, 4));
        assert_eq!((p.launch.grid, p.split.unwrap().splits), ((1, 8, 8), 8));
        let h200 = AttentionLimits { shared: 227 * 1024, ..limits };
        assert_eq!(attention(&latent, &h200).unwrap().tile, 32);
        // Small heads run the wide kernel when the narrow one is off (tests).
        let wide = AttentionLimits { narrow_rows: false, ..limits };
        let p = attention(&shape(9, 0, 32, 8, 128), &wide).unwrap();
        assert_eq!((p.kernel, p.group), ("swk_attention_rows_wide", 4));
    }

    #[test]
    fn gemm_and_gemv_tiles() {
        assert_eq!(gemm_tiled(7, 4096).unwrap().grid, (64, 1, 1));
        assert_eq!(gemm_tiled(512, 11008).unwrap().grid, (172, 8, 1));
        assert_eq!(gemm_tiled(65, 65).unwrap().grid, (2, 2, 1));
        let l = gemv(1, 32000).unwrap();
        assert_eq!((l.grid, l.block), ((1000, 1, 1), (256, 1, 1)));
        assert_eq!(gemv(16, 33).unwrap().grid, (2, 1, 1));
        assert!(gemv(17, 9).is_err());
    }

    #[test]
    fn widen_chunks_cover_rows() {
        assert_eq!(widen_chunks(10, 4, 8), vec![(0, 2), (2, 2), (4, 2), (6, 2), (8, 2)]);
        assert_eq!(widen_chunks(10, 4, 12), vec![(0, 3), (3, 3), (6, 3), (9, 1)]);
        assert_eq!(
            widen_chunks(3, 100, 10),
            vec![(0, 1), (1, 1), (2, 1)],
            "one row even over the cap"
        );
        assert_eq!(
            widen_chunks(32000, 4096, 1 << 25),
            vec![(0, 8192), (8192, 8192), (16384, 8192), (24576, 7424)]
        );
        assert!(widen_chunks(0, 4, 8).is_empty());
    }

    #[test]
    fn int_args_are_checked() {
        assert_eq!(int(4096, "n").unwrap(), 4096);
        assert!(int(1 << 31, "n").unwrap_err().to_string().contains("n = 2147483648"));
    }

    #[test]
    fn spike_keys_round_trip() {
        for (v, pos) in [
            (1.5f32, 0u32),
            (-1350.0, 3),
            (f32::INFINITY, 7),
            (-f32::MIN_POSITIVE, u32::MAX - 1),
            (1e-45, 12),
        ] {
            let m = decode_spike_key(spike_key(v, pos)).unwrap();
            assert_eq!(m.value.to_bits(), v.to_bits());
            assert_eq!(m.abs, v.abs());
            assert_eq!(m.position, pos as usize);
        }
        assert_eq!(spike_key(0.0, 3), 0);
        assert_eq!(spike_key(-0.0, 3), 0);
        assert_eq!(spike_key(f32::NAN, 3), 0);
        assert!(decode_spike_key(0).is_none());
        // Order: |v| first, then the earliest position.
        assert!(spike_key(-2.0, 9) > spike_key(1.9, 0));
        assert!(spike_key(2.0, 1) > spike_key(-2.0, 2));
        assert!(spike_key(-2.0, 1) > spike_key(2.0, 2));
    }

    /// The device's reduction (max of keys within a launch, in any order, then the host merge)
    /// equals the CPU's fold (`|v| > current` replaces) on data full of ties.
    #[test]
    fn spike_reduction_matches_cpu_rule() {
        let mut rng = crate::synth::SplitMix64::new(7);
        for trial in 0..200 {
            let (rows, cols) = (1 + rng.below(40), 1 + rng.below(6));
            let pos0 = rng.below(5);
            // Few distinct magnitudes so that ties are common; random signs; some zeros/NaNs.
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| match rng.below(12) {
                    0 => 0.0,
                    1 => f32::NAN,
                    k => (k as f32 / 2.0).floor() * if rng.below(2) == 0 { 1.0 } else { -1.0 },
                })
                .collect();
            let mut cpu = vec![ChannelMax::default(); cols];
            for r in 0..rows {
                for c in 0..cols {
                    let v = data[r * cols + c];
                    if v.abs() > cpu[c].abs {
                        cpu[c] = ChannelMax { value: v, abs: v.abs(), position: pos0 + r };
                    }
                }
            }
            // Device: rows split into groups, each group's max key, atomicMax in a shuffled order.
            let mut keys = vec![0u64; cols];
            let mut groups: Vec<usize> = (0..rows.div_ceil(3)).collect();
            rng.shuffle(&mut groups);
            for g in groups {
                for c in 0..cols {
                    let best = (g * 3..rows.min(g * 3 + 3))
                        .map(|r| spike_key(data[r * cols + c], (pos0 + r) as u32))
                        .max()
                        .unwrap();
                    keys[c] = keys[c].max(best);
                }
            }
            let mut dev = vec![ChannelMax::default(); cols];
            merge_spike_keys(&mut dev, &keys);
            for c in 0..cols {
                assert_eq!(dev[c].position, cpu[c].position, "trial {trial} col {c}");
                assert_eq!(dev[c].value.to_bits(), cpu[c].value.to_bits(), "trial {trial} col {c}");
                assert_eq!(dev[c].abs, cpu[c].abs);
            }
        }
    }

    #[test]
    fn merge_keeps_earlier_calls_on_ties() {
        let mut s = vec![ChannelMax { value: -3.0, abs: 3.0, position: 1 }, ChannelMax::default()];
        merge_spike_keys(&mut s, &[spike_key(3.0, 9), spike_key(-0.5, 4)]);
        assert_eq!(s[0], ChannelMax { value: -3.0, abs: 3.0, position: 1 });
        assert_eq!(s[1], ChannelMax { value: -0.5, abs: 0.5, position: 4 });
        merge_spike_keys(&mut s, &[spike_key(3.5, 9), 0]);
        assert_eq!(s[0].position, 9);
        assert_eq!(s[1].position, 4);
    }
}
