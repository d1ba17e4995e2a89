//! In-place weight edits (zero, scale, set) with a restore log.
//!
//! Every edit goes through an [`EditGuard`], which records the original bits before writing
//! and writes them back when it is dropped: on success, on error and on panic (drop runs while
//! unwinding). Nested guards restore in reverse order. [`Weights::checksum`] proves
//! bit-exact restoration.
//!
//! ```
//! # use swk::edit::{EditGuard, WeightEdit, EditOp};
//! # use swk::model::{Tensor, Weights};
//! let mut w = Weights::new();
//! w.insert("t", Tensor::new("t", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0], "F32").unwrap());
//! let before = w.checksum();
//! {
//!     let mut g = EditGuard::new(&mut w);
//!     g.apply(&WeightEdit::new("t", &[1, 0], EditOp::Zero)).unwrap();
//!     assert_eq!(g.get("t").unwrap().data[2], 0.0);
//! }
//! assert_eq!(w.checksum(), before);
//! ```
//!
//! [`Weights::checksum`]: crate::model::Weights::checksum

use std::fmt;
use std::ops::Deref;

use serde::Serialize;

use crate::model::{Model, Weights};
use crate::{Error, Result};

/// What an edit does to one element.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "op", content = "arg", rename_all = "lowercase")]
pub enum EditOp {
    /// Set to 0.
    Zero,
    /// Multiply by a factor.
    Scale(f32),
    /// Set to a value.
    Set(f32),
}

impl EditOp {
    /// The new value of an element currently `old`.
    pub fn apply(self, old: f32) -> f32 {
        match self {
            EditOp::Zero => 0.0,
            EditOp::Scale(f) => old * f,
            EditOp::Set(v) => v,
        }
    }
}

/// One edit: a tensor (HF name), an index into it, an operation. An element edit names one
/// element; a block edit (`block`) names an index prefix and covers every element under it:
/// `T[r,*]` is row `r` of a matrix, `T[*]` the whole tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightEdit {
    /// Hugging Face tensor name.
    pub tensor: String,
    /// Index, one entry per dimension (`[row, col]` for matrices); a block edit's prefix.
    pub index: Vec<usize>,
    /// Whether this is a block edit (every element under the `index` prefix).
    #[serde(skip_serializing_if = "is_false")]
    pub block: bool,
    /// The operation.
    pub op: EditOp,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl fmt::Display for WeightEdit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut idx: Vec<String> = self.index.iter().map(|i| i.to_string()).collect();
        if self.block {
            idx.push("*".into());
        }
        let op = match self.op {
            EditOp::Zero => "zero".to_string(),
            EditOp::Scale(x) => format!("x{x}"),
            EditOp::Set(v) => format!("{v}"),
        };
        write!(f, "{}[{}]={op}", self.tensor, idx.join(","))
    }
}

impl WeightEdit {
    /// An edit of `tensor[index]`.
    pub fn new(tensor: impl Into<String>, index: &[usize], op: EditOp) -> Self {
        WeightEdit { tensor: tensor.into(), index: index.to_vec(), block: false, op }
    }

    /// A block edit of every element of `tensor` under the index `prefix`: `&[]` is the whole
    /// tensor, `&[r]` row `r` of a matrix. Logged and restored as one record holding the
    /// block's original bits (4 bytes an element), not one record per element.
    pub fn block(tensor: impl Into<String>, prefix: &[usize], op: EditOp) -> Self {
        WeightEdit { tensor: tensor.into(), index: prefix.to_vec(), block: true, op }
    }

    /// An edit of `model.layers.{layer}.mlp.down_proj.weight[row, col]`.
    pub fn down_proj(layer: usize, row: usize, col: usize, op: EditOp) -> Self {
        Self::new(Model::down_proj_name(layer), &[row, col], op)
    }

