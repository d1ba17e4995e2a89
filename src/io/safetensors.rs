//! Hugging Face safetensors checkpoints: single file or sharded with an index, memory-mapped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::model::weights::{Tensor, Weights};
use crate::{Error, Result};

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::format(
            dir,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Json { path: index.clone(), source: e })?;
    let map = j
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(&index, "missing `weight_map` object"))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
            .ok_or_else(|| Error::format(&index, format!("bad shard file name for `{tensor}`")))?;
        files.insert(f.to_string());
    }
    let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.is_file() {
            return Err(Error::format(&index, format!("shard {} is missing", p.display())));
        }
    }
    Ok(paths)
}

/// Load every tensor of the given safetensors files into `weights`, converted once to f32
/// (FP8 weights dequantized with blocks of `fp8_block`, see [`MappedCheckpoint::read`]).
pub fn load_into(
    files: &[PathBuf],
    fp8_block: Option<[usize; 2]>,
    weights: &mut Weights,
) -> Result<()> {
    let ckpt = MappedCheckpoint::open(files)?.with_fp8_block(fp8_block);
    for name in ckpt.names() {
        weights.insert(name.to_string(), ckpt.read(name)?);
    }
    Ok(())
}

/// The `[rows, cols]` block of an FP8 checkpoint's weight scales: `config.json`'s
/// `quantization_config.weight_block_size` when its `quant_method` is `fp8` (DeepSeek-V3,
/// Qwen3's `-FP8` models: `[128, 128]`); None otherwise. Errors name the file.
pub fn fp8_block_size(config: &Path) -> Result<Option<[usize; 2]>> {
    let text = std::fs::read_to_string(config).map_err(|e| Error::io(config, e))?;
    let j: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Json { path: config.to_path_buf(), source: e })?;
    let Some(q) = j.get("quantization_config") else { return Ok(None) };
    if q.get("quant_method").and_then(|m| m.as_str()) != Some("fp8") {
        return Ok(None);
    }
    match q.get("weight_block_size") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(b) => {
            let dims: Option<Vec<usize>> = b.as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .filter_map(|v| usize::try_from(v).ok())
                    .collect()
            });
            match dims.as_deref() {
                Some(&[r, c]) if r > 0 && c > 0 && b.as_array().is_some_and(|a| a.len() == 2) => {
                    Ok(Some([r, c]))
                }
                _ => Err(Error::format(
                    config,
                    format!("quantization_config.weight_block_size must be two positive integers, found {b}"),
                )),
            }
        }
    }
}

/// Where one tensor's bytes lie in a [`MappedCheckpoint`].
#[derive(Debug)]
struct Located {
    file: usize,
    start: usize,
    end: usize,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// One tensor's bytes as a safetensors file stores them (little-endian), borrowed from the
/// file's map.
#[derive(Debug, Clone, Copy)]
pub struct StoredTensor<'a> {
    /// The stored dtype's name as safetensors spells it (`F32`, `F16`, `BF16`, `F64`), the
    /// `source_dtype` of what [`MappedCheckpoint::read`] gives; `other` for the rest.
    pub dtype: &'static str,
    /// The HF shape.
    pub shape: &'a [usize],
    /// The data: the shape's product times the dtype's width.
    pub bytes: &'a [u8],
}

/// An FP8 (E4M3) weight as stored, with its block scales: `w[r, c] = e4m3(q[r · cols + c]) ·
/// scales[(r / block[0]) · ⌈cols / block[1]⌉ + c / block[1]]`.
#[derive(Debug)]
pub struct Fp8Tensor<'a> {
    /// The E4M3 bytes, row-major.
    pub q: &'a [u8],
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
    /// One f32 scale per block, row-major.
    pub scales: Vec<f32>,
    /// The block: `[rows, columns]`.
    pub block: [usize; 2],
}

/// A safetensors checkpoint (one file or shards), memory-mapped, whose tensors are converted
/// to f32 one at a time, on demand. Opening validates every header (offsets inside the file,
/// sizes matching shapes) without reading any tensor data.
#[derive(Debug)]
pub struct MappedCheckpoint {
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, Located>,
    /// The block of FP8 weights' scales ([`fp8_block_size`]).
    fp8_block: Option<[usize; 2]>,
}

