//! Corrupted copies of the tiny fixtures: bytes flipped or cut in GGUF files, hyper-parameters
//! changed in config.json and in GGUF metadata. Each must load and run, or fail with an error
//! naming the file; never panic, never hang on a size it declared, never give NaN logits from
//! a config swk accepted.

mod common;

use std::path::Path;

use swk::Model;

/// A seeded xorshift stream, so a failure names a case that can be run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Load `path`; when it loads, a three-token forward pass. The error text, or None when both
/// succeed with finite logits. Panics (failing the test) on NaN logits from an accepted model.
///
/// Also `swk info`'s path (headers only: open lazily, check the shapes against the config,
/// every tensor's stored dtype, the device memory plan): it must not panic, must name `path`
/// when it fails, and must not refuse a model that loads.
fn outcome(path: &Path, case: &str) -> Option<String> {
    let p = path.to_str().unwrap();
    let info = info_outcome(p);
    if let Some(e) = &info {
        assert!(e.contains(p), "{case}: swk info's error does not name the model: {e}");
    }
    let m = match Model::load(p) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    assert!(info.is_none(), "{case}: loads, but swk info refuses it: {info:?}");
    match m.logits(&[1, 2, 3]) {
        Ok(l) => {
            assert!(
                l.iter().all(|v| v.is_finite()),
                "{case}: accepted, but gives non-finite logits"
            );
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

/// What `swk info` does with `p` when it opens it lazily: the error text, or None.
fn info_outcome(p: &str) -> Option<String> {
    use swk::backend::memory::{check_shapes, MemoryPlan};
    use swk::backend::WeightDtype;
    let run = || -> swk::Result<()> {
        if !swk::model::LazyModel::can_open(p)? {
            return Ok(());
        }
        let lazy = swk::model::LazyModel::open(p)?;
        check_shapes(&lazy)?;
        for name in lazy.names() {
            lazy.source_dtype(name)?;
        }
        for dtype in [WeightDtype::Bf16, WeightDtype::F16, WeightDtype::F32] {
            let plan = MemoryPlan::new(&lazy.config, dtype);
            assert!(plan.pass_bytes(1) <= plan.whole_pass && plan.slot <= plan.resident);
        }
        Ok(())
    };
    run().err().map(|e| e.to_string())
}

/// A copy of fixture directory `tiny/{name}`, to corrupt.
fn fixture_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(common::fixture(&format!("tiny/{name}"))).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    dir
}

/// The offset of the value of metadata key `key` in a GGUF file's bytes, after checking that
/// its type is `ty`.
fn gguf_value_at(b: &[u8], key: &str, ty: u32) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = b.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("{key}"));
    let o = at + needle.len();
    assert_eq!(u32::from_le_bytes(b[o..o + 4].try_into().unwrap()), ty, "{key}'s type");
    o + 4
}

/// A copy of GGUF fixture `name` with metadata key `key` (of GGUF type `ty`) set to `value`.
fn patched_gguf(dir: &Path, name: &str, key: &str, ty: u32, value: &[u8]) -> std::path::PathBuf {
    let mut b = std::fs::read(common::fixture(&format!("tiny/{name}/model.gguf"))).unwrap();
    let o = gguf_value_at(&b, key, ty);
    b[o..o + value.len()].copy_from_slice(value);
    let p = dir.join(format!("{name}-{key}.gguf"));
    std::fs::write(&p, b).unwrap();
    p
}

