//! The weight edit API, path by path: spec parsing (valid and invalid), index checks that leave
//! the weights untouched, bit-exact apply/restore (NaN payloads, -0.0), nested scopes,
//! `restore_all`, `with_edits` on Ok, Err and panic, the JSON log, and the effect of an edit
//! on the forward pass.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use swk::edit::{with_edits, EditGuard, EditOp, EditTarget, WeightEdit};
use swk::model::{Tensor, Weights};
use swk::synth::{planted, random_llama, Plant, SynthSpec};
use swk::Error;

/// A NaN with a non-default payload (quiet bit set, low bits 0x1234).
const NAN_PAYLOAD: u32 = 0x7fc0_1234;
/// A signalling NaN payload (quiet bit clear).
const SNAN_PAYLOAD: u32 = 0x7f80_0001;

/// A small store: a 2×3 matrix with special values, a vector and a 3-D tensor.
fn store() -> Weights {
    let mut w = Weights::new();
    let m = vec![
        1.5,
        -0.0,
        f32::from_bits(NAN_PAYLOAD),
        4.0,
        f32::from_bits(SNAN_PAYLOAD),
        f32::MIN_POSITIVE / 4.0,
    ];
    w.insert("m", Tensor::new("m", vec![2, 3], m, "F32").unwrap());
    w.insert("v", Tensor::new("v", vec![4], vec![1.0, 2.0, 3.0, 4.0], "BF16").unwrap());
    w.insert(
        "cube",
        Tensor::new("cube", vec![2, 2, 2], (0..8).map(|i| i as f32).collect(), "F32").unwrap(),
    );
    w
}

/// Every element's bits, by tensor name (a stronger check than the checksum in messages).
fn bits(w: &Weights) -> Vec<(String, Vec<u32>)> {
    w.iter().map(|(n, t)| (n.to_string(), t.data.iter().map(|v| v.to_bits()).collect())).collect()
}

fn parse_err(spec: &str) -> String {
    match WeightEdit::parse(spec) {
        Ok(e) => panic!("`{spec}` parsed as {e:?}, expected an error"),
        Err(e) => {
            assert!(matches!(e, Error::Edit { .. }), "`{spec}`: wrong error kind {e:?}");
            e.to_string()
        }
    }
}

#[test]
fn parses_every_valid_form() {
    let dp = "model.layers.2.mlp.down_proj.weight";
    let bracket = format!("{dp}[3,4]=zero");
    let cases: Vec<(&str, WeightEdit)> = vec![
        ("zero:2,3968,7003", WeightEdit::down_proj(2, 3968, 7003, EditOp::Zero)),
        ("zero: 2, 3968 ,7003", WeightEdit::down_proj(2, 3968, 7003, EditOp::Zero)),
        ("scale:2,3,4,0.5", WeightEdit::down_proj(2, 3, 4, EditOp::Scale(0.5))),
        ("scale:2,3,4,-1e3", WeightEdit::down_proj(2, 3, 4, EditOp::Scale(-1000.0))),
        ("set:2,3,4,-2.25", WeightEdit::down_proj(2, 3, 4, EditOp::Set(-2.25))),
        ("set:0,0,0,-0", WeightEdit::down_proj(0, 0, 0, EditOp::Set(-0.0))),
        (&bracket, WeightEdit::new(dp, &[3, 4], EditOp::Zero)),
        ("m[1,2]=x2.5", WeightEdit::new("m", &[1, 2], EditOp::Scale(2.5))),
        ("m[1,2]=x-1", WeightEdit::new("m", &[1, 2], EditOp::Scale(-1.0))),
        ("m[0,0]= 7 ", WeightEdit::new("m", &[0, 0], EditOp::Set(7.0))),
        ("v[3]=zero", WeightEdit::new("v", &[3], EditOp::Zero)),
        ("cube[1,0,1]=-3", WeightEdit::new("cube", &[1, 0, 1], EditOp::Set(-3.0))),
        // A tensor name may contain ':' when the bracket form is used.
        ("ns:t[0]=zero", WeightEdit::new("ns:t", &[0], EditOp::Zero)),
        // Block edits: trailing `*`s.
        ("m[1,*]=x2", WeightEdit::block("m", &[1], EditOp::Scale(2.0))),
        ("m[*]=zero", WeightEdit::block("m", &[], EditOp::Zero)),
        ("m[ * , * ]=zero", WeightEdit::block("m", &[], EditOp::Zero)),
        ("cube[1,*,*]=-1", WeightEdit::block("cube", &[1], EditOp::Set(-1.0))),
    ];
    for (spec, want) in cases {
        let got = WeightEdit::parse(spec).unwrap_or_else(|e| panic!("`{spec}`: {e}"));
        assert_eq!(got, want, "`{spec}`");
    }
    // -0 keeps its sign bit.
    let EditOp::Set(v) = WeightEdit::parse("set:0,0,0,-0").unwrap().op else { panic!() };
    assert_eq!(v.to_bits(), (-0.0f32).to_bits());
}

