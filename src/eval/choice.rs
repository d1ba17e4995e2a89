//! Zero-shot multiple-choice evaluation in lm-eval's log-likelihood protocol: HellaSwag,
//! ARC-Easy, ARC-Challenge and PIQA, or any items in a simple normalized schema.
//!
//! # Data
//!
//! Rows are read from JSONL or parquet and recognized by their fields:
//!
//! | schema | fields | context | choices |
//! |---|---|---|---|
//! | normalized | `context`, `choices` (strings), `label` (int) | as given | as given |
//! | HellaSwag | `activity_label`, `ctx_a`, `ctx_b`, `endings`, `label` | `preprocess(activity_label + ": " + ctx_a + " " + capitalize(ctx_b))` | `preprocess(ending)` |
//! | ARC | `question`, `choices: {text, label}`, `answerKey` | `"Question: " + question + "\nAnswer:"` | `choices.text` |
//! | PIQA | `goal`, `sol1`, `sol2`, `label` | `"Question: " + goal + "\nAnswer:"` | `[sol1, sol2]` |
//!
//! HellaSwag's `preprocess` is lm-eval's: strip, `" [title]"` → `". "`, drop `[...]`, collapse
//! double spaces. The named tasks resolve through the hf-hub cache ([`Task::hub_file`]):
//! `Rowan/hellaswag` `data/validation-00000-of-00001.parquet`, `allenai/ai2_arc`
//! `ARC-Easy/test-00000-of-00001.parquet` and `ARC-Challenge/test-00000-of-00001.parquet`,
//! `baber/piqa` `data/validation-00000-of-00001.parquet` (the splits lm-eval scores; the
//! HellaSwag and ARC paths are those public scripts fetch; when a path is not in the cache nor
//! on the hub, the repository's parquet file of the split is taken instead: `baber/piqa`'s
//! layout is unverified). A local file of any schema can be given instead.
//!
//! # Scoring
//!
//! Each choice's continuation is `" " + choice` (lm-eval's default target delimiter; trailing
//! spaces of the context move to the continuation). As lm-eval's `_encode_pair`: the context is
//! tokenized alone, `context + continuation` is tokenized whole, and the continuation's tokens
//! are the whole's tokens after the context's count. Tokenization adds no special tokens; the
//! sequence is preceded by BOS when the model's tokenizer adds BOS by default (swk's
//! perplexity convention; lm-eval's `add_bos_token=True`), and an empty context without BOS
//! becomes the EOS token (lm-eval's prefix token). A choice's score is the sum of the
//! log-probabilities of its continuation tokens. `acc`: the argmax of the scores is the label
//! (first on ties). `acc_norm`: the argmax of score / length of the choice in characters (lm-eval
//! divides by `len(choice)` of the Python string, which its docs call byte length; the same for
//! ASCII). Standard errors are lm-eval's: sample standard deviation / √n.

use std::path::Path;
use std::time::Instant;

use hf_hub::Cache;
use serde::Serialize;
use serde_json::Value;

use crate::edit::{EditGuard, EditRecord, EditTarget, WeightEdit};
use crate::eval::dataset::{columns, HubFile};
use crate::eval::logits::LogitsBackend;
use crate::model::arch::Logits;
use crate::{Error, Model, Result};

/// The named multiple-choice tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// HellaSwag (validation split).
    Hellaswag,
    /// ARC-Easy (test split).
    ArcEasy,
    /// ARC-Challenge (test split).
    ArcChallenge,
    /// PIQA (validation split).
    Piqa,
}

impl Task {
    /// Every task, in the order `swk mc` lists them.
    pub const ALL: [Task; 4] = [Task::Hellaswag, Task::ArcEasy, Task::ArcChallenge, Task::Piqa];