/// Cut and flipped bytes in the metadata and tensor tables of GGUF files (dense, MoE, MLA),
/// and cuts anywhere: every load fails with an error naming the file, or loads a model that
/// runs. 600 cases per file.
#[test]
fn corrupt_gguf_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    let p_str = p.to_str().unwrap().to_string();
    for (name, seed) in [("qwen2_gguf", 1u64), ("qwen2_moe_gguf", 2), ("deepseek_v3_gguf", 3)] {
        let src = common::fixture(&format!("tiny/{name}/model.gguf"));
        let b = std::fs::read(&src).unwrap();
        let header = swk::io::gguf::GgufFile::open(&src).unwrap().data_start();
        assert!(header > 1000 && header < b.len(), "{name}: header of {header} bytes");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        for i in 0..600 {
            let case = if i < 100 {
                let cut = rng.below(b.len());
                std::fs::write(&p, &b[..cut]).unwrap();
                format!("{name} cut at {cut}")
            } else {
                let mut c = b.clone();
                let at = rng.below(header);
                c[at] = match i % 4 {
                    0 => 0xff,
                    1 => 0,
                    2 => c[at] ^ 0x80,
                    _ => c[at].wrapping_add(1),
                };
                std::fs::write(&p, &c).unwrap();
                format!("{name} byte {at} = {:#04x}", c[at])
            };
            if let Some(e) = outcome(&p, &case) {
                assert!(e.contains(&p_str), "{case}: the error does not name the file: {e}");
            }
        }
    }
}

/// Every numeric field of the configs of one model per family, set to values a hand edit or a
/// corrupt file could hold: each load fails naming config.json or the directory, or loads a
/// model whose logits are finite.
#[test]
fn config_values_out_of_range_are_refused_or_harmless() {
    let values: Vec<serde_json::Value> = vec![
        0.into(),
        1.into(),
        (-1).into(),
        7.into(),
        0.5.into(),
        1_000_000_000u64.into(),
        4_294_967_297u64.into(),
        serde_json::Value::Null,
        "x".into(),
    ];
    for name in ["llama", "gemma3", "gpt2", "olmoe", "qwen2_moe", "deepseek_v3"] {
        let dir = fixture_copy(name);
        let cfg = common::json(&format!("tiny/{name}/config.json"));
        let dir_str = dir.path().to_str().unwrap().to_string();
        for (key, v0) in cfg.as_object().unwrap() {
            if !v0.is_number() {
                continue;
            }
            for v in &values {
                let mut c = cfg.clone();
                c[key] = v.clone();
                std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
                let case = format!("{name}: `{key}` = {v}");
                if let Some(e) = outcome(dir.path(), &case) {
                    assert!(e.contains(&dir_str), "{case}: the error does not name the model: {e}");
                }
            }
        }
    }
}

/// A config declaring billions of layers is refused at once, naming the key (a mixture of
/// experts used to walk every declared layer looking for fused expert tensors, for minutes).
#[test]
fn absurd_layer_counts_are_refused() {
    let dir = fixture_copy("qwen2_moe");
    let mut c = common::json("tiny/qwen2_moe/config.json");
    c["num_hidden_layers"] = 4_294_967_297u64.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let e = Model::load(dir.path().to_str().unwrap()).err().expect("loaded").to_string();
    assert!(e.contains("config.json") && e.contains("`num_hidden_layers` = 4294967297"), "{e}");

    // The most layers allowed, two present: the first missing one is named, with the model.
    c["num_hidden_layers"] = swk::model::config::MAX_LAYERS.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let e = Model::load(dir.path().to_str().unwrap()).err().expect("loaded").to_string();
    let d = dir.path().to_str().unwrap();
    assert!(e.starts_with(d) && e.contains("`model.layers.2.") && e.contains("not found"), "{e}");

    let g = patched_gguf(
        dir.path(),
        "qwen2_moe_gguf",
        "qwen2moe.block_count",
        4,
        &u32::MAX.to_le_bytes(),
    );
    let e = Model::load(g.to_str().unwrap()).err().expect("loaded").to_string();
    assert!(
        e.contains(g.to_str().unwrap()) && e.contains("`qwen2moe.block_count` = 4294967295"),
        "{e}"
    );
}

