//! FP8 safetensors checkpoints as DeepSeek-V3 and Qwen3's `-FP8` models ship them: linear
//! weights in `F8_E4M3` with one f32 scale per block (`{weight}_scale_inv`,
//! `quantization_config.weight_block_size`), dequantized at load as `fp8(q) · s`.
//!
//! The fixtures are made here from the tiny DeepSeek-V3 and Mixtral (under its checkpoint's
//! own `block_sparse_moe…w1/w2/w3` names): every projection quantized to E4M3 in blocks of
//! 16 × 24 (partial blocks at the edges), by a brute-force nearest-code quantizer.
//! Reference: each weight recomputed in f64 from the stored bytes with E4M3 decoded from its
//! definition; tolerance: bit-exact (the f32 product of two f32 values is correctly rounded,
//! as is the exact f64 product cast to f32).

mod common;

use std::path::Path;

use common::fixture;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use swk::model::LazyModel;
use swk::Model;

/// Block of the fixture's scales: 16 rows × 24 columns.
const BLOCK: [usize; 2] = [16, 24];

/// An E4M3 byte's value from the format's definition (sign, 4 exponent bits of bias 7, 3
/// mantissa bits, subnormals at exponent 0, `S.1111.111` NaN).
fn e4m3(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 15) as i32, (b & 7) as f64);
    match e {
        15 if m == 7.0 => f64::NAN,
        0 => sign * m * 2f64.powi(-9),
        _ => sign * (8.0 + m) * 2f64.powi(e - 10),
    }
}

/// The E4M3 code nearest `x` (|x| at most 448).
fn nearest_code(x: f64) -> u8 {
    let sign = if x < 0.0 { 0x80 } else { 0 };
    let code = (0u8..0x7f)
        .min_by(|&a, &b| (e4m3(a) - x.abs()).abs().total_cmp(&(e4m3(b) - x.abs()).abs()));
    code.unwrap_or(0) | sign
}

/// Whether the fixture stores `name` in FP8: the projections (Mixtral's `w1/w2/w3` too), as
/// DeepSeek-V3 does.
fn quantized(name: &str, shape: &[usize]) -> bool {
    let linear =
        name.contains("_proj") || [".w1.", ".w2.", ".w3."].iter().any(|w| name.contains(w));
    shape.len() == 2 && name.starts_with("model.layers.") && linear
}

