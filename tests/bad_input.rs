//! Bad input gets a clear error naming the file and the problem — never a panic.

mod common;

use std::path::Path;

use swk::Model;

/// A minimal GGUF v3 writer for tests: string/u32/f32 metadata and tensors of raw bytes.
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

impl Gguf {
    fn new() -> Self {
        Gguf { kv: Vec::new(), n_kv: 0, infos: Vec::new(), data: Vec::new(), n_tensors: 0 }
    }
    fn string(mut self, k: &str, v: &str) -> Self {
        put_str(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        put_str(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn u32(mut self, k: &str, v: u32) -> Self {
        put_str(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    /// A tensor with dims (fastest first), GGML type id and raw bytes.
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> Self {
        put_str(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        while self.data.len() % 32 != 0 {
            self.data.push(0);
        }
        self.n_tensors += 1;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(&self.data);
        b
    }
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

fn load_err(path: &str) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{path}: loaded, expected an error"),
        Err(e) => e.to_string(),
    }
}

fn base_gguf() -> Gguf {
    Gguf::new()
        .string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 8)
        .u32("llama.feed_forward_length", 16)
        .u32("llama.attention.head_count", 2)
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let g = base_gguf().tensor("token_embd.weight", &[8, 32], 0, &f32_bytes(256));
    let bytes = g.bytes();
    for cut in [2, 10, 40, bytes.len() - 100] {
        let p = write(dir.path(), &format!("cut{cut}.gguf"), &bytes[..cut]);
        let e = load_err(&p);
        assert!(e.contains(&p), "error names the file: {e}");
        assert!(
            e.contains("truncated") || e.contains("too short") || e.contains("past the end"),
            "{e}"
        );
    }
}

#[test]
fn gguf_tensor_size_that_does_not_fit_its_type() {
    let dir = tempfile::tempdir().unwrap();
    // 7 elements of Q4_0 (type 2) is not a whole number of 32-element blocks.
    let g = base_gguf().tensor("token_embd.weight", &[7], 2, &[0u8; 18]);
    let p = write(dir.path(), "badsize.gguf", &g.bytes());
    let e = load_err(&p);
    assert!(e.contains(&p) && e.contains("token_embd.weight") && e.contains("Q4_0"), "{e}");
}

/// A tensor whose type or offset was changed no longer follows the one before it: refused,
/// as llama.cpp refuses it, instead of read from another tensor's bytes.
#[test]
fn gguf_tensors_out_of_their_packed_order() {
    let dir = tempfile::tempdir().unwrap();
    let g = base_gguf().tensor("token_embd.weight", &[8, 32], 0, &f32_bytes(256)).tensor(
        "output_norm.weight",
        &[8],
        0,
        &f32_bytes(8),
    );
    let good = g.bytes();
    let p = write(dir.path(), "good.gguf", &good);
    let f = swk::io::gguf::GgufFile::open(Path::new(&p)).unwrap();
    assert_eq!(f.tensors[1].offset, 1024);

    // The embedding's type F32 (0) made F16 (1): it ends at 512, the next one starts at 1024.
    let mut b = good.clone();
    let name = b"token_embd.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    assert_eq!(b[at], 0);
    b[at] = 1;
    let p = write(dir.path(), "retyped.gguf", &b);
    let e = load_err(&p);
    assert!(
        e.contains(&p)
            && e.contains("`output_norm.weight` starts at data offset 1024")
            && e.contains("end at 512"),
        "{e}"
    );

    // The second tensor's offset moved back onto the first one's bytes.
    let mut b = good;
    let name = b"output_norm.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8 + 4;
    b[at..at + 8].copy_from_slice(&512u64.to_le_bytes());
    let p = write(dir.path(), "moved.gguf", &b);
    let e = load_err(&p);
    assert!(e.contains(&p) && e.contains("starts at data offset 512"), "{e}");
}

/// One expert of a stacked GGUF tensor dequantizes alone to its slice of the whole stack, in
/// block formats of 32 and 256 elements; parts that split a block, or a part past the last,
/// are refused naming the file and the tensor.
#[test]
fn gguf_stack_parts_dequantize_alone() {
    use swk::io::gguf::GgufFile;
    use swk::io::quant::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::F16] {
        let raw = std::fs::read(common::fixture(&format!("quant/{}.bin", ty.name()))).unwrap();
        let bs = ty.block_size().max(8);
        let bytes = &raw[..ty.bytes_for(4 * bs).unwrap()];
        // Four experts of [1, bs] each (ggml dims fastest first).
        let g =
            base_gguf().tensor("blk.0.ffn_down_exps.weight", &[bs as u64, 1, 4], ty.id(), bytes);
        let p = write(dir.path(), &format!("{}.gguf", ty.name()), &g.bytes());
        let f = GgufFile::open(&p).unwrap();
        let t = f.tensor("blk.0.ffn_down_exps.weight").unwrap();
        let whole = f.dequantize(t).unwrap();
        for x in 0..4 {
            let part = f.dequantize_part(t, x, 4).unwrap();
            assert!(part == whole[x * bs..(x + 1) * bs], "{} expert {x}", ty.name());
        }
        assert_eq!(f.dequantize_part(t, 1, 2).unwrap(), whole[2 * bs..]);
        for (part, parts) in [(4, 4), (0, 3), (0, 0), (0, 4 * bs / 4 * 8)] {
            let e = f.dequantize_part(t, part, parts).unwrap_err().to_string();
            assert!(
                e.contains(&p) && e.contains("ffn_down_exps") && e.contains("parts"),
                "{} part {part} of {parts}: {e}",
                ty.name()
            );
        }
    }
}

#[test]
fn gguf_unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let g = base_gguf().tensor("token_embd.weight", &[8, 4], 99, &f32_bytes(32));
    let p = write(dir.path(), "dtype.gguf", &g.bytes());
    let e = load_err(&p);
    assert!(e.contains(&p) && e.contains("unknown GGML type id 99"), "{e}");
}

#[test]
fn gguf_bad_magic_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "magic.gguf", b"GGML\x03\x00\x00\x00");
    assert!(load_err(&p).contains("bad magic"));
    let mut b = base_gguf().bytes();
    b[4] = 9;
    let p = write(dir.path(), "version.gguf", &b);
    assert!(load_err(&p).contains("version 9"));
}