#[test]
fn display_round_trips_through_parse() {
    let edits = [
        WeightEdit::down_proj(1, 2533, 7890, EditOp::Zero),
        WeightEdit::down_proj(0, 1, 2, EditOp::Scale(1.5)),
        WeightEdit::down_proj(0, 1, 2, EditOp::Set(-0.0)),
        WeightEdit::down_proj(0, 1, 2, EditOp::Set(1e-40)),
        WeightEdit::down_proj(0, 1, 2, EditOp::Set(f32::MAX)),
        WeightEdit::new("cube", &[1, 0, 1], EditOp::Scale(-3.25e-7)),
        WeightEdit::new("v", &[3], EditOp::Set(0.1)),
        WeightEdit::block("cube", &[1], EditOp::Scale(0.5)),
        WeightEdit::block("m", &[], EditOp::Zero),
    ];
    for e in edits {
        let text = e.to_string();
        let back = WeightEdit::parse(&text).unwrap_or_else(|err| panic!("`{text}`: {err}"));
        assert_eq!(back.tensor, e.tensor, "`{text}`");
        assert_eq!(back.index, e.index, "`{text}`");
        assert_eq!(back.block, e.block, "`{text}`");
        let op_bits = |op: EditOp| match op {
            EditOp::Zero => (0, 0),
            EditOp::Scale(f) => (1, f.to_bits()),
            EditOp::Set(v) => (2, v.to_bits()),
        };
        assert_eq!(op_bits(back.op), op_bits(e.op), "`{text}`");
    }
    assert_eq!(
        WeightEdit::down_proj(2, 3, 4, EditOp::Zero).to_string(),
        "model.layers.2.mlp.down_proj.weight[3,4]=zero"
    );
    assert_eq!(WeightEdit::block("t", &[], EditOp::Zero).to_string(), "t[*]=zero");
    assert_eq!(WeightEdit::block("t", &[4], EditOp::Scale(2.0)).to_string(), "t[4,*]=x2");
}

#[test]
fn rejects_malformed_specs_with_clear_errors() {
    let cases: &[(&str, &str)] = &[
        ("drop:1,2,3", "operation must be zero, scale or set"),
        ("Zero:1,2,3", "operation must be zero, scale or set"),
        ("zero:1,2", "expected 3 comma-separated numbers"),
        ("zero:1,2,3,4", "expected 3 comma-separated numbers"),
        ("scale:1,2,3", "expected 4 comma-separated numbers"),
        ("set:1,2,3,4,5", "expected 4 comma-separated numbers"),
        ("zero:a,2,3", "`a` is not an index"),
        ("zero:-1,2,3", "`-1` is not an index"),
        ("zero:1.5,2,3", "`1.5` is not an index"),
        ("scale:1,2,3,abc", "`abc` is not a finite number"),
        ("scale:1,2,3,NaN", "`NaN` is not a finite number"),
        ("set:1,2,3,nan", "`nan` is not a finite number"),
        ("set:1,2,3,inf", "`inf` is not a finite number"),
        ("set:1,2,3,-infinity", "`-infinity` is not a finite number"),
        ("set:1,2,3,1e39", "`1e39` is not a finite number"),
        ("m[1,2=zero", "missing `]`"),
        ("m1,2]=zero", "missing `[index]`"),
        ("[1,2]=zero", "missing tensor name"),
        ("m[1,x]=zero", "`x` is not an index"),
        ("m[]=zero", "is not an index"),
        ("m[*,1]=zero", "`*` may only end the index"),
        ("m[1,*,2,*]=zero", "`*` may only end the index"),
        ("m[1,2]=xNaN", "`NaN` is not a finite number"),
        ("m[1,2]=x", "is not a finite number"),
        ("m[1,2]=banana", "`banana` is not a finite number"),
        ("m[1,2]", "expected zero:L,R,C"),
        ("", "expected zero:L,R,C"),
        ("zero", "expected zero:L,R,C"),
    ];
    for (spec, needle) in cases {
        let msg = parse_err(spec);
        assert!(msg.contains(needle), "`{spec}`: message {msg:?} lacks {needle:?}");
        assert!(
            msg.contains(&format!("`{spec}`")),
            "`{spec}`: message {msg:?} does not quote the spec"
        );
    }
}