    /// Parse a CLI spec: `zero:L,R,C`, `scale:L,R,C,F`, `set:L,R,C,V` (on layer L's
    /// down_proj), or `TENSOR[i,j,...]=zero|xF|V` for any tensor; trailing `*`s make a block
    /// edit (`TENSOR[r,*]`, `TENSOR[*]`).
    pub fn parse(spec: &str) -> Result<Self> {
        let err = |msg: &str| Error::Edit { spec: spec.to_string(), msg: msg.to_string() };
        let num_usize =
            |s: &str| s.trim().parse::<usize>().map_err(|_| err(&format!("`{s}` is not an index")));
        let num_f32 = |s: &str| {
            s.trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(&format!("`{s}` is not a finite number")))
        };
        if let Some((op, args)) = spec.split_once(':') {
            if !spec.contains('[') {
                let parts: Vec<&str> = args.split(',').collect();
                let (want, op) = match op {
                    "zero" => (3, None),
                    "scale" => (4, Some("scale")),
                    "set" => (4, Some("set")),
                    _ => return Err(err("operation must be zero, scale or set")),
                };
                if parts.len() != want {
                    return Err(err(&format!("expected {want} comma-separated numbers after `:`")));
                }
                let (l, r, c) = (num_usize(parts[0])?, num_usize(parts[1])?, num_usize(parts[2])?);
                let op = match op {
                    None => EditOp::Zero,
                    Some("scale") => EditOp::Scale(num_f32(parts[3])?),
                    _ => EditOp::Set(num_f32(parts[3])?),
                };
                return Ok(Self::down_proj(l, r, c, op));
            }
        }
        let (lhs, rhs) = spec.rsplit_once('=').ok_or_else(|| {
            err("expected zero:L,R,C, scale:L,R,C,F, set:L,R,C,V or TENSOR[R,C]=zero|xF|V")
        })?;
        let (name, idx) = lhs.split_once('[').ok_or_else(|| err("missing `[index]`"))?;
        let idx = idx.strip_suffix(']').ok_or_else(|| err("missing `]`"))?;
        let mut parts: Vec<&str> = idx.split(',').map(str::trim).collect();
        let stars = parts.iter().rev().take_while(|p| **p == "*").count();
        parts.truncate(parts.len() - stars);
        if parts.contains(&"*") {
            return Err(err("`*` may only end the index (a block: `T[r,*]`, `T[*]`)"));
        }
        let index = parts.into_iter().map(num_usize).collect::<Result<Vec<_>>>()?;
        if name.is_empty() {
            return Err(err("missing tensor name"));
        }
        let rhs = rhs.trim();
        let op = if rhs == "zero" {
            EditOp::Zero
        } else if let Some(f) = rhs.strip_prefix('x') {
            EditOp::Scale(num_f32(f)?)
        } else {
            EditOp::Set(num_f32(rhs)?)
        };
        if stars > 0 {
            return Ok(Self::block(name, &index, op));
        }
        Ok(Self::new(name, &index, op))
    }

    /// Flat offset of the index in a tensor of `shape`, checked (element edits only).
    pub fn flat_index(&self, shape: &[usize]) -> Result<usize> {
        if self.block {
            return Err(Error::Edit {
                spec: self.to_string(),
                msg: "a block edit covers many elements, not one".into(),
            });
        }
        Ok(self.span(shape)?.0)
    }

    /// The elements the edit covers in a tensor of `shape`, checked: `(first flat offset,
    /// count)`; a count of 1 for an element edit.
    pub fn span(&self, shape: &[usize]) -> Result<(usize, usize)> {
        let dims_ok = if self.block {
            self.index.len() <= shape.len()
        } else {
            self.index.len() == shape.len()
        };
        if !dims_ok {
            return Err(Error::Edit {
                spec: self.to_string(),
                msg: format!(
                    "index has {} dimensions, tensor shape is {shape:?}",
                    self.index.len()
                ),
            });
        }
        let mut flat = 0;
        for (&i, &d) in self.index.iter().zip(shape) {
            if i >= d {
                return Err(Error::Edit {
                    spec: self.to_string(),
                    msg: format!("index {:?} out of range for shape {shape:?}", self.index),
                });
            }
            flat = flat * d + i;
        }
        let inner: usize = shape[self.index.len()..].iter().product();
        if inner == 0 {
            return Err(Error::Edit {
                spec: self.to_string(),
                msg: format!("the block covers no elements (shape {shape:?})"),
            });
        }
        Ok((flat * inner, inner))
    }
}

