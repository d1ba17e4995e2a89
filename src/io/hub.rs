//! Hugging Face hub ids (`org/name`), resolved through hf-hub's local cache, downloading when
//! the network allows; data set files likewise.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// Whether `s` looks like a hub id rather than a local path: `org/name`, no such local path.
pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
        && !Path::new(s).exists()
}

/// Files swk needs from a model repository, in order of need.
const WANTED: &[&str] =
    &["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];

/// Resolve a hub id to a local snapshot directory holding `config.json` and the safetensors
/// files, using `cache` (e.g. `Cache::from_env()`, which honours `HF_HOME`). When files are
/// missing from the cache and `allow_download` is set, fetch them with the hub API.
pub fn resolve_in(cache: &Cache, id: &str, allow_download: bool) -> Result<PathBuf> {
    let repo = cache.repo(Repo::model(id.to_string()));
    if let Some(config) = repo.get("config.json") {
        let dir = config
            .parent()
            .ok_or_else(|| Error::NotFound { id: id.into(), msg: "bad cache layout".into() })?
            .to_path_buf();
        if dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file()
        {
            return Ok(dir);
        }
    }
    if !allow_download {
        return Err(Error::NotFound {
            id: id.into(),
            msg: format!(
                "not in the Hugging Face cache at {} (set HF_HOME, or allow downloads)",
                cache.path().display()
            ),
        });
    }
    download(cache, id)
}

/// Resolve through the default cache (`HF_HOME` or `~/.cache/huggingface`), downloading
/// unless `HF_HUB_OFFLINE=1`.
pub fn resolve(id: &str) -> Result<PathBuf> {
    resolve_in(&Cache::from_env(), id, downloads_allowed())
}

/// Whether the environment allows downloads (`HF_HUB_OFFLINE` is not `1` or `true`).
fn downloads_allowed() -> bool {
    !std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true")
}

/// A hub id's `config.json` alone, through `cache`: the cached one, else (when
/// `allow_download`) that one file fetched, weights untouched. For sizing a model before
/// downloading it (`swk info --config-only`).
pub fn config_in(cache: &Cache, id: &str, allow_download: bool) -> Result<PathBuf> {
    if let Some(p) = cache.repo(Repo::model(id.to_string())).get("config.json") {
        return Ok(p);
    }
    if !allow_download {
        return Err(Error::NotFound {
            id: id.into(),
            msg: format!(
                "no config.json in the Hugging Face cache at {} (set HF_HOME, or allow downloads)",
                cache.path().display()
            ),
        });
    }
    let fail = |e: &dyn std::fmt::Display| Error::NotFound {
        id: id.into(),
        msg: format!("config.json is not in the local cache and the hub could not be reached: {e}"),
    };
    let api =
        hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).build().map_err(|e| fail(&e))?;
    api.model(id.to_string()).get("config.json").map_err(|e| fail(&e))
}

/// [`config_in`] through the default cache, downloading unless `HF_HUB_OFFLINE=1`.
pub fn config(id: &str) -> Result<PathBuf> {
    config_in(&Cache::from_env(), id, downloads_allowed())
}

fn download(cache: &Cache, id: &str) -> Result<PathBuf> {
    let fail = |e: &dyn std::fmt::Display| Error::NotFound {
        id: id.into(),
        msg: format!("not in the local cache and the hub could not be reached: {e}"),
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| fail(&e))?;
    let repo = api.model(id.to_string());
    let config = repo.get(WANTED[0]).map_err(|e| fail(&e))?;
    for f in &WANTED[1..] {
        let _ = repo.get(f); // optional files
    }
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            let index = repo.get("model.safetensors.index.json").map_err(|e| fail(&e))?;
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let j: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Json { path: index.clone(), source: e })?;
            let mut shards: Vec<&str> = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                repo.get(s).map_err(|e| fail(&e))?;
            }
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::NotFound { id: id.into(), msg: "bad cache layout".into() })
}

/// Resolve one file of a hub *data set* repository (`repo`, e.g. `Salesforce/wikitext`;
/// `file`, its path in the repository) through `cache`, fetching it when it is missing and
/// `allow_download` is set. The error names the repository, the file, the cache and how to
/// get the file.
pub fn dataset_file_in(
    cache: &Cache,
    repo: &str,
    file: &str,
    allow_download: bool,
) -> Result<PathBuf> {
    if let Some(p) = cache.repo(Repo::new(repo.to_string(), RepoType::Dataset)).get(file) {
        return Ok(p);
    }
    let missing = |why: String| Error::Dataset {
        repo: repo.into(),
        file: file.into(),
        msg: format!(
            "{why}; the Hugging Face cache is {} (set HF_HOME to another). Fetch it with \
             `huggingface-cli download --repo-type dataset {repo} {file}` on a machine with \
             network access and copy the cache, or pass a local file instead",
            cache.path().display()
        ),
    };
    if !allow_download {
        return Err(missing("not in the Hugging Face cache and downloads are off".into()));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| missing(format!("not in the cache and the hub client failed: {e}")))?;
    api.dataset(repo.to_string())
        .get(file)
        .map_err(|e| missing(format!("not in the cache and the hub could not be reached: {e}")))
}

