//! Text data sets for perplexity: WikiText-2 from the Hugging Face cache, or a local file.
//!
//! `wikitext` is the test split of `wikitext-2-raw-v1`, read from the parquet file
//! [`WIKITEXT2_TEST`] of the hub data set `Salesforce/wikitext` through the hf-hub cache. Its
//! rows (lines of the articles, each already ending in `"\n"`, blank lines as empty rows) are
//! joined with `"\n\n"`, as the Hugging Face perplexity guide and GPTQ do to produce the
//! WikiText-2 perplexities papers report (Yu et al. among them); lm-eval's `wikitext` task
//! instead scores documents of `EleutherAI/wikitext_document_level` one at a time.

use std::path::Path;

use hf_hub::Cache;

use crate::{Error, Result};

/// One file of a hub data set repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubFile {
    /// The data set repository, `org/name`.
    pub repo: &'static str,
    /// The file's path inside it.
    pub file: &'static str,
}

/// WikiText-2 (raw), test split.
pub const WIKITEXT2_TEST: HubFile =
    HubFile { repo: "Salesforce/wikitext", file: "wikitext-2-raw-v1/test-00000-of-00001.parquet" };

/// Named text data sets `--dataset` accepts.
pub const TEXT_DATASETS: &[(&str, HubFile)] = &[("wikitext", WIKITEXT2_TEST)];

/// The text of `spec`: a named data set ([`TEXT_DATASETS`]) from `cache` (fetched when
/// missing and `allow_download`), or a local file: `.parquet` or `.jsonl` (its `text`
/// column, joined as WikiText's rows are) or any other file read as UTF-8 text.
pub fn load_text_in(cache: &Cache, spec: &str, allow_download: bool) -> Result<String> {
    let path = Path::new(spec);
    if path.is_file() {
        return read_text_file(path);
    }
    let Some((_, hub)) = TEXT_DATASETS.iter().find(|(n, _)| n.eq_ignore_ascii_case(spec)) else {
        let names: Vec<&str> = TEXT_DATASETS.iter().map(|(n, _)| *n).collect();
        return Err(Error::Invalid(format!(
            "--dataset {spec}: no such file, and not a known data set ({})",
            names.join(", ")
        )));
    };
    let p = crate::io::hub::dataset_file_in(cache, hub.repo, hub.file, allow_download)?;
    read_text_file(&p)
}

/// [`load_text_in`] through the default cache (`HF_HOME`), downloading unless
/// `HF_HUB_OFFLINE=1`.
pub fn load_text(spec: &str) -> Result<String> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    load_text_in(&Cache::from_env(), spec, !offline)
}

/// The text of a local file: rows of `.parquet`/`.jsonl` joined with [`join_rows`], anything
/// else as UTF-8 text.
pub fn read_text_file(path: &Path) -> Result<String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let rows = match ext.as_str() {
        "parquet" => crate::io::parquet::read_rows(path)?,
        "jsonl" => crate::io::jsonl::read_rows(path)?,
        _ => return std::fs::read_to_string(path).map_err(|e| Error::io(path, e)),
    };
    join_rows(&rows).map_err(|msg| Error::format(path, msg))
}

/// The `text` field of every row joined with `"\n\n"`; an error names the first row without
/// a string `text`.
pub fn join_rows(rows: &[serde_json::Value]) -> std::result::Result<String, String> {
    let texts = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                format!("row {i} has no string column `text` (columns: {})", columns(r))
            })
        })
        .collect::<std::result::Result<Vec<&str>, String>>()?;
    if texts.is_empty() {
        return Err("no rows".into());
    }
    Ok(texts.join("\n\n"))
}

/// The keys of a JSON object, comma-separated (for error messages).
pub fn columns(row: &serde_json::Value) -> String {
    row.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
}
