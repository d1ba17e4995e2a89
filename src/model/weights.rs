//! Named f32 tensors in Hugging Face naming and layout, owned by the model.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape, slowest dimension first (HF layout: `[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Elements in row-major order.
    pub data: Vec<f32>,
    /// The dtype the tensor was stored in on disk (e.g. `BF16`, `Q4_1`).
    pub source_dtype: String,
}

impl Tensor {
    /// A tensor from its parts; errors when `data` does not fill `shape`.
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>, source_dtype: &str) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::tensor(
                name,
                format!("shape {shape:?} needs {n} elements, got {}", data.len()),
            ));
        }
        Ok(Tensor { shape, data, source_dtype: source_dtype.to_string() })
    }
    /// Rows and columns of a 2-D tensor.
    pub fn dims2(&self) -> Option<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Some((r, c)),
            _ => None,
        }
    }
    /// Flat index of `(row, col)` in a 2-D tensor, checked.
    pub fn index2(&self, row: usize, col: usize) -> Option<usize> {
        let (r, c) = self.dims2()?;
        (row < r && col < c).then_some(row * c + col)
    }
}

/// All weights of a model by Hugging Face name (`model.layers.3.mlp.down_proj.weight`).
#[derive(Debug, Default, Clone)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    /// Add or replace a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }
    /// Remove a tensor.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }
    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// A tensor by name, or an error naming it.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::tensor(name, "not found in the model"))
    }
    /// A tensor by name, mutably.
    pub fn get_mut(&mut self, name: &str) -> Result<&mut Tensor> {
        self.tensors.get_mut(name).ok_or_else(|| Error::tensor(name, "not found in the model"))
    }
    /// A tensor that must have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::tensor(
                name,
                format!("expected shape {shape:?}, found {:?}", t.shape),
            ));
        }
        Ok(t)
    }
    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    /// (name, tensor) pairs in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Total number of elements.
    pub fn n_elements(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }
    /// A 64-bit checksum over every tensor's name and exact bits, in name order (FNV-1a over
    /// 64-bit words, chunked so it runs in parallel; the value does not depend on the thread
    /// count). Equal checksums before and after an edit session prove bit-exact restoration.
    pub fn checksum(&self) -> u64 {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let per: Vec<u64> = self
            .tensors
            .iter()
            .flat_map(|(name, t)| {
                let head = fnv1a(FNV_OFFSET, name.as_bytes());
                std::iter::once(head).chain(
                    t.data
                        .par_chunks(CHUNK)
                        .map(|c| {
                            let words = c.chunks(2).map(|p| {
                                let hi = p.get(1).map_or(0, |v| v.to_bits() as u64);
                                (hi << 32) | p[0].to_bits() as u64
                            });
                            words.fold(FNV_OFFSET, |h, w| (h ^ w).wrapping_mul(FNV_PRIME))
                        })
                        .collect::<Vec<u64>>(),
                )
            })
            .collect();
        per.iter().fold(FNV_OFFSET, |h, x| fnv1a(h, &x.to_le_bytes()))
    }
}

const FNV_PRIME: u64 = 0x0100_0000_01b3;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over bytes, continuing from `h`.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}