    /// The task's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag",
            Task::ArcEasy => "arc-easy",
            Task::ArcChallenge => "arc-challenge",
            Task::Piqa => "piqa",
        }
    }

    /// The task named `s` (case-insensitive; `_` and `-` alike).
    pub fn parse(s: &str) -> Result<Task> {
        let norm = s.to_ascii_lowercase().replace('_', "-");
        Task::ALL.into_iter().find(|t| t.name() == norm).ok_or_else(|| {
            let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
            Error::Invalid(format!("unknown task `{s}` (known: {})", names.join(", ")))
        })
    }

    /// The split lm-eval scores: `validation` (HellaSwag, PIQA) or `test` (ARC).
    pub fn split(self) -> &'static str {
        match self {
            Task::Hellaswag | Task::Piqa => "validation",
            Task::ArcEasy | Task::ArcChallenge => "test",
        }
    }

    /// The hub file holding the split lm-eval scores (where the mirror may lay it out
    /// otherwise, as `baber/piqa` may, [`task_items_in`] takes its parquet file of the split).
    pub fn hub_file(self) -> HubFile {
        match self {
            Task::Hellaswag => {
                HubFile { repo: "Rowan/hellaswag", file: "data/validation-00000-of-00001.parquet" }
            }
            Task::ArcEasy => {
                HubFile { repo: "allenai/ai2_arc", file: "ARC-Easy/test-00000-of-00001.parquet" }
            }
            Task::ArcChallenge => HubFile {
                repo: "allenai/ai2_arc",
                file: "ARC-Challenge/test-00000-of-00001.parquet",
            },
            Task::Piqa => {
                HubFile { repo: "baber/piqa", file: "data/validation-00000-of-00001.parquet" }
            }
        }
    }
}

/// One multiple-choice question, as text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// The context (prompt) the choices continue.
    pub context: String,
    /// The candidate continuations (without the leading delimiter).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub label: usize,
}

/// lm-eval's HellaSwag text cleanup.
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

fn str_field<'a>(row: &'a Value, name: &str) -> std::result::Result<&'a str, String> {
    row.get(name).and_then(Value::as_str).ok_or_else(|| format!("no string field `{name}`"))
}

fn str_list(row: &Value, name: &str) -> std::result::Result<Vec<String>, String> {
    let v = row.get(name).and_then(Value::as_array).ok_or_else(|| format!("no list `{name}`"))?;
    v.iter()
        .map(|x| x.as_str().map(String::from).ok_or_else(|| format!("`{name}` holds a non-string")))
        .collect()
}

/// An integer label given as a number or a digit string.
fn int_label(row: &Value, name: &str) -> std::result::Result<usize, String> {
    match row.get(name) {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as usize),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("no integer `{name}` (unlabelled split?)"))
}

/// The item in `row`, in whichever schema it is written (see the module docs).
pub fn item_from_row(row: &Value) -> std::result::Result<Item, String> {
    let has = |k: &str| row.get(k).is_some();
    let item = if has("context") && has("choices") {
        Item {
            context: str_field(row, "context")?.to_string(),
            choices: str_list(row, "choices")?,
            label: int_label(row, "label")?,
        }
    } else if has("ctx_a") && has("endings") {
        let ctx = format!("{} {}", str_field(row, "ctx_a")?, capitalize(str_field(row, "ctx_b")?));
        let activity = str_field(row, "activity_label")?;
        Item {
            context: hellaswag_preprocess(&format!("{activity}: {ctx}")),
            choices: str_list(row, "endings")?.iter().map(|e| hellaswag_preprocess(e)).collect(),
            label: int_label(row, "label")?,
        }
    } else if has("question") && has("answerKey") {
        let choices = row.get("choices").ok_or("no `choices`")?;
        let labels = str_list(choices, "label")?;
        let key = str_field(row, "answerKey")?;
        Item {
            context: format!("Question: {}\nAnswer:", str_field(row, "question")?),
            choices: str_list(choices, "text")?,
            label: labels
                .iter()
                .position(|l| l == key)
                .ok_or_else(|| format!("answerKey `{key}` is not among {labels:?}"))?,
        }
    } else if has("goal") && has("sol1") {
        Item {
            context: format!("Question: {}\nAnswer:", str_field(row, "goal")?),
            choices: vec![str_field(row, "sol1")?.into(), str_field(row, "sol2")?.into()],
            label: int_label(row, "label")?,
        }
    } else {
        return Err(format!(
            "unknown schema (columns: {}); expected context/choices/label, HellaSwag, ARC or \
             PIQA fields",
            columns(row)
        ));
    };
    if item.choices.len() < 2 {
        return Err(format!("{} choice(s); at least 2 are needed", item.choices.len()));
    }
    if item.label >= item.choices.len() {
        return Err(format!("label {} but {} choices", item.label, item.choices.len()));
    }
    Ok(item)
}