impl MappedCheckpoint {
    /// Map `files` and index their tensors. Integer and bool buffers (causal masks of
    /// GPT-2/NeoX checkpoints) are skipped; a weight missing because of this fails validation
    /// by name. Errors name the file: invalid header, a tensor in two shards.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut mapped = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: read-only map of a file swk never writes.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
                    && is_buffer(&name)
                {
                    continue;
                }
                let (a, b) = info.data_offsets;
                let located = Located {
                    file: fi,
                    start: data_start + a,
                    end: data_start + b,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                if tensors.insert(name.clone(), located).is_some() {
                    return Err(Error::format(
                        path,
                        format!("tensor `{name}` is also in another shard"),
                    ));
                }
            }
            mapped.push((path.clone(), mmap));
        }
        Ok(MappedCheckpoint { files: mapped, tensors, fp8_block: None })
    }

    /// Dequantize FP8 weights with scales per block of `block` (`[rows, cols]`; see
    /// [`fp8_block_size`]).
    pub fn with_fp8_block(mut self, block: Option<[usize; 2]>) -> Self {
        self.fp8_block = block;
        self
    }

    /// Tensor names, sorted; an FP8 weight's scales (`{weight}_scale_inv`) are part of the
    /// weight, not a tensor of their own.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str).filter(|n| !self.is_fp8_scale(n))
    }

    /// Whether `name` holds the scales of an FP8 weight.
    fn is_fp8_scale(&self, name: &str) -> bool {
        name.strip_suffix("_scale_inv")
            .and_then(|w| self.tensors.get(w))
            .is_some_and(|t| t.dtype == Dtype::F8_E4M3)
    }

    /// A tensor's shape, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// A tensor's stored dtype (`BF16`, `F32`, ...), if the checkpoint has it.
    pub fn dtype_name(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|t| format!("{:?}", t.dtype))
    }

    /// Read one tensor, converted to f32. An FP8 (E4M3) weight is dequantized with its
    /// scales `{name}_scale_inv` (`[⌈rows/br⌉, ⌈cols/bc⌉]`, f32 or bf16, one per block of
    /// [`Self::with_fp8_block`]'s `[br, bc]`): `w[r, c] = fp8(q[r, c]) · s[r / br, c / bc]`, as
    /// DeepSeek-V3's `weight_dequant`. Errors name the file and tensor.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let (t, path, bytes) = self.locate(name)?;
        if t.dtype == Dtype::F8_E4M3 {
            let data = self
                .read_fp8(name, &t.shape, bytes)
                .map_err(|msg| Error::format(path, format!("tensor `{name}`: {msg}")))?;
            return Tensor::new(name, t.shape.clone(), data, "F8_E4M3");
        }
        let data = to_f32(t.dtype, bytes)
            .map_err(|msg| Error::format(path, format!("tensor `{name}`: {msg}")))?;
        Tensor::new(name, t.shape.clone(), data, &format!("{:?}", t.dtype))
    }

    /// Tensor `name`'s bytes as stored, without conversion (for copying a checkpoint's own
    /// weights as they are). Errors as [`Self::read`].
    pub fn stored(&self, name: &str) -> Result<StoredTensor<'_>> {
        let (t, _, bytes) = self.locate(name)?;
        Ok(StoredTensor { dtype: stored_name(t.dtype), shape: &t.shape, bytes })
    }

    /// `len` elements of tensor `name` from element `offset` on, as stored (a tensor that
    /// loading renames, or one expert of a fused stack): the dtype's name as in
    /// [`StoredTensor::dtype`] and the bytes. Errors as [`Self::read`], and for a range past
    /// the tensor's end or a dtype narrower than a byte.
    pub fn stored_part(
        &self,
        name: &str,
        offset: usize,
        len: usize,
    ) -> Result<(&'static str, &[u8])> {
        let (t, path, bytes) = self.locate(name)?;
        let width = Some(t.dtype.bitsize()).filter(|b| b % 8 == 0).map(|b| b / 8);
        let range = width
            .and_then(|w| Some(offset.checked_mul(w)?..offset.checked_add(len)?.checked_mul(w)?));
        let part = range.and_then(|r| bytes.get(r)).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor `{name}` ({:?} {:?}) has no whole elements {offset}..{}",
                    t.dtype,
                    t.shape,
                    offset.saturating_add(len)
                ),
            )
        })?;
        Ok((stored_name(t.dtype), part))
    }

    /// [`Self::stored_part`] converted to f32, as tensor `as_name` of shape `shape`.
    pub fn read_part(
        &self,
        name: &str,
        offset: usize,
        shape: &[usize],
        as_name: &str,
    ) -> Result<Tensor> {
        let (_, bytes) = self.stored_part(name, offset, shape.iter().product())?;
        let (t, path, _) = self.locate(name)?;
        let data = to_f32(t.dtype, bytes)
            .map_err(|msg| Error::format(path, format!("tensor `{name}`: {msg}")))?;
        Tensor::new(as_name, shape.to_vec(), data, &format!("{:?}", t.dtype))
    }

    /// FP8 weight `name` (`shape`, its bytes `q`) times its block scales, as f32.
    fn read_fp8(
        &self,
        name: &str,
        shape: &[usize],
        q: &[u8],
    ) -> std::result::Result<Vec<f32>, String> {
        let f = self.fp8_parts(name, shape, q)?;
        Ok(crate::io::quant::dequantize_fp8_blocks(q, (f.rows, f.cols), &f.scales, f.block))
    }

    /// Tensor `name` as its FP8 bytes and block scales, when it is stored as `F8_E4M3`
    /// (None for other dtypes), for converting it without the f32 matrix (streaming stages it
    /// so). Errors as [`Self::read`].
    pub fn fp8(&self, name: &str) -> Result<Option<Fp8Tensor<'_>>> {
        let (t, path, q) = self.locate(name)?;
        if t.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        self.fp8_parts(name, &t.shape, q)
            .map(Some)
            .map_err(|msg| Error::format(path, format!("tensor `{name}`: {msg}")))
    }

    /// The scales and block of FP8 weight `name` (`shape`, bytes `q`), checked.
    fn fp8_parts<'a>(
        &self,
        name: &str,
        shape: &[usize],
        q: &'a [u8],
    ) -> std::result::Result<Fp8Tensor<'a>, String> {
        let scales = format!("{name}_scale_inv");
        let Ok((st, _, sb)) = self.locate(&scales) else {
            return Err(format!(
                "an F8_E4M3 weight needs its scales `{scales}`, which the checkpoint lacks"
            ));
        };
        let [br, bc] = self
            .fp8_block
            .ok_or("an F8_E4M3 weight needs config.json's quantization_config.weight_block_size")?;
        let &[rows, cols] = shape else {
            return Err(format!("an F8_E4M3 weight must be a matrix, found shape {shape:?}"));
        };
        let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
        if st.shape != [sr, sc] {
            return Err(format!(
                "`{scales}` has shape {:?}; blocks of {br}×{bc} over {rows}×{cols} need [{sr}, {sc}]",
                st.shape
            ));
        }
        let s = to_f32(st.dtype, sb).map_err(|m| format!("`{scales}`: {m}"))?;
        Ok(Fp8Tensor { q, rows, cols, scales: s, block: [br, bc] })
    }

    /// A tensor's entry, file and bytes in the map.
    fn locate(&self, name: &str) -> Result<(&Located, &Path, &[u8])> {
        let t =
            self.tensors.get(name).ok_or_else(|| Error::tensor(name, "not in the checkpoint"))?;
        let (path, mmap) = &self.files[t.file];
        let bytes = mmap
            .get(t.start..t.end)
            .ok_or_else(|| Error::format(path, format!("tensor `{name}` lies outside the file")))?;
        Ok((t, path, bytes))
    }
}

/// A dtype's name as [`StoredTensor::dtype`] gives it.
fn stored_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::F64 => "F64",
        _ => "other",
    }
}

/// Whether a tensor name is a known non-weight buffer (attention masks).
fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("attention.bias")
        || name.ends_with("attention.masked_bias")
}

/// Convert little-endian f32/f16/bf16 bytes to f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    use rayon::prelude::*;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    };
    if bytes.len() % width != 0 {
        return Err(format!("{} bytes is not a whole number of {dtype:?} values", bytes.len()));
    }
    let mut out = vec![0f32; bytes.len() / width];
    let chunk = 1 << 16;
    out.par_chunks_mut(chunk).zip(bytes.par_chunks(chunk * width)).for_each(|(o, b)| {
        for (x, v) in o.iter_mut().zip(b.chunks_exact(width)) {
            *x = match dtype {
                Dtype::F32 => f32::from_le_bytes([v[0], v[1], v[2], v[3]]),
                Dtype::F16 => half::f16::from_le_bytes([v[0], v[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([v[0], v[1]]).to_f32(),
            };
        }
    });
    Ok(out)
}