#[test]
fn bad_indices_name_the_tensor_and_change_nothing() {
    let mut w = store();
    let (sum, all) = (w.checksum(), bits(&w));
    let cases = [
        (WeightEdit::new("m", &[2, 0], EditOp::Zero), vec!["m[2,0]", "out of range", "[2, 3]"]),
        (WeightEdit::new("m", &[0, 3], EditOp::Set(1.0)), vec!["m[0,3]", "out of range"]),
        (WeightEdit::new("m", &[1], EditOp::Zero), vec!["m[1]", "1 dimensions", "[2, 3]"]),
        (WeightEdit::new("m", &[0, 0, 0], EditOp::Zero), vec!["m[0,0,0]", "3 dimensions"]),
        (WeightEdit::new("v", &[4], EditOp::Zero), vec!["v[4]", "out of range", "[4]"]),
        (
            WeightEdit::new("cube", &[1, 1], EditOp::Zero),
            vec!["cube[1,1]", "2 dimensions", "[2, 2, 2]"],
        ),
        (WeightEdit::new("nope", &[0], EditOp::Zero), vec!["nope", "not found"]),
        (WeightEdit::block("m", &[2], EditOp::Zero), vec!["m[2,*]", "out of range", "[2, 3]"]),
        (WeightEdit::block("m", &[0, 0, 0], EditOp::Zero), vec!["m[0,0,0,*]", "3 dimensions"]),
        (WeightEdit::block("nope", &[], EditOp::Zero), vec!["nope[*]", "not found"]),
        (
            WeightEdit::down_proj(99, 0, 0, EditOp::Zero),
            vec!["model.layers.99.mlp.down_proj.weight", "not found"],
        ),
    ];
    for (edit, needles) in cases {
        {
            let mut g = EditGuard::new(&mut w);
            let err = g.apply(&edit).expect_err(&edit.to_string());
            let msg = err.to_string();
            for n in needles {
                assert!(msg.contains(n), "{edit}: message {msg:?} lacks {n:?}");
            }
            assert!(g.log().is_empty(), "{edit}: a failed edit was logged");
        }
        assert_eq!(w.checksum(), sum, "{edit}");
        assert_eq!(bits(&w), all, "{edit}");
    }
    // A batch with a bad index anywhere writes nothing: every index is checked first.
    {
        let mut g = EditGuard::new(&mut w);
        let batch = [
            WeightEdit::new("v", &[0], EditOp::Set(9.0)),
            WeightEdit::new("m", &[0, 0], EditOp::Zero),
            WeightEdit::new("v", &[9], EditOp::Zero),
        ];
        let err = g.apply_all(&batch).unwrap_err().to_string();
        assert!(err.contains("v[9]") && err.contains("out of range"), "{err}");
        assert!(g.log().is_empty());
        assert_eq!(g.get("v").unwrap().data[0], 1.0);
    }
    assert_eq!(bits(&w), all);
}

/// Host weights behind [`EditTarget`] that log the batch calls (tensor, batch size), to see
/// how `apply_all` and `restore_all` group their transfers.
struct Counting {
    w: Weights,
    reads: RefCell<Vec<(String, usize)>>,
    writes: Vec<(String, usize)>,
}

impl Counting {
    fn new(w: Weights) -> Self {
        Counting { w, reads: RefCell::new(Vec::new()), writes: Vec::new() }
    }
}

impl EditTarget for Counting {
    fn shape_of(&self, tensor: &str) -> swk::Result<Vec<usize>> {
        self.w.shape_of(tensor)
    }
    fn read_bits(&self, tensor: &str, flat: usize) -> swk::Result<u32> {
        self.w.read_bits(tensor, flat)
    }
    fn write_bits(&mut self, tensor: &str, flat: usize, bits: u32) -> swk::Result<()> {
        self.w.write_bits(tensor, flat, bits)
    }
    fn read_many(&self, tensor: &str, flats: &[usize]) -> swk::Result<Vec<u32>> {
        self.reads.borrow_mut().push((tensor.to_string(), flats.len()));
        flats.iter().map(|&f| self.w.read_bits(tensor, f)).collect()
    }
    fn write_many(&mut self, tensor: &str, flats: &[usize], bits: &[u32]) -> swk::Result<()> {
        self.writes.push((tensor.to_string(), flats.len()));
        flats.iter().zip(bits).try_for_each(|(&f, &b)| self.w.write_bits(tensor, f, b))
    }
}