/// One applied edit as the restore log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct EditRecord {
    /// The edit.
    pub edit: WeightEdit,
    /// Flat element offset (a block edit's first element).
    pub flat: usize,
    /// Value before the edit.
    pub original: f32,
    /// Value written.
    pub new: f32,
    /// Exact bits before the edit (restored verbatim).
    pub original_bits: u32,
    /// Elements covered: 1, or a block edit's count (elements `flat..flat + len`; `original`,
    /// `new` and `original_bits` are then the first element's).
    pub len: usize,
    /// A block edit's original bits, element by element (restored verbatim); empty for an
    /// element edit. Not in the JSON log.
    #[serde(skip)]
    pub block_bits: Vec<u32>,
    /// Whether it has been restored.
    pub restored: bool,
}

/// Storage that edits can read and write element by element (host or device memory).
pub trait EditTarget {
    /// Shape of a tensor.
    fn shape_of(&self, tensor: &str) -> Result<Vec<usize>>;
    /// Read one element's bits.
    fn read_bits(&self, tensor: &str, flat: usize) -> Result<u32>;
    /// Write one element's bits.
    fn write_bits(&mut self, tensor: &str, flat: usize, bits: u32) -> Result<()>;
    /// Read the bits of several elements of one tensor. The default reads them one by one;
    /// a device backend moves the whole batch in one transfer.
    fn read_many(&self, tensor: &str, flats: &[usize]) -> Result<Vec<u32>> {
        flats.iter().map(|&f| self.read_bits(tensor, f)).collect()
    }
    /// Write `bits[i]` to element `flats[i]` of one tensor; the flats are distinct. The
    /// default writes them one by one.
    fn write_many(&mut self, tensor: &str, flats: &[usize], bits: &[u32]) -> Result<()> {
        if flats.len() != bits.len() {
            return Err(Error::tensor(tensor, "write_many: flats and bits differ in length"));
        }
        flats.iter().zip(bits).try_for_each(|(&f, &b)| self.write_bits(tensor, f, b))
    }
    /// Read `len` consecutive elements' bits from flat offset `start` (a block edit). The
    /// default goes through [`EditTarget::read_many`].
    fn read_range(&self, tensor: &str, start: usize, len: usize) -> Result<Vec<u32>> {
        let flats: Vec<usize> = (start..start + len).collect();
        self.read_many(tensor, &flats)
    }
    /// Write `bits` to consecutive elements from flat offset `start`. The default goes
    /// through [`EditTarget::write_many`].
    fn write_range(&mut self, tensor: &str, start: usize, bits: &[u32]) -> Result<()> {
        let flats: Vec<usize> = (start..start + bits.len()).collect();
        self.write_many(tensor, &flats, bits)
    }
}

/// Split items `0..n` (item `i` writes element `key(i) = (tensor, flat, block)`) into runs
/// of one tensor with distinct flat offsets, in order; a block is a run of its own. These are
/// the batches [`EditTarget::read_many`]/[`EditTarget::write_many`] can take without
/// changing the result of handling the items one by one.
fn batches<'k>(
    n: usize,
    key: impl Fn(usize) -> (&'k str, usize, bool),
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut start = 0;
    for i in 0..n {
        let (tensor, flat, block) = key(i);
        let (first, _, first_block) = key(start);
        let joins = !block && !first_block && tensor == first && !seen.contains(&flat);
        if i > start && !joins {
            out.push(start..i);
            start = i;
            seen.clear();
        }
        seen.insert(flat);
    }
    if start < n {
        out.push(start..n);
    }
    out
}

/// A target's batch read must return one value per element asked for.
fn check_read(tensor: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::tensor(tensor, format!("read {got} elements, asked for {want}")));
    }
    Ok(())
}