#[test]
fn gguf_unknown_architecture_lists_supported() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::new().string("general.architecture", "mamba").tensor(
        "token_embd.weight",
        &[8, 4],
        0,
        &f32_bytes(32),
    );
    let p = write(dir.path(), "arch.gguf", &g.bytes());
    let e = load_err(&p);
    assert!(e.contains(&p) && e.contains("mamba") && e.contains("llama, mistral, qwen2"), "{e}");
}

#[test]
fn gguf_missing_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::new().string("general.architecture", "llama").u32("llama.block_count", 1).tensor(
        "token_embd.weight",
        &[8, 4],
        0,
        &f32_bytes(32),
    );
    let p = write(dir.path(), "meta.gguf", &g.bytes());
    let e = load_err(&p);
    assert!(e.contains(&p) && e.contains("llama.embedding_length"), "{e}");
}

/// A copy of the tiny llama fixture directory, to corrupt.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::fixture("tiny/llama").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn safetensors_header_that_lies() {
    let dir = tiny_copy();
    let p = dir.path().join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    // Claim a header longer than the file.
    let lie = (b.len() as u64 * 2).to_le_bytes();
    b[..8].copy_from_slice(&lie);
    std::fs::write(&p, &b).unwrap();
    let e = load_err(dir.path().to_str().unwrap());
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");

    // A header whose offsets promise more data than there is: truncate the data section.
    let dir = tiny_copy();
    let p = dir.path().join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 64]).unwrap();
    let e = load_err(dir.path().to_str().unwrap());
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
}

#[test]
fn config_missing_a_field() {
    let dir = tiny_copy();
    let p = dir.path().join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, j.to_string()).unwrap();
    let e = load_err(dir.path().to_str().unwrap());
    assert!(e.contains("config.json") && e.contains("missing field `hidden_size`"), "{e}");
}

#[test]
fn config_unknown_architecture() {
    let dir = tiny_copy();
    let p = dir.path().join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j["model_type"] = "rwkv".into();
    j["architectures"] = serde_json::json!(["RwkvForCausalLM"]);
    std::fs::write(&p, j.to_string()).unwrap();
    let e = load_err(dir.path().to_str().unwrap());
    assert!(
        e.contains("config.json") && e.contains("rwkv") && e.contains("supported: llama"),
        "{e}"
    );
}

#[test]
fn weights_with_wrong_shape() {
    let dir = tiny_copy();
    let p = dir.path().join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j["intermediate_size"] = 161.into();
    std::fs::write(&p, j.to_string()).unwrap();
    let e = load_err(dir.path().to_str().unwrap());
    assert!(e.contains("mlp") && e.contains("expected shape"), "{e}");
}

#[test]
fn missing_model_and_bad_hub_cache() {
    let e = load_err("/nonexistent/model.gguf");
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    // A hub id absent from an empty cache, downloads off: a clear error naming the cache.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
    let e = swk::io::hub::resolve_in(&cache, "nobody/nothing", false).unwrap_err().to_string();
    assert!(e.contains("nobody/nothing") && e.contains("not in the Hugging Face cache"), "{e}");
}

/// The hub cache layout (`models--org--name/snapshots/REV/...` with `refs/main`) resolves to
/// the snapshot directory, which then loads.
#[test]
fn hub_cache_lookup() {
    let cache_dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = ["config.json", "model.safetensors", "tokenizer.json"]
        .into_iter()
        .map(|f| (f, std::fs::read(common::fixture("tiny/llama").join(f)).unwrap()))
        .collect();
    let snap = common::hub_model_cache(cache_dir.path(), "tiny/llama", &files);
    let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
    let dir = swk::io::hub::resolve_in(&cache, "tiny/llama", false).unwrap();
    assert_eq!(dir, snap);
    let m = Model::load(dir.to_str().unwrap()).unwrap();
    assert_eq!(m.config.num_layers, 2);
}