/// The items of a local `.jsonl` or `.parquet` file (at most `limit`, from the start).
pub fn read_items(path: &Path, limit: Option<usize>) -> Result<Vec<Item>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let rows = match ext.as_str() {
        "parquet" => crate::io::parquet::read_rows(path)?,
        "jsonl" | "json" => crate::io::jsonl::read_rows(path)?,
        _ => {
            return Err(Error::format(path, "multiple-choice data must be .jsonl or .parquet"));
        }
    };
    let n = limit.unwrap_or(usize::MAX).min(rows.len());
    let items = rows[..n]
        .iter()
        .enumerate()
        .map(|(i, r)| item_from_row(r).map_err(|m| Error::format(path, format!("row {i}: {m}"))))
        .collect::<Result<Vec<_>>>()?;
    if items.is_empty() {
        return Err(Error::format(path, "no items"));
    }
    Ok(items)
}

/// The items of `task` from `cache` (fetched when missing and `allow_download`).
pub fn task_items_in(
    cache: &Cache,
    task: Task,
    limit: Option<usize>,
    allow_download: bool,
) -> Result<Vec<Item>> {
    let hub = task.hub_file();
    let split = task.split();
    let p =
        crate::io::hub::dataset_split_file_in(cache, hub.repo, hub.file, split, allow_download)?;
    read_items(&p, limit)
}

/// [`task_items_in`] through the default cache (`HF_HOME`), downloading unless
/// `HF_HUB_OFFLINE=1`.
pub fn task_items(task: Task, limit: Option<usize>) -> Result<Vec<Item>> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    task_items_in(&Cache::from_env(), task, limit, !offline)
}

/// An item as token ids.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenItem {
    /// The fed context (with the BOS or EOS prefix when one is used); never empty.
    pub context: Vec<u32>,
    /// Each choice's continuation tokens; never empty.
    pub continuations: Vec<Vec<u32>>,
    /// Each choice's length for `acc_norm` (characters of the choice).
    pub lengths: Vec<usize>,
    /// Index of the correct choice.
    pub label: usize,
}

/// Tokenize `item` as the module docs describe.
pub fn tokenize(model: &Model, item: &Item) -> Result<TokenItem> {
    let tok = model.tokenizer()?;
    let trimmed = item.context.trim_end_matches(' ');
    let moved = &item.context[trimmed.len()..];
    let mut context = tok.encode(trimmed, false)?;
    let ctx_len = context.len();
    let prefix = match tok.bos_id() {
        Some(b) if tok.adds_bos() => Some(b),
        _ if context.is_empty() => tok.eos_ids().first().copied(),
        _ => None,
    };
    if let Some(p) = prefix {
        context.insert(0, p);
    }
    if context.is_empty() {
        return Err(Error::Invalid(
            "an item has an empty context and the tokenizer has neither BOS nor EOS".into(),
        ));
    }
    let mut continuations = Vec::with_capacity(item.choices.len());
    for choice in &item.choices {
        let cont = format!("{moved} {choice}");
        let whole = tok.encode(&format!("{trimmed}{cont}"), false)?;
        let mut c = whole.get(ctx_len..).unwrap_or_default().to_vec();
        if c.is_empty() {
            // The whole merged into the context's tokens: score the continuation alone.
            c = tok.encode(&cont, false)?;
        }
        if c.is_empty() {
            return Err(Error::Invalid(format!("choice {choice:?} has no tokens")));
        }
        continuations.push(c);
    }
    Ok(TokenItem {
        context,
        continuations,
        lengths: item.choices.iter().map(|c| c.chars().count().max(1)).collect(),
        label: item.label,
    })
}

/// The sum of log-probabilities of each continuation given the context: the context runs
/// once, each continuation from a copy of its KV cache.
pub fn score_item<B: LogitsBackend>(model: &B, item: &TokenItem) -> Result<Vec<f64>> {
    if item.context.is_empty() || item.continuations.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("an item has an empty context or continuation".into()));
    }
    let mut cache = model.new_cache()?;
    let last = model.logits_with(&item.context, &mut cache, Logits::Last)?;
    let first = crate::analysis::log_softmax(&last);
    let vocab = model.vocab();
    item.continuations
        .iter()
        .map(|cont| {
            let lp = |row: &[f64], t: u32| {
                row.get(t as usize).copied().ok_or_else(|| {
                    Error::Invalid(format!("token {t} is outside the vocabulary ({vocab})"))
                })
            };
            let mut sum = lp(&first, cont[0])?;
            if cont.len() > 1 {
                let mut c = model.fork_cache(&cache)?;
                let logits = model.logits_with(&cont[..cont.len() - 1], &mut c, Logits::All)?;
                for (i, &t) in cont[1..].iter().enumerate() {
                    sum += lp(&crate::analysis::log_softmax(&logits[i * vocab..][..vocab]), t)?;
                }
            }
            Ok(sum)
        })
        .collect()
}