/// [`dataset_file_in`] for a file whose path in the repository may differ from `file` (data
/// set mirrors lay their parquet files out as they please): when `file` is neither in the
/// cache nor listed on the hub, the repository's parquet file of split `split` is used (the
/// first by path among those whose path names the split, e.g.
/// `plain_text/validation-00000-of-00001.parquet`), from the cache or, when `allow_download`,
/// from the hub's file list. The error names what was looked for and the parquet files found.
pub fn dataset_split_file_in(
    cache: &Cache,
    repo: &str,
    file: &str,
    split: &str,
    allow_download: bool,
) -> Result<PathBuf> {
    if let Ok(p) = dataset_file_in(cache, repo, file, false) {
        return Ok(p);
    }
    let snapshots = cache.path().join(format!("datasets--{}", repo.replace('/', "--")));
    let mut cached = Vec::new();
    parquet_files(&snapshots.join("snapshots"), &mut cached);
    let cached: Vec<(String, PathBuf)> = cached
        .into_iter()
        .filter_map(|p| {
            // snapshots/<revision>/<path in the repository>
            let rel = p.strip_prefix(snapshots.join("snapshots")).ok()?;
            let rel: PathBuf = rel.components().skip(1).collect();
            Some((rel.to_string_lossy().replace('\\', "/"), p))
        })
        .collect();
    let names: Vec<String> = cached.iter().map(|(n, _)| n.clone()).collect();
    if let Some(pick) = split_file(&names, split) {
        if let Some((_, p)) = cached.into_iter().find(|(n, _)| *n == pick) {
            return Ok(p);
        }
    }
    if !allow_download {
        return dataset_file_in(cache, repo, file, false);
    }
    let fail = |msg: String| Error::Dataset { repo: repo.into(), file: file.into(), msg };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| fail(format!("not in the cache and the hub client failed: {e}")))?;
    let hub = api.dataset(repo.to_string());
    let listed: Vec<String> = hub
        .info()
        .map_err(|e| fail(format!("not in the cache and the hub could not be reached: {e}")))?
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let pick = if listed.iter().any(|n| n == file) {
        file.to_string()
    } else {
        split_file(&listed, split).ok_or_else(|| {
            let parquet: Vec<&str> =
                listed.iter().filter(|n| n.ends_with(".parquet")).map(String::as_str).collect();
            fail(format!(
                "the repository has no such file and no parquet file of split `{split}` (its \
                 parquet files: {}); pass a local file instead",
                if parquet.is_empty() { "none".to_string() } else { parquet.join(", ") }
            ))
        })?
    };
    hub.get(&pick).map_err(|e| fail(format!("the hub could not send `{pick}`: {e}")))
}

/// The first (by path) of the `.parquet` paths in `names` with `split` as one of the words of
/// its path (words split at `/`, `-`, `_` and `.`).
pub fn split_file(names: &[String], split: &str) -> Option<String> {
    let mut hits: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".parquet"))
        .filter(|n| n.split(['/', '-', '_', '.']).any(|w| w == split))
        .collect();
    hits.sort();
    hits.first().map(|n| n.to_string())
}

/// Every `.parquet` file under `dir`, recursively (none when `dir` is missing).
fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            parquet_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
}

/// [`dataset_file_in`] through the default cache (`HF_HOME` or `~/.cache/huggingface`),
/// downloading unless `HF_HUB_OFFLINE=1`.
pub fn dataset_file(repo: &str, file: &str) -> Result<PathBuf> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    dataset_file_in(&Cache::from_env(), repo, file, !offline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_file_is_the_first_parquet_naming_the_split() {
        let names: Vec<String> = [
            "README.md",
            "train-00000-of-00001.parquet",
            "plain_text/validation-00000-of-00001.parquet",
            "data/validation.parquet",
            "invalidation.parquet",
            "validation.jsonl",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(split_file(&names, "validation").as_deref(), Some("data/validation.parquet"));
        assert_eq!(split_file(&names, "train").as_deref(), Some("train-00000-of-00001.parquet"));
        assert_eq!(split_file(&names, "test"), None);
    }

    /// Offline, a cached parquet file of the split stands in for a guessed path; with none, the
    /// error names the repository, the file and the cache.
    #[test]
    fn a_cached_file_of_the_split_is_found_offline() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let e = dataset_split_file_in(&cache, "baber/piqa", "data/x.parquet", "validation", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("baber/piqa") && e.contains("data/x.parquet"), "{e}");
        let snap = dir.path().join("datasets--baber--piqa/snapshots/0123abc/plain_text");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("train-00000-of-00001.parquet"), b"PAR1").unwrap();
        std::fs::write(snap.join("validation-00000-of-00001.parquet"), b"PAR1").unwrap();
        let p = dataset_split_file_in(&cache, "baber/piqa", "data/x.parquet", "validation", false)
            .unwrap();
        assert_eq!(p, snap.join("validation-00000-of-00001.parquet"));
    }
}