impl EditTarget for Weights {
    fn shape_of(&self, tensor: &str) -> Result<Vec<usize>> {
        Ok(self.get(tensor)?.shape.clone())
    }
    fn read_bits(&self, tensor: &str, flat: usize) -> Result<u32> {
        let t = self.get(tensor)?;
        t.data
            .get(flat)
            .map(|v| v.to_bits())
            .ok_or_else(|| Error::tensor(tensor, "index out of range"))
    }
    fn write_bits(&mut self, tensor: &str, flat: usize, bits: u32) -> Result<()> {
        let t = self.get_mut(tensor)?;
        let slot =
            t.data.get_mut(flat).ok_or_else(|| Error::tensor(tensor, "index out of range"))?;
        *slot = f32::from_bits(bits);
        Ok(())
    }
    fn read_range(&self, tensor: &str, start: usize, len: usize) -> Result<Vec<u32>> {
        let t = self.get(tensor)?;
        let v = t.data.get(start..start.saturating_add(len));
        let v = v.ok_or_else(|| Error::tensor(tensor, "range out of bounds"))?;
        Ok(v.iter().map(|x| x.to_bits()).collect())
    }
    fn write_range(&mut self, tensor: &str, start: usize, bits: &[u32]) -> Result<()> {
        let t = self.get_mut(tensor)?;
        let v = t.data.get_mut(start..start.saturating_add(bits.len()));
        let v = v.ok_or_else(|| Error::tensor(tensor, "range out of bounds"))?;
        v.iter_mut().zip(bits).for_each(|(x, &b)| *x = f32::from_bits(b));
        Ok(())
    }
}

impl EditTarget for Model {
    fn shape_of(&self, tensor: &str) -> Result<Vec<usize>> {
        self.weights.shape_of(tensor)
    }
    fn read_bits(&self, tensor: &str, flat: usize) -> Result<u32> {
        self.weights.read_bits(tensor, flat)
    }
    fn write_bits(&mut self, tensor: &str, flat: usize, bits: u32) -> Result<()> {
        self.weights.write_bits(tensor, flat, bits)
    }
    fn read_range(&self, tensor: &str, start: usize, len: usize) -> Result<Vec<u32>> {
        self.weights.read_range(tensor, start, len)
    }
    fn write_range(&mut self, tensor: &str, start: usize, bits: &[u32]) -> Result<()> {
        self.weights.write_range(tensor, start, bits)
    }
}

/// A scope of edits over `T`: records original bits before each write and restores them,
/// newest first, when dropped or on [`EditGuard::restore_all`]. Derefs to the target so the
/// model can run while edited.
pub struct EditGuard<'a, T: EditTarget> {
    target: &'a mut T,
    log: Vec<EditRecord>,
}

impl<'a, T: EditTarget> EditGuard<'a, T> {
    /// Open an edit scope on `target`.
    pub fn new(target: &'a mut T) -> Self {
        EditGuard { target, log: Vec::new() }
    }

    /// Apply one edit in place, recording the original bits first.
    pub fn apply(&mut self, edit: &WeightEdit) -> Result<&EditRecord> {
        self.apply_all(std::slice::from_ref(edit))?;
        self.log
            .last()
            .ok_or_else(|| Error::Edit { spec: edit.to_string(), msg: "not logged".into() })
    }

