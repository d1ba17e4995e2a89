//! `swk mc MODEL (--task NAME | --data FILE) [--limit N] [--edit SPEC]... [--from-detect FILE]
//! [--detect] [--json]`.

use std::path::PathBuf;

use swk::eval::choice::{self, Task};
use swk::{Error, Result};

use super::analysis::{edits_line, EditSource};

/// Arguments of `swk mc`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Task read from the Hugging Face cache: hellaswag, arc-easy, arc-challenge, piqa.
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    task: Option<String>,
    /// Local items instead (.jsonl or .parquet): {"context", "choices", "label"} rows, or a
    /// task's native fields.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Score only the first N items.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Edits for the edited run (none: baseline only).
    #[command(flatten)]
    edits: EditSource,
    /// Run detection and zero the super weights it confirms for the edited run.
    #[arg(long)]
    detect: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (name, items) = match (&a.task, &a.data) {
        (Some(t), _) => {
            let task = Task::parse(t)?;
            (task.name().to_string(), choice::task_items(task, a.limit)?)
        }
        (None, Some(p)) => (p.display().to_string(), choice::read_items(p, a.limit)?),
        (None, None) => return Err(Error::Invalid("give --task NAME or --data FILE".into())),
    };
    let mut model = super::load_model(&a.model, a.json)?;
    let wants_edits = a.detect || !a.edits.edit.is_empty() || a.edits.from_detect.is_some();
    let edits = if wants_edits { a.edits.resolve(&mut model, a.json, false)? } else { vec![] };
    let tokenized =
        items.iter().map(|it| choice::tokenize(&model, it)).collect::<Result<Vec<_>>>()?;
    let pb = super::bar(a.json, tokenized.len() as u64, "multiple choice");
    let r = choice::compare(&mut model, &name, &tokenized, &edits, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&r);
    }
    println!("task     {} ({} items)", r.task, r.baseline.n);
    let se = |s: Option<f64>| s.map_or("-".into(), |x| format!("{x:.4}"));
    println!("{:<10} {:>8} {:>8} {:>9} {:>8}", "run", "acc", "stderr", "acc_norm", "stderr");
    let mut rows = vec![("baseline", &r.baseline)];
    if let Some(e) = &r.edited {
        rows.push(("edited", e));
    }
    for (label, m) in rows {
        println!(
            "{label:<10} {:>8.4} {:>8} {:>9.4} {:>8}",
            m.acc,
            se(m.acc_stderr),
            m.acc_norm,
            se(m.acc_norm_stderr)
        );
    }
    if !r.edits.is_empty() {
        let e: Vec<_> = r.edits.iter().map(|x| x.edit.clone()).collect();
        println!("edits    {}", edits_line(&e));
    }
    println!("seconds  {:.2}", r.seconds);
    Ok(())
}