/// A config declaring more routed experts than swk reads is refused naming the key, from
/// config.json (each family's key) and GGUF; at the limit, `swk info`'s path refuses a
/// config declaring more experts than the files hold tensors before sizing anything (it used
/// to build a plan of every declared expert: gigabytes for a billion).
#[test]
fn absurd_expert_counts_are_refused() {
    let max = swk::model::config::MAX_EXPERTS;
    for (name, key) in [
        ("mixtral", "num_local_experts"),
        ("olmoe", "num_experts"),
        ("deepseek_v3", "n_routed_experts"),
    ] {
        let dir = fixture_copy(name);
        let mut c = common::json(&format!("tiny/{name}/config.json"));
        c[key] = 1_000_000_000u64.into();
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let d = dir.path().to_str().unwrap();
        let e = Model::load(d).err().expect("loaded").to_string();
        assert!(e.contains("config.json") && e.contains(&format!("`{key}` = 1000000000")), "{e}");
        assert_eq!(info_outcome(d), Some(e), "{name}");
        if name == "deepseek_v3" {
            continue; // its experts come in groups: `max` is not a valid count there
        }
        c[key] = max.into();
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        // OLMoE's fused expert stacks already disagree with the count when opened.
        let e = info_outcome(d).expect("sized");
        let says = if name == "olmoe" {
            "expected shape".into()
        } else {
            format!("{max} experts a layer")
        };
        assert!(e.starts_with(d) && e.contains(&says), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let g = patched_gguf(
        dir.path(),
        "qwen2_moe_gguf",
        "qwen2moe.expert_count",
        4,
        &u32::MAX.to_le_bytes(),
    );
    let e = Model::load(g.to_str().unwrap()).err().expect("loaded").to_string();
    let g = g.to_str().unwrap();
    assert!(e.contains(g) && e.contains("`qwen2moe.expert_count` = 4294967295"), "{e}");
    assert_eq!(info_outcome(g), Some(e));
}

/// Real-valued hyper-parameters that would give NaN or panic are refused by name.
#[test]
fn bad_scalars_are_refused_by_name() {
    for (name, key, value, says) in [
        ("olmoe", "clip_qkv", -1.0, "clip_qkv must be a positive number"),
        ("llama", "rope_theta", 0.0, "rope theta must be a positive number"),
        ("llama", "rms_norm_eps", -1e-6, "norm epsilon must be 0 or more"),
        ("gemma2", "query_pre_attn_scalar", -1.0, "query_pre_attn_scalar must be a positive"),
        ("gemma2", "final_logit_softcapping", 0.0, "final logit softcapping must be a positive"),
    ] {
        let dir = fixture_copy(name);
        let mut c = common::json(&format!("tiny/{name}/config.json"));
        c[key] = value.into();
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let e = Model::load(dir.path().to_str().unwrap()).err().expect(key).to_string();
        assert!(e.contains("config.json") && e.contains(says), "{name} {key}: {e}");
    }

    let dir = tempfile::tempdir().unwrap();
    let g = patched_gguf(
        dir.path(),
        "gemma2_gguf",
        "gemma2.attention.scale",
        6,
        &(-1f32).to_le_bytes(),
    );
    let e = Model::load(g.to_str().unwrap()).err().expect("loaded").to_string();
    assert!(e.contains("`gemma2.attention.scale` = -1 must be a positive"), "{e}");
    // 0 is llama.cpp's "unset": the default scale, and the same logits as the fixture's own.
    let g =
        patched_gguf(dir.path(), "gemma2_gguf", "gemma2.attention.scale", 6, &0f32.to_le_bytes());
    let m = Model::load(g.to_str().unwrap()).unwrap();
    assert_eq!(m.config.family.query_pre_attn_scalar, Some(m.config.head_dim as f64));

    let g = patched_gguf(
        dir.path(),
        "deepseek_v3_gguf",
        "deepseek2.expert_gating_func",
        4,
        &7u32.to_le_bytes(),
    );
    let e = Model::load(g.to_str().unwrap()).err().expect("loaded").to_string();
    assert!(e.contains("`deepseek2.expert_gating_func` = 7 is not supported"), "{e}");
}