    /// Apply several edits, with the same result as applying them one by one in order. Runs
    /// of element edits of one tensor move in batches ([`EditTarget::read_many`], then
    /// [`EditTarget::write_many`]); a block edit moves as one range. On a device that is a
    /// few transfers, not one per element. Every index is checked before anything is
    /// written; on error, the edits already applied stay logged (and are restored when the
    /// guard drops).
    pub fn apply_all(&mut self, edits: &[WeightEdit]) -> Result<()> {
        let mut spans = Vec::with_capacity(edits.len());
        let mut shape: Option<(&str, Vec<usize>)> = None;
        for e in edits {
            if shape.as_ref().is_none_or(|(t, _)| *t != e.tensor) {
                let s = self
                    .target
                    .shape_of(&e.tensor)
                    .map_err(|err| Error::Edit { spec: e.to_string(), msg: err.to_string() })?;
                shape = Some((&e.tensor, s));
            }
            let s = shape.as_ref().map(|(_, s)| s.as_slice()).unwrap_or_default();
            spans.push(e.span(s)?);
        }
        let runs = batches(edits.len(), |i| (edits[i].tensor.as_str(), spans[i].0, edits[i].block));
        for run in runs {
            let (edits, spans) = (&edits[run.clone()], &spans[run]);
            let tensor = &edits[0].tensor;
            if edits[0].block {
                let (start, len) = spans[0];
                let old = self.target.read_range(tensor, start, len)?;
                check_read(tensor, old.len(), len)?;
                let op = edits[0].op;
                let new: Vec<u32> =
                    old.iter().map(|&b| op.apply(f32::from_bits(b)).to_bits()).collect();
                self.log.push(EditRecord {
                    edit: edits[0].clone(),
                    flat: start,
                    original: f32::from_bits(old[0]),
                    new: f32::from_bits(new[0]),
                    original_bits: old[0],
                    len,
                    block_bits: old,
                    restored: false,
                });
                self.target.write_range(tensor, start, &new)?;
                continue;
            }
            let flats: Vec<usize> = spans.iter().map(|s| s.0).collect();
            let old = self.target.read_many(tensor, &flats)?;
            check_read(tensor, old.len(), flats.len())?;
            let new: Vec<u32> = edits
                .iter()
                .zip(&old)
                .map(|(e, &b)| e.op.apply(f32::from_bits(b)).to_bits())
                .collect();
            // Logged before writing: if the write fails, restoring the unchanged bits is
            // harmless.
            for ((e, &flat), (&bits, &new)) in edits.iter().zip(&flats).zip(old.iter().zip(&new)) {
                self.log.push(EditRecord {
                    edit: e.clone(),
                    flat,
                    original: f32::from_bits(bits),
                    new: f32::from_bits(new),
                    original_bits: bits,
                    len: 1,
                    block_bits: Vec::new(),
                    restored: false,
                });
            }
            self.target.write_many(tensor, &flats, &new)?;
        }
        Ok(())
    }

    /// Restore every edit of this scope now, newest first (in batches, as
    /// [`EditGuard::apply_all`] writes). Returns how many were restored.
    pub fn restore_all(&mut self) -> Result<usize> {
        let pending: Vec<usize> =
            (0..self.log.len()).rev().filter(|&i| !self.log[i].restored).collect();
        let log = &self.log;
        let runs = batches(pending.len(), |k| {
            let r = &log[pending[k]];
            (r.edit.tensor.as_str(), r.flat, r.edit.block)
        });
        for run in runs {
            let ids = &pending[run];
            let first = &self.log[ids[0]];
            let tensor = first.edit.tensor.clone();
            if first.edit.block {
                let start = first.flat;
                // Borrowed out of the log for the write, and put back whatever happens.
                let bits = std::mem::take(&mut self.log[ids[0]].block_bits);
                let written = self.target.write_range(&tensor, start, &bits);
                self.log[ids[0]].block_bits = bits;
                written?;
            } else {
                let flats: Vec<usize> = ids.iter().map(|&i| self.log[i].flat).collect();
                let bits: Vec<u32> = ids.iter().map(|&i| self.log[i].original_bits).collect();
                self.target.write_many(&tensor, &flats, &bits)?;
            }
            for &i in ids {
                self.log[i].restored = true;
            }
        }
        Ok(pending.len())
    }

    /// A nested scope whose edits are restored when it drops, before this scope's.
    pub fn scope(&mut self) -> EditGuard<'_, T> {
        EditGuard::new(&mut *self.target)
    }

    /// The history of this scope's edits.
    pub fn log(&self) -> &[EditRecord] {
        &self.log
    }

    /// The history as JSON.
    pub fn log_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.log).unwrap_or(serde_json::Value::Null)
    }
}

impl<T: EditTarget> Deref for EditGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.target
    }
}

impl<T: EditTarget> Drop for EditGuard<'_, T> {
    fn drop(&mut self) {
        if let Err(e) = self.restore_all() {
            // Restoring host memory cannot fail for an index that was written; a device
            // target that fails here has lost its context, which the user must know.
            eprintln!("swk: error: could not restore edited weights: {e}");
        }
    }
}

/// Run `f` on `target` with `edits` applied; every edit is restored afterwards, whether `f`
/// returns `Ok`, `Err`, or panics.
pub fn with_edits<T: EditTarget, R>(
    target: &mut T,
    edits: &[WeightEdit],
    f: impl FnOnce(&T) -> Result<R>,
) -> Result<R> {
    let mut g = EditGuard::new(target);
    g.apply_all(edits)?;
    let r = f(&g);
    g.restore_all()?;
    r
}
