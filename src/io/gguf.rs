//! GGUF files (v2 and v3): header, typed metadata, tensor infos, memory-mapped tensor data.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/values, the tensor infos (name, dims fastest-first, type, offset), then the tensor data
//! aligned to `general.alignment` (default 32). All little-endian.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::io::quant::{dequantize, GgmlType};
use crate::{Error, Result};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// Array of values of one type
    Array(Vec<GgufValue>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float, when it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// llama.cpp tensor name (e.g. `blk.0.ffn_down.weight`).
    pub name: String,
    /// Dimensions, fastest-varying first (ne0, ne1, ...).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Shape in row-major order (slowest first), as PyTorch/safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    data_start: usize,
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

const MAX_STRING: u64 = 1 << 30;
const MAX_ARRAY: u64 = 1 << 32;
const MAX_DIMS: u32 = 8;

impl<'a> Reader<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("GGUF at byte {}: {msg}", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated file: needs {n} more bytes, {} left",
                self.buf.len() - self.pos
            ))),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(self.err(format!("string length {n} is implausible")));
        }
        let s = self.take(n as usize)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let elem_ty = self.u32()?;
                let n = self.u64()?;
                if n > MAX_ARRAY || n as usize > self.buf.len() - self.pos {
                    return Err(self.err(format!("array length {n} exceeds the file")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Open and validate a GGUF file: header, metadata, tensor infos and that every tensor's
    /// data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; swk never writes model files. A concurrent
        // writer truncating it under us is outside what any mmap-based loader can guard.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut r = Reader { buf: &mmap, pos: 0, path };
        if r.take(4).map_err(|_| Error::format(path, "not a GGUF file: too short"))? != b"GGUF" {
            return Err(Error::format(path, "not a GGUF file: bad magic"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2, 3)"),
            ));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(Error::format(
                path,
                format!("implausible counts: {n_tensors} tensors, {n_kv} metadata keys"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.err(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ty_id = r.u32()?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                Error::format(path, format!("tensor `{name}` has unknown GGML type id {ty_id}"))
            })?;
            let offset = r.u64()?;
            tensors.push(GgufTensorInfo { name, dims, ty, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v.as_u64().filter(|a| *a > 0 && a.is_power_of_two()).ok_or_else(|| {
                Error::format(path, format!("general.alignment {v:?} is not a power of two"))
            })?,
        } as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let this =
            GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors, data_start };
        // As llama.cpp requires: the tensors lie in table order, each at the end of the one
        // before, rounded up to the alignment. A changed type, dimension or offset breaks
        // the chain instead of silently reading another tensor's bytes.
        let mut end = 0u64;
        for t in &this.tensors {
            let len = this.tensor_bytes(t)?.len() as u64;
            if t.offset != end {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}` starts at data offset {}, but the tensors before it end at {} \
                         (GGUF packs them in order, each aligned to {alignment} bytes): corrupt",
                        t.name, t.offset, end
                    ),
                ));
            }
            end = (t.offset + len).div_ceil(alignment as u64) * alignment as u64;
        }
        Ok(this)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the tensor data starts: the end of the metadata and tensor table, aligned.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer metadata value.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| Error::config(&self.path, format!("missing metadata key `{key}`")))?
            .as_u64()
            .ok_or_else(|| Error::config(&self.path, format!("`{key}` is not an unsigned integer")))
    }

    /// An optional float metadata value (error if present with a non-numeric type).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(&self.path, format!("`{key}` is not a number"))),
        }
    }

    /// An optional string metadata value.
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// A tensor info by llama.cpp name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, checked against the file's size.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8]> {
        let n = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let len = n
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| t.ty.bytes_for(n))
            .ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!(
                        "tensor `{}`: {} elements do not fit {} blocks of {}",
                        t.name,
                        t.n_elements(),
                        t.ty.name(),
                        t.ty.block_size()
                    ),
                )
            })?;
        let start = usize::try_from(t.offset).ok().and_then(|o| o.checked_add(self.data_start));
        let range = start.and_then(|s| s.checked_add(len).map(|e| s..e));
        match range {
            Some(r) if r.end <= self.mmap.len() => Ok(&self.mmap[r]),
            _ => Err(Error::format(
                &self.path,
                format!(
                    "tensor `{}` ({} bytes at offset {}) runs past the end of the file ({} bytes): truncated or corrupt",
                    t.name,
                    len,
                    t.offset,
                    self.mmap.len()
                ),
            )),
        }
    }

    /// Dequantize a tensor to f32 (row-major, shape = [`GgufTensorInfo::shape`]).
    pub fn dequantize(&self, t: &GgufTensorInfo) -> Result<Vec<f32>> {
        self.dequantize_part(t, 0, 1)
    }

    /// Dequantize part `part` of `parts` equal, contiguous parts of a tensor (elements
    /// `part·n/parts .. (part+1)·n/parts`): one expert of a stacked `ffn_*_exps` tensor
    /// without the others. Errors when the parts do not split into whole blocks.
    pub fn dequantize_part(
        &self,
        t: &GgufTensorInfo,
        part: usize,
        parts: usize,
    ) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(t)?;
        if !t.ty.can_dequantize() {
            return Err(Error::format(
                &self.path,
                format!("tensor `{}`: GGML type {} cannot be dequantized yet", t.name, t.ty.name()),
            ));
        }
        let n = t.n_elements() as usize;
        let per = n.checked_div(parts).filter(|p| p * parts == n);
        let width = per.and_then(|p| t.ty.bytes_for(p));
        let src = width
            .and_then(|w| bytes.get(part.checked_mul(w)?..part.checked_add(1)?.checked_mul(w)?));
        let (Some(per), Some(src)) = (per, src) else {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{}`: {n} elements do not split into {parts} parts of whole {} blocks \
                     (part {part} asked)",
                    t.name,
                    t.ty.name()
                ),
            ));
        };
        let mut out = vec![0f32; per];
        dequantize(t.ty, src, &mut out)
            .map_err(|e| Error::format(&self.path, format!("tensor `{}`: {e}", t.name)))?;
        Ok(out)
    }
}
