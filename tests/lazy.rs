//! `LazyModel`: tensors read on demand equal `Model::load`'s, bit for bit, for every format.

mod common;

use common::fixture;
use swk::model::LazyModel;
use swk::Model;

/// Open `path` both ways and compare config, names, shapes and every tensor's bits.
fn same_as_eager(path: &str) {
    let eager = Model::load(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let lazy = LazyModel::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(lazy.config, eager.config, "{path}");
    assert_eq!(lazy.source.format, eager.source.format);
    assert_eq!(lazy.source.name, eager.source.name);
    let lazy_names: Vec<&str> = lazy.names().collect();
    let eager_names: Vec<&str> = eager.weights.names().collect();
    assert_eq!(lazy_names, eager_names, "{path}");
    let mut bytes = 0;
    for name in eager_names {
        let want = eager.weights.get(name).unwrap();
        assert_eq!(lazy.shape(name).unwrap(), want.shape.as_slice(), "{path} {name}");
        let got = lazy.tensor(name).unwrap();
        assert_eq!(got.shape, want.shape, "{path} {name}");
        assert_eq!(got.source_dtype, want.source_dtype, "{path} {name}");
        let same = got.data.iter().zip(&want.data).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same && got.data.len() == want.data.len(), "{path} {name}: values differ");
        bytes += 4 * want.data.len();
    }
    assert_eq!(lazy.f32_bytes(), bytes);
    let whole = lazy.materialize(|_| true).unwrap();
    assert_eq!(whole.weights.checksum(), eager.weights.checksum(), "{path}");
    let a = lazy.tokenizer.as_ref().map(|t| t.encode("Hello world", true).unwrap());
    let b = eager.tokenizer.as_ref().map(|t| t.encode("Hello world", true).unwrap());
    assert_eq!(a, b, "{path}");
}

#[test]
fn safetensors_fixtures_read_lazily_equal_eager_loading() {
    for name in [
        "llama",
        "llama3_rope",
        "llama_bf16",
        "llama_f16",
        "llama_sharded",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi3",
        "olmo",
        "olmo2",
    ] {
        same_as_eager(fixture(&format!("tiny/{name}")).to_str().unwrap());
    }
}

#[test]
fn gguf_fixtures_read_lazily_equal_eager_loading() {
    // Q/K unpermuting (mixtral, olmo), Gemma's `1 + w` norms, fused qkv (phi3, gpt2, neox),
    // stacked experts.
    for name in [
        "qwen2_gguf",
        "phi3_gguf",
        "olmo2_gguf",
        "gemma3_gguf",
        "mixtral_gguf",
        "qwen2_moe_gguf",
        "olmoe_gguf",
        "qwen3_moe_gguf",
        "deepseek_v2_gguf",
        "deepseek_v3_gguf",
        "gemma_gguf",
        "gemma2_gguf",
        "olmo_gguf",
        "gpt2_gguf",
        "gpt_neox_gguf",
    ] {
        let dir = fixture(&format!("tiny/{name}"));
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "gguf"))
            .unwrap_or_else(|| panic!("no .gguf in {}", dir.display()));
        same_as_eager(file.to_str().unwrap());
    }
}

#[test]
fn smollm2_q4_1_reads_lazily_equal_eager_loading() {
    let Some(path) = common::smollm2() else { return };
    let lazy = LazyModel::open(path.to_str().unwrap()).unwrap();
    let eager = common::smollm2_model().unwrap();
    assert_eq!(lazy.config, eager.config);
    // Opening reads no tensor data: it is fast and the names are all there.
    assert_eq!(lazy.names().count(), eager.weights.names().count());
    assert_eq!(lazy.layer_names(29).len(), 9);
    assert_eq!(lazy.layer_names(30).len(), 0);
    for l in [0, 3, 29] {
        for name in lazy.layer_names(l) {
            let got = lazy.tensor(name).unwrap();
            let want = eager.weights.get(name).unwrap();
            assert!(
                got.data.iter().zip(&want.data).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}"
            );
        }
    }
    let outside = lazy.materialize(|n| !n.starts_with("model.layers.")).unwrap();
    let names: Vec<&str> = outside.weights.names().collect();
    assert_eq!(names, ["model.embed_tokens.weight", "model.norm.weight"]);
}

