//! The catalog of published super weights, shipped as data (`data/catalog.json`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const CATALOG_JSON: &str = include_str!("../data/catalog.json");

/// One published finding: a model, its super weight coordinates, and the source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Hugging Face hub id.
    pub model: String,
    /// Other names the model goes by (matched case-insensitively).
    pub aliases: Vec<String>,
    /// `(layer, row, col)` of `down_proj.weight`, HF layout.
    pub coordinates: Vec<[usize; 3]>,
    /// Where the coordinates were published.
    pub source: String,
}

#[derive(Deserialize)]
struct CatalogFile {
    entries: Vec<Entry>,
}

/// All catalog entries.
pub fn entries() -> Result<Vec<Entry>> {
    let f: CatalogFile = serde_json::from_str(CATALOG_JSON)
        .map_err(|e| Error::Json { path: "data/catalog.json".into(), source: e })?;
    Ok(f.entries)
}

fn normalize(s: &str) -> String {
    s.to_ascii_lowercase().replace(['_', ' '], "-")
}

/// The entries for a model known by any of `names` (hub id, directory name, GGUF
/// `general.name`, ...). A name matches an entry when it equals the hub id, ends with its
/// last component, or equals an alias (case-insensitive, `_`/space as `-`).
pub fn lookup(names: &[&str]) -> Result<Vec<Entry>> {
    let names: Vec<String> = names.iter().map(|n| normalize(n)).collect();
    Ok(entries()?
        .into_iter()
        .filter(|e| {
            let id = normalize(&e.model);
            let last = id.rsplit('/').next().unwrap_or(&id).to_string();
            names.iter().any(|n| {
                *n == id
                    || n.rsplit('/').next() == Some(last.as_str())
                    || e.aliases.iter().any(|a| normalize(a) == *n)
            })
        })
        .collect())
}

/// How a detected coordinate relates to the catalog of its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Agreement {
    /// The catalog lists this exact coordinate.
    Matches,
    /// The catalog lists the model but not this coordinate.
    Contradicts,
    /// The model is not in the catalog.
    Unknown,
}

/// Compare a detected `(layer, row, col)` with the entries found for its model.
pub fn agreement(entries: &[Entry], layer: usize, row: usize, col: usize) -> Agreement {
    if entries.is_empty() {
        Agreement::Unknown
    } else if entries.iter().any(|e| e.coordinates.contains(&[layer, row, col])) {
        Agreement::Matches
    } else {
        Agreement::Contradicts
    }
}
