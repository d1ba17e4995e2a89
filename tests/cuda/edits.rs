//! In-place device edits through the restore log, one by one and batched.

use super::*;

/// Edits through EditGuard on device memory: applied, visible to the forward pass, equal to
/// the same edits on the CPU, and restored bit-exactly (device checksum) when the guard drops.
#[test]
fn device_edits_restore_bit_exactly() {
    if !gpu() {
        return;
    }
    let m = medium();
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 101 + 7) % 1000).collect();
    let edits = medium_edits();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let host = rounded_to(&m, dtype);
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        assert_eq!(before, CudaModel::expected_checksum(&m, dtype).unwrap());
        let clean = g.logits(&tokens).unwrap();
        {
            let mut guard = EditGuard::new(&mut g);
            guard.apply_all(&edits).unwrap();
            for (r, e) in guard.log().iter().zip(&edits) {
                let now = f32::from_bits(guard.read_bits(&e.tensor, r.flat).unwrap());
                let stored = if e.tensor.ends_with("layernorm.weight") {
                    r.new
                } else {
                    f32::from_bits(dtype.stored_bits(r.new).unwrap())
                };
                assert_eq!(now.to_bits(), stored.to_bits(), "{e}");
            }
            assert_ne!(guard.checksum().unwrap(), before);
            let edited = guard.logits(&tokens).unwrap();
            assert_ne!(edited, clean, "the edits change the output");
            // The same weights on the CPU (the values the device stored: bf16-rounded there)
            // give the same logits.
            let stored: Vec<WeightEdit> = guard
                .log()
                .iter()
                .map(|r| {
                    let v = f32::from_bits(guard.read_bits(&r.edit.tensor, r.flat).unwrap());
                    WeightEdit::new(r.edit.tensor.clone(), &r.edit.index, EditOp::Set(v))
                })
                .collect();
            let mut cpu = host;
            let want = swk::edit::with_edits(&mut cpu, &stored, |m| m.logits(&tokens)).unwrap();
            let err = max_rel_err(&edited, &want, 1.0);
            assert!(err <= 1e-4, "{}: edited logits differ from the CPU's by {err}", dtype.name());
            // A failing edit (out of range) leaves the earlier ones logged for restore.
            assert!(guard.apply(&WeightEdit::down_proj(0, 10_000, 0, EditOp::Zero)).is_err());
        }
        assert_eq!(g.checksum().unwrap(), before, "{}: restored bit-exactly", dtype.name());
        assert_eq!(
            g.logits(&tokens).unwrap(),
            clean,
            "{}: same logits after restore",
            dtype.name()
        );
        // Tensors the forward pass does not read are refused, not silently ignored.
        assert!(g.shape_of("model.layers.0.self_attn.rotary_emb.inv_freq").is_err());
    }
}

/// Batched edits (`apply_all`: one gather and one scatter launch per run of one tensor; one
/// download and one upload per block edit) leave the device weights exactly as the same edits
/// leave the CPU's: a whole down_proj zeroed element by element, scales that hit elements
/// repeatedly, a norm weight, a row and whole tensors as block edits, and elements of
/// tensors that share a device buffer. The logs agree bit for bit (as stored), and restore
/// is bit-exact.
#[test]
fn batched_device_edits_match_the_cpu() {
    if !gpu() {
        return;
    }
    let m = medium();
    let (name, cols) = ("model.layers.1.mlp.down_proj.weight", 704);
    let mut edits: Vec<WeightEdit> = (0..256 * cols)
        .map(|f| WeightEdit::new(name, &[f / cols, f % cols], EditOp::Zero))
        .collect();
    edits.extend(
        (0..300).map(|k| WeightEdit::down_proj(2, k % 7, (k * 13) % 20, EditOp::Scale(-2.0))),
    );
    edits.push(WeightEdit::new("model.layers.0.input_layernorm.weight", &[3], EditOp::Scale(40.0)));
    // Block edits (a download and an upload each), overlapping element edits.
    edits.push(WeightEdit::block("model.layers.2.mlp.down_proj.weight", &[3], EditOp::Scale(0.25)));
    edits.push(WeightEdit::down_proj(2, 3, 5, EditOp::Set(7.0)));
    edits.push(WeightEdit::block("model.layers.0.mlp.up_proj.weight", &[], EditOp::Scale(-2.0)));
    edits.push(WeightEdit::block(
        "model.layers.0.post_attention_layernorm.weight",
        &[],
        EditOp::Zero,
    ));
    // Tensors that share a device buffer with others (a layer's q/k/v, gate/up), at an
    // offset into it: a batch of element edits, and a single one.
    let k_proj = "model.layers.1.self_attn.k_proj.weight";
    edits.extend(
        (0..40).map(|k| WeightEdit::new(k_proj, &[k % 9, (k * 7) % 50], EditOp::Scale(-2.0))),
    );
    edits.push(WeightEdit::new(
        "model.layers.2.self_attn.v_proj.weight",
        &[1, 2],
        EditOp::Set(3.5),
    ));
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let mut host = rounded_to(&m, dtype);
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        {
            let mut guard = EditGuard::new(&mut g);
            let mut cpu = EditGuard::new(&mut host);
            guard.apply_all(&edits).unwrap();
            cpu.apply_all(&edits).unwrap();
            let want = CudaModel::expected_checksum(&cpu, dtype).unwrap();
            assert_eq!(guard.checksum().unwrap(), want, "{}: edited weights", dtype.name());
            assert_eq!(guard.log().len(), cpu.log().len());
            // The CPU keeps what it writes in f32, the device rounds bf16 and f16 matrices:
            // compare the logs as the device stores them. (Scales by powers of two commute
            // with that rounding, so repeated edits of one element agree too.)
            let stored = |t: &str, b: u32| -> u32 {
                if t.ends_with("layernorm.weight") {
                    b
                } else {
                    dtype.stored_bits(f32::from_bits(b)).unwrap()
                }
            };
            for (a, b) in guard.log().iter().zip(cpu.log()) {
                let t = &a.edit.tensor;
                let cpu_block: Vec<u32> = b.block_bits.iter().map(|&x| stored(t, x)).collect();
                assert_eq!(a.block_bits, cpu_block, "{}: block log of {}", dtype.name(), a.edit);
                let (a, b) = (
                    (a.flat, a.len, a.original_bits, stored(t, a.new.to_bits())),
                    (b.flat, b.len, stored(t, b.original_bits), stored(t, b.new.to_bits())),
                );
                assert_eq!(a, b, "{}: log", dtype.name());
            }
            assert_eq!(guard.restore_all().unwrap(), edits.len());
        }
        assert_eq!(g.checksum().unwrap(), before, "{}: restored bit-exactly", dtype.name());
    }
}