fn calls(v: &[(&str, usize)]) -> Vec<(String, usize)> {
    v.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

/// `apply_all` gives exactly what applying the edits one by one gives (repeated elements,
/// scales of scales, tensor switches, NaN payloads), with the same log; `restore_all` brings
/// every bit back.
#[test]
fn batched_edits_equal_one_by_one() {
    let mut rng = swk::synth::SplitMix64::new(11);
    let mut pick = |n: u64| (rng.next_u64() % n) as usize;
    let edits: Vec<WeightEdit> = (0..400)
        .map(|_| {
            let (t, idx) = match pick(3) {
                0 => ("m", vec![pick(2), pick(3)]),
                1 => ("v", vec![pick(4)]),
                _ => ("cube", vec![pick(2), pick(2), pick(2)]),
            };
            let op = match pick(4) {
                0 => EditOp::Zero,
                1 => EditOp::Scale(-1.5),
                2 => EditOp::Set(pick(100) as f32 - 50.0),
                _ => EditOp::Set(f32::from_bits(NAN_PAYLOAD + pick(7) as u32)),
            };
            WeightEdit::new(t, &idx, op)
        })
        .collect();
    let trace = |log: &[swk::edit::EditRecord]| -> Vec<(String, usize, u32, u32)> {
        log.iter()
            .map(|r| (r.edit.tensor.clone(), r.flat, r.original_bits, r.new.to_bits()))
            .collect()
    };

    let mut one = store();
    let all = bits(&one);
    let (want_bits, want_log) = {
        let mut g = EditGuard::new(&mut one);
        for e in &edits {
            g.apply(e).unwrap();
        }
        (bits(&g), trace(g.log()))
    };
    assert_eq!(bits(&one), all);
    assert_ne!(want_bits, all, "the edits change something");

    let mut batched = Counting::new(store());
    {
        let mut g = EditGuard::new(&mut batched);
        g.apply_all(&edits).unwrap();
        assert_eq!(bits(&g.w), want_bits);
        assert_eq!(trace(g.log()), want_log);
        assert_eq!(g.restore_all().unwrap(), edits.len());
        assert_eq!(bits(&g.w), all);
        assert!(g.writes.len() < 2 * edits.len(), "some edits were batched");
    }
    assert_eq!(bits(&batched.w), all);
}

/// Every element edit a block edit stands for, in flat order.
fn expand(e: &WeightEdit, shape: &[usize]) -> Vec<WeightEdit> {
    if !e.block {
        return vec![e.clone()];
    }
    let inner: usize = shape[e.index.len()..].iter().product();
    (0..inner)
        .map(|mut f| {
            let mut idx = e.index.clone();
            let mut tail = vec![0; shape.len() - e.index.len()];
            for (k, d) in shape[e.index.len()..].iter().enumerate().rev() {
                tail[k] = f % d;
                f /= d;
            }
            idx.extend(tail);
            WeightEdit::new(e.tensor.clone(), &idx, e.op)
        })
        .collect()
}

/// Block edits (whole tensors, rows, sub-blocks) mixed with element edits that overlap them
/// give exactly what their element-by-element expansion gives, applied one by one; one log
/// record per block, holding its original bits; restore brings every bit back.
#[test]
fn block_edits_equal_their_expansion() {
    let mut rng = swk::synth::SplitMix64::new(12);
    let mut pick = |n: u64| (rng.next_u64() % n) as usize;
    let shapes = [("m", vec![2, 3]), ("v", vec![4]), ("cube", vec![2, 2, 2])];
    let edits: Vec<WeightEdit> = (0..300)
        .map(|_| {
            let (t, shape) = &shapes[pick(3)];
            let op = match pick(3) {
                0 => EditOp::Zero,
                1 => EditOp::Scale(-1.5),
                _ => EditOp::Set(pick(100) as f32 - 50.0),
            };
            let idx: Vec<usize> = shape.iter().map(|&d| pick(d as u64)).collect();
            if pick(4) == 0 {
                WeightEdit::block(*t, &idx[..pick(shape.len() as u64 + 1)], op)
            } else {
                WeightEdit::new(*t, &idx, op)
            }
        })
        .collect();
    let blocks = edits.iter().filter(|e| e.block).count();
    assert!(blocks > 30, "{blocks} blocks");
    let shape_of = |t: &str| shapes.iter().find(|s| s.0 == t).map(|s| s.1.clone()).unwrap();
    let expanded: Vec<WeightEdit> =
        edits.iter().flat_map(|e| expand(e, &shape_of(&e.tensor))).collect();

    let mut one = store();
    let all = bits(&one);
    let want = {
        let mut g = EditGuard::new(&mut one);
        for e in &expanded {
            g.apply(e).unwrap();
        }
        bits(&g)
    };
    let mut batched = Counting::new(store());
    {
        let mut g = EditGuard::new(&mut batched);
        g.apply_all(&edits).unwrap();
        assert_eq!(bits(&g.w), want);
        assert_eq!(g.log().len(), edits.len(), "one record per edit");
        for (r, e) in g.log().iter().zip(&edits) {
            let n = expand(e, &shape_of(&e.tensor)).len();
            assert_eq!(r.len, n, "{e}");
            assert_eq!(r.block_bits.len(), if e.block { n } else { 0 }, "{e}");
            if e.block {
                assert_eq!(r.block_bits[0], r.original_bits, "{e}");
            }
        }
        assert_eq!(g.restore_all().unwrap(), edits.len());
        assert_eq!(bits(&g.w), all);
    }
    // A whole tensor is one range read and one range write (the default range methods go
    // through read_many/write_many).
    let mut c = Counting::new(store());
    {
        let mut g = EditGuard::new(&mut c);
        g.apply(&WeightEdit::block("cube", &[], EditOp::Scale(2.0))).unwrap();
        let cube = &g.w.get("cube").unwrap().data;
        assert_eq!(*cube, (0..8).map(|i| 2.0 * i as f32).collect::<Vec<_>>());
        assert_eq!(*g.reads.borrow(), calls(&[("cube", 8)]));
        assert_eq!(g.writes, calls(&[("cube", 8)]));
    }
    assert_eq!(c.writes, calls(&[("cube", 8), ("cube", 8)]));
    assert_eq!(bits(&c.w), all);
}

/// Runs of one tensor move in one read and one write, restored in one write per run, newest
/// first; a repeated element starts a new batch, so it sees the earlier edit's result.
#[test]
fn edits_of_one_tensor_move_in_one_batch() {
    let mut c = Counting::new(store());
    let whole = |t: &str, dims: &[usize]| -> Vec<WeightEdit> {
        let n: usize = dims.iter().product();
        (0..n)
            .map(|mut f| {
                let mut idx = vec![0; dims.len()];
                for (k, d) in dims.iter().enumerate().rev() {
                    idx[k] = f % d;
                    f /= d;
                }
                WeightEdit::new(t, &idx, EditOp::Zero)
            })
            .collect()
    };
    {
        let mut g = EditGuard::new(&mut c);
        let mut edits = whole("cube", &[2, 2, 2]);
        edits.extend(whole("m", &[2, 3]));
        g.apply_all(&edits).unwrap();
        assert_eq!(*g.reads.borrow(), calls(&[("cube", 8), ("m", 6)]));
        assert_eq!(g.writes, calls(&[("cube", 8), ("m", 6)]));
        assert!(g.w.get("cube").unwrap().data.iter().all(|&v| v == 0.0));
        assert_eq!(g.restore_all().unwrap(), 14);
        assert_eq!(g.writes[2..], calls(&[("m", 6), ("cube", 8)]));

        let twice = [
            WeightEdit::new("v", &[0], EditOp::Scale(2.0)),
            WeightEdit::new("v", &[1], EditOp::Zero),
            WeightEdit::new("v", &[0], EditOp::Scale(2.0)),
        ];
        g.apply_all(&twice).unwrap();
        assert_eq!(g.reads.borrow()[2..], calls(&[("v", 2), ("v", 1)]));
        assert_eq!(g.w.get("v").unwrap().data[..2], [4.0, 0.0]);
        g.restore_all().unwrap();
        assert_eq!(g.writes[6..], calls(&[("v", 2), ("v", 1)]), "split at the repeat");
        assert_eq!(g.w.get("v").unwrap().data[..2], [1.0, 2.0]);
    }
    assert_eq!(bits(&c.w), bits(&store()));
}

#[test]
fn apply_and_restore_are_bit_exact_for_special_values() {
    let mut w = store();
    let (sum, all) = (w.checksum(), bits(&w));
    {
        let mut g = EditGuard::new(&mut w);
        // -0.0 scaled, NaN payloads zeroed / scaled / set, a subnormal set to -0.0.
        let r = g.apply(&WeightEdit::new("m", &[0, 1], EditOp::Scale(3.0))).unwrap();
        assert_eq!(r.original_bits, (-0.0f32).to_bits());
        assert_eq!(r.new.to_bits(), (-0.0f32).to_bits());
        let r = g.apply(&WeightEdit::new("m", &[0, 2], EditOp::Zero)).unwrap();
        assert_eq!(r.original_bits, NAN_PAYLOAD);
        assert_eq!(r.flat, 2);
        g.apply(&WeightEdit::new("m", &[1, 1], EditOp::Scale(2.0))).unwrap();
        g.apply(&WeightEdit::new("m", &[1, 2], EditOp::Set(-0.0))).unwrap();
        g.apply(&WeightEdit::new("m", &[1, 0], EditOp::Set(f32::from_bits(NAN_PAYLOAD + 1))))
            .unwrap();
        g.apply(&WeightEdit::new("cube", &[1, 1, 0], EditOp::Scale(-1.0))).unwrap();
        let m = &g.get("m").unwrap().data;
        assert_eq!(m[2].to_bits(), 0);
        assert!(m[4].is_nan());
        assert_eq!(m[5].to_bits(), (-0.0f32).to_bits());
        assert_eq!(m[3].to_bits(), NAN_PAYLOAD + 1);
        assert_eq!(g.get("cube").unwrap().data[6], -6.0);
        assert_eq!(g.log().len(), 6);
        assert_ne!(g.checksum(), sum);
    }
    assert_eq!(w.checksum(), sum);
    assert_eq!(bits(&w), all);
}

#[test]
fn nested_scopes_restore_in_reverse_order() {
    let mut w = store();
    let (sum, all) = (w.checksum(), bits(&w));
    let x = WeightEdit::new("v", &[1], EditOp::Zero);
    {
        let mut outer = EditGuard::new(&mut w);
        outer.apply(&x).unwrap();
        assert_eq!(outer.get("v").unwrap().data[1], 0.0);
        {
            let mut inner = outer.scope();
            // The same element again: the inner scope records the outer's value (0).
            let r = inner.apply(&WeightEdit::new("v", &[1], EditOp::Set(5.0))).unwrap();
            assert_eq!(r.original, 0.0);
            inner.apply(&WeightEdit::new("v", &[2], EditOp::Scale(10.0))).unwrap();
            {
                let mut innermost = inner.scope();
                innermost.apply(&WeightEdit::new("v", &[1], EditOp::Scale(-2.0))).unwrap();
                assert_eq!(innermost.get("v").unwrap().data[1], -10.0);
            }
            // Back to the inner scope's state.
            assert_eq!(inner.get("v").unwrap().data[1], 5.0);
            assert_eq!(inner.get("v").unwrap().data[2], 30.0);
        }
        // Back to the outer scope's state, not to the original.
        assert_eq!(outer.get("v").unwrap().data[1], 0.0);
        assert_eq!(outer.get("v").unwrap().data[2], 3.0);
        assert_eq!(outer.log().len(), 1);
    }
    assert_eq!(w.checksum(), sum);
    assert_eq!(bits(&w), all);

    // The same element edited twice in one scope restores newest first, to the original.
    {
        let mut g = EditGuard::new(&mut w);
        g.apply(&WeightEdit::new("v", &[0], EditOp::Scale(4.0))).unwrap();
        g.apply(&WeightEdit::new("v", &[0], EditOp::Set(-1.0))).unwrap();
        g.apply(&WeightEdit::new("v", &[0], EditOp::Zero)).unwrap();
        assert_eq!(g.log()[1].original, 4.0);
        assert_eq!(g.log()[2].original, -1.0);
    }
    assert_eq!(bits(&w), all);
}

#[test]
fn restore_all_is_idempotent_and_the_guard_stays_usable() {
    let mut w = store();
    let all = bits(&w);
    {
        let mut g = EditGuard::new(&mut w);
        g.apply(&WeightEdit::new("v", &[0], EditOp::Zero)).unwrap();
        g.apply(&WeightEdit::new("v", &[0], EditOp::Set(8.0))).unwrap();
        g.apply(&WeightEdit::new("m", &[0, 0], EditOp::Scale(2.0))).unwrap();
        assert_eq!(g.restore_all().unwrap(), 3);
        assert_eq!(bits(&g), all);
        assert!(g.log().iter().all(|r| r.restored));
        assert_eq!(g.restore_all().unwrap(), 0);
        // Edits after a restore are tracked and restored on drop.
        g.apply(&WeightEdit::new("v", &[3], EditOp::Set(-4.0))).unwrap();
        assert_eq!(g.get("v").unwrap().data[3], -4.0);
        assert!(!g.log()[3].restored);
    }
    assert_eq!(bits(&w), all);
}

#[test]
fn with_edits_restores_on_ok_err_and_panic() {
    let mut w = store();
    let (sum, all) = (w.checksum(), bits(&w));
    let edits = [
        WeightEdit::new("v", &[2], EditOp::Set(-7.0)),
        WeightEdit::new("m", &[0, 2], EditOp::Zero),
    ];

    let seen = with_edits(&mut w, &edits, |t| Ok(t.get("v")?.data[2])).unwrap();
    assert_eq!(seen, -7.0);
    assert_eq!(bits(&w), all);

    let r: swk::Result<()> = with_edits(&mut w, &edits, |t| {
        assert_eq!(t.get("m")?.data[2], 0.0);
        Err(Error::Invalid("the closure failed".into()))
    });
    assert!(matches!(r, Err(Error::Invalid(ref m)) if m == "the closure failed"));
    assert_eq!(bits(&w), all);

    // A bad edit in the list: nothing runs, the good ones are rolled back.
    let mut ran = false;
    let bad = [edits[0].clone(), WeightEdit::new("v", &[7], EditOp::Zero)];
    let r = with_edits(&mut w, &bad, |_| {
        ran = true;
        Ok(())
    });
    assert!(r.is_err() && !ran);
    assert_eq!(bits(&w), all);

    // Panic inside the closure: the guard restores while unwinding.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let _: swk::Result<()> = with_edits(&mut w, &edits, |t| {
            assert_eq!(t.get("v").unwrap().data[2], -7.0);
            panic!("boom inside the edit scope");
        });
    }));
    std::panic::set_hook(hook);
    assert!(caught.is_err());
    assert_eq!(w.checksum(), sum);
    assert_eq!(bits(&w), all);

    // The same with a guard held directly, panicking inside a nested scope.
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let mut g = EditGuard::new(&mut w);
        g.apply(&edits[0]).unwrap();
        let mut inner = g.scope();
        inner.apply(&edits[1]).unwrap();
        std::panic::resume_unwind(Box::new("boom in a nested scope"));
    }));
    assert!(caught.is_err());
    assert_eq!(bits(&w), all);
}