#[test]
fn families_renamed_at_load_are_refused_clearly() {
    for name in ["gpt2", "gpt_neox", "gemma3"] {
        let dir = fixture(&format!("tiny/{name}"));
        let e = LazyModel::open(dir.to_str().unwrap()).err().expect("refused").to_string();
        assert!(e.contains(dir.to_str().unwrap()) && e.contains("GGUF"), "{e}");
    }
    let e = LazyModel::open("no/such/dir/here").err().expect("missing").to_string();
    assert!(e.contains("no/such/dir/here"), "{e}");
}

/// Mixtures of experts read lazily from safetensors under the names loading gives them:
/// Mixtral's `block_sparse_moe…w1/w3/w2` renamed, OLMoE's fused `gate_up_proj`/`down_proj`
/// cut per expert, the others as stored; each expert's stored bytes are its run of the
/// stored tensor, bit for bit what the f32 read gives.
#[test]
fn moe_safetensors_read_lazily_equal_eager_loading() {
    for name in ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"] {
        let dir = fixture(&format!("tiny/{name}"));
        let path = dir.to_str().unwrap();
        same_as_eager(path);
        let lazy = LazyModel::open(path).unwrap();
        let down = "model.layers.1.mlp.experts.2.down_proj.weight";
        let stored = lazy.stored(down).unwrap().expect("a safetensors tensor");
        let want = lazy.tensor(down).unwrap();
        assert_eq!(stored.shape, want.shape.as_slice(), "{name}");
        assert_eq!(stored.dtype, want.source_dtype, "{name}");
        let got: Vec<f32> = match stored.dtype {
            "F32" => {
                stored.bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            }
            "BF16" => stored
                .bytes
                .chunks(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            other => panic!("{name}: fixture dtype {other}"),
        };
        assert!(got == want.data, "{name}: stored bytes of {down}");
    }
}

/// A DeepSeek GGUF whose layer has attn_k_b twice and no attn_v_b is refused naming the
/// file, lazily as eagerly.
#[test]
fn split_kv_b_with_a_part_missing_is_refused() {
    let src = fixture("tiny/deepseek_v3_gguf/model.gguf");
    let mut bytes = std::fs::read(&src).unwrap();
    let (from, to) = (b"blk.1.attn_v_b.weight", b"blk.1.attn_k_b.weight");
    let at = bytes.windows(from.len()).position(|w| w == from).expect("attn_v_b in the fixture");
    bytes[at..at + to.len()].copy_from_slice(to);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let path = path.to_str().unwrap();
    let lazy = LazyModel::open(path).err().expect("refused").to_string();
    let eager = Model::load(path).err().expect("refused").to_string();
    for e in [lazy, eager] {
        assert!(e.contains(path) && e.contains("layer 1 has only one of attn_k_b"), "{e}");
    }
}

#[test]
fn unknown_tensors_are_errors_naming_them() {
    let lazy = LazyModel::open(fixture("tiny/llama").to_str().unwrap()).unwrap();
    let e = lazy.tensor("model.layers.9.mlp.down_proj.weight").err().unwrap().to_string();
    assert!(e.contains("model.layers.9.mlp.down_proj.weight"), "{e}");
    assert!(lazy.shape("nope").is_err());
    assert_eq!(lazy.layer_names(1).len(), 9);
}

#[test]
fn a_model_in_memory_reads_the_same() {
    let path = fixture("tiny/llama");
    let eager = Model::load(path.to_str().unwrap()).unwrap();
    let sum = eager.weights.checksum();
    let config = eager.config.clone();
    let lazy = LazyModel::from_model(eager);
    assert_eq!(lazy.config, config);
    assert_eq!(lazy.materialize(|_| true).unwrap().weights.checksum(), sum);
    assert_eq!(lazy.layer_names(0).len(), 9);
}