/// One item's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ItemScore {
    /// Sum of continuation log-probabilities per choice.
    pub logprobs: Vec<f64>,
    /// Argmax of `logprobs`.
    pub pred: usize,
    /// Argmax of `logprobs / length`.
    pub pred_norm: usize,
    /// `pred == label`.
    pub correct: bool,
    /// `pred_norm == label`.
    pub correct_norm: bool,
}

/// Accuracies over a set of items, with lm-eval's standard errors.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// Items scored.
    pub n: usize,
    /// Fraction with the highest-scoring choice correct.
    pub acc: f64,
    /// Sample standard deviation of the per-item 0/1 over √n (None for n < 2).
    pub acc_stderr: Option<f64>,
    /// Fraction with the highest length-normalized score correct.
    pub acc_norm: f64,
    /// Its standard error (None for n < 2).
    pub acc_norm_stderr: Option<f64>,
}

/// The mean of 0/1 outcomes and its standard error (sample std / √n).
pub fn mean_stderr(hits: &[bool]) -> (f64, Option<f64>) {
    let n = hits.len() as f64;
    if hits.is_empty() {
        return (0.0, None);
    }
    let mean = hits.iter().filter(|&&h| h).count() as f64 / n;
    if hits.len() < 2 {
        return (mean, None);
    }
    let var = hits.iter().map(|&h| (h as u8 as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Score every item; `on_item(done, total)` after each.
pub fn evaluate<B: LogitsBackend>(
    model: &B,
    items: &[TokenItem],
    mut on_item: impl FnMut(usize, usize),
) -> Result<(Vec<ItemScore>, Metrics)> {
    let mut scores = Vec::with_capacity(items.len());
    for (k, it) in items.iter().enumerate() {
        let logprobs = score_item(model, it)?;
        let pred = argmax(logprobs.iter().copied());
        let pred_norm = argmax(logprobs.iter().zip(&it.lengths).map(|(l, &n)| l / n as f64));
        scores.push(ItemScore {
            pred,
            pred_norm,
            correct: pred == it.label,
            correct_norm: pred_norm == it.label,
            logprobs,
        });
        on_item(k + 1, items.len());
    }
    let (acc, acc_stderr) = mean_stderr(&scores.iter().map(|s| s.correct).collect::<Vec<_>>());
    let (acc_norm, acc_norm_stderr) =
        mean_stderr(&scores.iter().map(|s| s.correct_norm).collect::<Vec<_>>());
    let m = Metrics { n: items.len(), acc, acc_stderr, acc_norm, acc_norm_stderr };
    Ok((scores, m))
}

/// Baseline and (when edits are given) edited evaluation of the same items.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceReport {
    /// Task or file name.
    pub task: String,
    /// Baseline accuracies.
    pub baseline: Metrics,
    /// With the edits applied (None without edits).
    pub edited: Option<Metrics>,
    /// The edits, with original and new values.
    pub edits: Vec<EditRecord>,
    /// Per item: baseline scores.
    pub items_baseline: Vec<ItemScore>,
    /// Per item: edited scores.
    pub items_edited: Vec<ItemScore>,
    /// Wall time.
    pub seconds: f64,
}

/// Evaluate `items` without and then with `edits` (restored afterwards). `on_step(done,
/// total)` counts items over both runs.
pub fn compare<B: LogitsBackend + EditTarget>(
    model: &mut B,
    task: &str,
    items: &[TokenItem],
    edits: &[WeightEdit],
    mut on_step: impl FnMut(usize, usize),
) -> Result<ChoiceReport> {
    let start = Instant::now();
    let runs = if edits.is_empty() { 1 } else { 2 };
    let total = runs * items.len();
    let (items_baseline, baseline) = evaluate(model, items, |d, _| on_step(d, total))?;
    let (mut edited, mut items_edited, mut log) = (None, Vec::new(), Vec::new());
    if !edits.is_empty() {
        let mut g = EditGuard::new(model);
        g.apply_all(edits)?;
        let (s, m) = evaluate(&*g, items, |d, _| on_step(items.len() + d, total))?;
        (edited, items_edited, log) = (Some(m), s, g.log().to_vec());
    }
    Ok(ChoiceReport {
        task: task.to_string(),
        baseline,
        edited,
        edits: log,
        items_baseline,
        items_edited,
        seconds: start.elapsed().as_secs_f64(),
    })
}