#[test]
fn log_json_has_the_expected_fields() {
    let mut w = store();
    let mut g = EditGuard::new(&mut w);
    g.apply(&WeightEdit::new("m", &[1, 0], EditOp::Scale(2.0))).unwrap();
    g.apply(&WeightEdit::new("v", &[1], EditOp::Zero)).unwrap();
    g.apply(&WeightEdit::new("v", &[2], EditOp::Set(-0.5))).unwrap();
    g.apply(&WeightEdit::new("m", &[0, 2], EditOp::Set(1.0))).unwrap();
    let j = g.log_json();
    let a = j.as_array().expect("an array");
    assert_eq!(a.len(), 4);
    for r in a {
        let o = r.as_object().unwrap();
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        for k in ["edit", "flat", "original", "new", "original_bits", "restored"] {
            assert!(keys.contains(&k), "missing `{k}` in {r}");
        }
        let e = o["edit"].as_object().unwrap();
        assert!(e.contains_key("tensor") && e.contains_key("index") && e.contains_key("op"), "{r}");
        assert_eq!(o["restored"], false);
    }
    assert_eq!(a[0]["edit"]["tensor"], "m");
    assert_eq!(a[0]["edit"]["index"], serde_json::json!([1, 0]));
    assert_eq!(a[0]["edit"]["op"], serde_json::json!({"op": "scale", "arg": 2.0}));
    assert_eq!(a[0]["flat"], 3);
    assert_eq!(a[0]["original"], 4.0);
    assert_eq!(a[0]["new"], 8.0);
    assert_eq!(a[0]["original_bits"], 4.0f32.to_bits());
    assert_eq!(a[1]["edit"]["op"], serde_json::json!({"op": "zero"}));
    assert_eq!(a[1]["new"], 0.0);
    assert_eq!(a[2]["edit"]["op"], serde_json::json!({"op": "set", "arg": -0.5}));
    // A NaN original is not representable in JSON; its bits are.
    assert_eq!(a[3]["original_bits"], NAN_PAYLOAD);
    assert_eq!(a[0]["len"], 1);
    assert!(a[0]["edit"].get("block").is_none(), "element edits carry no block flag");
    // A block: one record, its length, its first element; the bits stay out of the JSON.
    g.apply(&WeightEdit::block("cube", &[1], EditOp::Zero)).unwrap();
    let j = g.log_json();
    let b = &j.as_array().unwrap()[4];
    assert_eq!(b["edit"]["block"], true);
    assert_eq!(
        (b["flat"].as_u64(), b["len"].as_u64(), b["original"].as_f64()),
        (Some(4), Some(4), Some(4.0))
    );
    assert!(b.get("block_bits").is_none());
    g.restore_all().unwrap();
    assert!(g.log_json().as_array().unwrap().iter().all(|r| r["restored"] == true));
}