/// The stored tensors of the tiny fixture `model` (all f32): (name, shape, values).
fn fixture_tensors(model: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture(&format!("tiny/{model}/model.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{model} {name}");
            let v = t.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            (name, t.shape().to_vec(), v.collect())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// An FP8 weight as written: its stored name, shape, codes and block scales.
type Fp8Weight = (String, Vec<usize>, Vec<u8>, Vec<f32>);

/// Write the tiny fixture `model` to `dir` under its own tensor names, its projections in
/// FP8, `config` edited by `edit`; `drop_scale` leaves one weight's scales out. Returns each
/// FP8 weight's stored name, shape, codes and scales.
fn write_fp8(
    model: &str,
    dir: &Path,
    edit: impl Fn(&mut serde_json::Value),
    drop_scale: Option<&str>,
) -> Vec<Fp8Weight> {
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut fp8 = Vec::new();
    for (name, shape, data) in fixture_tensors(model) {
        if !quantized(&name, &shape) {
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((name, Dtype::F32, shape, bytes));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let (sr, sc) = (rows.div_ceil(BLOCK[0]), cols.div_ceil(BLOCK[1]));
        let block = |k: usize| (k / cols / BLOCK[0]) * sc + (k % cols) / BLOCK[1];
        let mut scales = vec![0f32; sr * sc];
        for (k, v) in data.iter().enumerate() {
            scales[block(k)] = scales[block(k)].max(v.abs() / 448.0);
        }
        let q: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(k, &v)| match scales[block(k)] {
                0.0 => 0,
                s => nearest_code(v as f64 / s as f64),
            })
            .collect();
        tensors.push((name.clone(), Dtype::F8_E4M3, shape.clone(), q.clone()));
        if drop_scale != Some(name.as_str()) {
            let bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{name}_scale_inv"), Dtype::F32, vec![sr, sc], bytes));
        }
        fp8.push((name, shape, q, scales));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let src = fixture(&format!("tiny/{model}"));
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["quantization_config"] = serde_json::json!({
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": BLOCK,
    });
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    fp8
}

/// Every FP8 weight loads as `e4m3(q) · s` of its block, bit for bit, eagerly and lazily
/// (Mixtral's under their renamed per-expert names); the other tensors as stored; the scales
/// are no tensors of their own; the model runs, its logits near the f32 model's.
#[test]
fn fp8_weights_dequantize_with_their_block_scales() {
    for b in 0..=255u8 {
        let (got, want) = (swk::io::quant::e4m3_to_f32(b), e4m3(b));
        assert!(got as f64 == want || got.is_nan() && want.is_nan(), "{b:#04x}: {got} vs {want}");
    }
    // Projections per fixture. DeepSeek-V3: layer 0's 4 attention and 3 dense MLP ones,
    // layer 1's 4, 8 experts × 3 and the shared expert's 3. Mixtral: 2 layers of 4 and 4 × 3.
    for (model, count) in [("deepseek_v3", 7 + 4 + 24 + 3), ("mixtral", 2 * (4 + 12))] {
        let dir = tempfile::tempdir().unwrap();
        let fp8 = write_fp8(model, dir.path(), |_| {}, None);
        assert_eq!(fp8.len(), count, "{model}: projections in FP8");
        let path = dir.path().to_str().unwrap();
        let m = Model::load(path).unwrap();
        let lazy = LazyModel::open(path).unwrap();
        let original = Model::load(fixture(&format!("tiny/{model}")).to_str().unwrap()).unwrap();
        let names: Vec<&str> = m.weights.names().collect();
        assert_eq!(names, original.weights.names().collect::<Vec<_>>(), "{model}");
        assert_eq!(lazy.names().collect::<Vec<_>>(), names, "{model}");
        for name in &names {
            let (got, lazily) = (m.weights.get(name).unwrap(), lazy.tensor(name).unwrap());
            let same = got.data.iter().zip(&lazily.data).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{model} {name}: lazy and eager differ");
            let stored = lazy.stored(name).unwrap();
            if got.source_dtype == "F8_E4M3" {
                assert!(stored.is_none_or(|s| s.dtype == "other"), "{model} {name}: converted");
            } else {
                assert!(got.data == original.weights.get(name).unwrap().data, "{model} {name}");
            }
        }
        for (stored, shape, q, scales) in fp8 {
            let parts = swk::model::arch::moe::hf_parts(&m.config, &stored, &shape).unwrap();
            let name = &parts[0].name;
            let got = m.weights.get(name).unwrap();
            assert_eq!((got.shape.as_slice(), got.source_dtype.as_str()), (&shape[..], "F8_E4M3"));
            let (cols, sc) = (shape[1], shape[1].div_ceil(BLOCK[1]));
            for (k, (&b, &v)) in q.iter().zip(&got.data).enumerate() {
                let s = scales[(k / cols / BLOCK[0]) * sc + (k % cols) / BLOCK[1]];
                let want = (e4m3(b) * s as f64) as f32;
                assert_eq!(v.to_bits(), want.to_bits(), "{model} {stored}[{k}]: {v} vs {want}");
            }
            // E4M3 keeps 3 mantissa bits: within a sixteenth of each block's largest |w|.
            let want = &original.weights.get(name).unwrap().data;
            let err = got.data.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let top = scales.iter().fold(0f32, |a, &s| a.max(s)) * 448.0;
            assert!(err <= top / 16.0, "{model} {name}: max error {err} vs largest |w| {top}");
        }
        let tokens: Vec<u32> = (0..12u32).map(|i| (i * 29 + 3) % 320).collect();
        let (a, b) = (m.logits(&tokens).unwrap(), original.logits(&tokens).unwrap());
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
        eprintln!("{model}: fp8 vs f32 logits: max error {err:.3e} of the largest |logit|");
        // Measured 8.6e-2 on DeepSeek-V3 (3-bit mantissas through two layers); a wrong
        // scale gives errors of order 1.
        assert!(a.iter().all(|v| v.is_finite()) && err < 0.25, "{model}: {err}");
    }
}

/// Streaming an FP8 checkpoint stages each FP8 weight a row at a time straight into the slot
/// (`LazyModel::fp8`): the bytes of every layer, in bf16, f16 and f32 slots, whole and one
/// expert at a time, are those staged from the same model held as f32 in memory (the f32
/// route), with an edit on an FP8 weight applied; a weight f16 cannot hold is refused in f16
/// slots as the f32 route refuses it.
#[test]
fn fp8_weights_stage_as_their_f32_values() {
    use swk::backend::stream::{stage_part, LayerPart, Overlay, SlotLayout};
    use swk::backend::WeightDtype;
    for model in ["deepseek_v3", "mixtral"] {
        let dir = tempfile::tempdir().unwrap();
        write_fp8(model, dir.path(), |_| {}, None);
        let path = dir.path().to_str().unwrap();
        let lazy = LazyModel::open(path).unwrap();
        let memory = LazyModel::from_model(Model::load(path).unwrap());
        let c = &lazy.config;
        let q = "model.layers.1.self_attn.o_proj.weight";
        assert!(lazy.fp8(q).unwrap().is_some(), "{model}: {q} is read as FP8");
        assert!(lazy.fp8("model.norm.weight").unwrap().is_none());
        let mut overlay = Overlay::default();
        overlay.set(q, 5, 0.75f32.to_bits(), || Ok(0)).unwrap();
        for dtype in [WeightDtype::Bf16, WeightDtype::F16, WeightDtype::F32] {
            for l in 0..c.num_layers {
                let layout = SlotLayout::new(c, l, dtype);
                let parts = std::iter::once(LayerPart::Whole)
                    .chain((0..layout.experts()).map(LayerPart::Expert));
                for part in parts {
                    let at = format!("{model} {dtype:?} layer {l} {part:?}");
                    let got = stage_part(&lazy, l, &layout, part, &overlay).unwrap();
                    let want = stage_part(&memory, l, &layout, part, &overlay).unwrap();
                    assert!(got.bytes == want.bytes, "{at}: staged bytes differ");
                    assert!(got.converted > 0, "{at}: FP8 weights converted");
                }
            }
        }
    }
    // Scales that put a weight past f16's range: f16 slots are refused naming the tensor, as
    // converting its f32 values is; bf16 slots hold it.
    let dir = tempfile::tempdir().unwrap();
    write_fp8("deepseek_v3", dir.path(), |_| {}, None);
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let big = "model.layers.0.mlp.down_proj.weight";
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let mut data = t.data().to_vec();
            if name == format!("{big}_scale_inv") {
                data = data.chunks(4).flat_map(|_| 1e6f32.to_le_bytes()).collect();
            }
            (name, t.dtype(), t.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let path = dir.path().to_str().unwrap();
    let lazy = LazyModel::open(path).unwrap();
    let memory = LazyModel::from_model(Model::load(path).unwrap());
    let overlay = Overlay::default();
    let f16 = SlotLayout::new(&lazy.config, 0, WeightDtype::F16);
    let got = stage_part(&lazy, 0, &f16, LayerPart::Whole, &overlay).unwrap_err().to_string();
    let want = stage_part(&memory, 0, &f16, LayerPart::Whole, &overlay).unwrap_err().to_string();
    assert!(got.contains(big) && got.contains("65504"), "{got}");
    assert!(want.contains(big), "{want}");
    let bf16 = SlotLayout::new(&lazy.config, 0, WeightDtype::Bf16);
    let got = stage_part(&lazy, 0, &bf16, LayerPart::Whole, &overlay).unwrap();
    assert!(got.bytes == stage_part(&memory, 0, &bf16, LayerPart::Whole, &overlay).unwrap().bytes);
}

/// A checkpoint whose config gives no block, a block that does not match the scales, a bad
/// block, or a weight without its scales is refused naming the directory and the tensor.
#[test]
fn fp8_without_usable_scales_is_refused() {
    let q = "model.layers.0.self_attn.q_proj.weight";
    // (case, the config's weight_block_size when changed, a weight left without scales,
    // what the error says)
    let null = serde_json::Value::Null;
    let cases = [
        ("no block", Some(null), None, "weight_block_size"),
        ("other block", Some(serde_json::json!([32, 32])), None, "has shape"),
        ("bad block", Some(serde_json::json!([0, 16])), None, "two positive integers"),
        ("no scales", None, Some(q), "lacks"),
    ];
    for (what, block, drop, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let edit = |c: &mut serde_json::Value| {
            if let Some(b) = &block {
                c["quantization_config"]["weight_block_size"] = b.clone();
            }
        };
        write_fp8("deepseek_v3", dir.path(), edit, drop);
        let path = dir.path().to_str().unwrap();
        let eager = Model::load(path).err().expect("refused").to_string();
        let lazy = match LazyModel::open(path) {
            Ok(l) => l.tensor(q).expect_err("refused").to_string(),
            Err(e) => e.to_string(),
        };
        for e in [eager, lazy] {
            assert!(e.contains(path) && e.contains(want), "{what}: {e}");
            if what != "bad block" {
                assert!(e.contains("_proj.weight"), "{what}: names the tensor: {e}");
            }
        }
    }
}
