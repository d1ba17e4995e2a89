//! JSON Lines: one JSON value per line (blank lines skipped).

use std::path::Path;

use crate::{Error, Result};

/// Every value of the JSONL file at `path`; a bad line is reported with its line number.
pub fn read_rows(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text).map_err(|(line, e)| Error::format(path, format!("line {line}: {e}")))
}

/// Parse JSONL text; on failure, the 1-based line number and the JSON error.
pub fn parse(text: &str) -> std::result::Result<Vec<serde_json::Value>, (usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| (i + 1, e.to_string())))
        .collect()
}
