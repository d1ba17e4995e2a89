//! Shared test helpers: fixture paths and the real model (skipped when absent).
#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Read and parse a JSON fixture.
pub fn json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (`$SWK_TEST_MODEL` or `.models/`), or `None`
/// with a message saying how to fetch it.
pub fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("SWK_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: real model not found at {} (run scripts/fetch-models.sh or set SWK_TEST_MODEL)",
            p.display()
        );
        None
    }
}

/// The loaded SmolLM2 model, shared by the tests of one binary.
pub fn smollm2_model() -> Option<&'static swk::Model> {
    use std::sync::OnceLock;
    static MODEL: OnceLock<Option<swk::Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            smollm2()
                .map(|p| swk::Model::load(p.to_str().expect("utf-8 path")).expect("load SmolLM2"))
        })
        .as_ref()
}

/// Largest |a - b| / max(|b|, floor) over two slices.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(floor)).fold(0.0, f32::max)
}