#[test]
fn an_edit_changes_the_logits_and_restoring_brings_them_back() {
    let spec = SynthSpec { layers: 5, ..SynthSpec::tiny() };
    let (mut model, truth) = planted(&spec, 11, &Plant::standard(&spec)).unwrap();
    let sw = truth.super_weights[0];
    let tokens = &truth.confirm[..16];
    let before = model.logits(tokens).unwrap();
    let sum = model.weights.checksum();

    let zero = WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero);
    let edited = with_edits(&mut model, std::slice::from_ref(&zero), |m| m.logits(tokens)).unwrap();
    let max_diff = before.iter().zip(&edited).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff > 1.0, "zeroing the super weight moved logits by only {max_diff}");

    // A guard derefs to the model, which runs while edited.
    {
        let mut g = EditGuard::new(&mut model);
        g.apply(
            &WeightEdit::parse(&format!("scale:{},{},{},0.5", sw.layer, sw.row, sw.col)).unwrap(),
        )
        .unwrap();
        let half = g.logits(tokens).unwrap();
        assert!(half.iter().zip(&before).any(|(a, b)| a.to_bits() != b.to_bits()));
    }
    let after = model.logits(tokens).unwrap();
    assert_eq!(model.weights.checksum(), sum);
    assert!(
        before.iter().zip(&after).all(|(a, b)| a.to_bits() == b.to_bits()),
        "logits after restoring differ from the original"
    );

    // Editing a random model's embedding row also round-trips bit-exactly.
    let mut m = random_llama(&SynthSpec { layers: 2, ..SynthSpec::tiny() }, 3).unwrap();
    let toks = [5u32, 17, 9, 200];
    let base = m.logits(&toks).unwrap();
    let e = WeightEdit::parse("model.embed_tokens.weight[17,3]=x-40").unwrap();
    let changed = with_edits(&mut m, &[e], |m| m.logits(&toks)).unwrap();
    assert!(changed.iter().zip(&base).any(|(a, b)| a != b));
    assert!(m.logits(&toks).unwrap().iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// A target whose batch reads come back short is an error naming the tensor, not a panic or
/// a silently partial edit; nothing is logged or written.
#[test]
fn short_batch_reads_are_errors() {
    struct Short(Weights);
    impl EditTarget for Short {
        fn shape_of(&self, tensor: &str) -> swk::Result<Vec<usize>> {
            self.0.shape_of(tensor)
        }
        fn read_bits(&self, tensor: &str, flat: usize) -> swk::Result<u32> {
            self.0.read_bits(tensor, flat)
        }
        fn write_bits(&mut self, tensor: &str, flat: usize, bits: u32) -> swk::Result<()> {
            self.0.write_bits(tensor, flat, bits)
        }
        fn read_many(&self, tensor: &str, flats: &[usize]) -> swk::Result<Vec<u32>> {
            flats.iter().skip(1).map(|&f| self.0.read_bits(tensor, f)).collect()
        }
    }
    let mut t = Short(store());
    let all = bits(&t.0);
    for edits in [
        vec![
            WeightEdit::new("m", &[0, 0], EditOp::Zero),
            WeightEdit::new("m", &[1, 1], EditOp::Zero),
        ],
        vec![WeightEdit::block("cube", &[1], EditOp::Zero)],
    ] {
        let mut g = EditGuard::new(&mut t);
        let err = g.apply_all(&edits).unwrap_err().to_string();
        assert!(err.contains("read") && err.contains("asked for"), "{err}");
        assert!(g.log().is_empty());
    }
    assert_eq!(bits(&t.0), all);
}
