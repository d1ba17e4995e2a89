//! `swk mc MODEL (--task NAME | --data FILE) [--limit N] [--edit SPEC]... [--from-detect FILE]
//! [--detect] [--json] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device cuda` too).

use std::path::PathBuf;

use swk::analysis::AnalysisBackend;
use swk::edit::WeightEdit;
use swk::eval::choice::{self, Task, TokenItem};
use swk::{Error, Result};

use super::analysis::{edits_line, run_job, Described, EditSource, Fallback, Job, Target};
use super::device::{DeviceOpts, GpuDtype};

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
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The baseline and edited runs on a backend, with a progress bar.
struct Choices {
    name: String,
    items: Vec<TokenItem>,
    quiet: bool,
}

impl Job for Choices {
    type Out = choice::ChoiceReport;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        edits: Vec<WeightEdit>,
    ) -> Result<choice::ChoiceReport> {
        let pb = super::bar(self.quiet, self.items.len() as u64, "multiple choice");
        let r = choice::compare(backend, &self.name, &self.items, &edits, super::steps(&pb))?;
        pb.finish_and_clear();
        Ok(r)
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let (name, items) = match (&a.task, &a.data) {
        (Some(t), _) => {
            let task = Task::parse(t)?;
            (task.name().to_string(), choice::task_items(task, a.limit)?)
        }
        (None, Some(p)) => (p.display().to_string(), choice::read_items(p, a.limit)?),
        (None, None) => return Err(Error::Invalid("give --task NAME or --data FILE".into())),
    };
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let items = items.iter().map(|it| choice::tokenize(&model, it)).collect::<Result<Vec<_>>>()?;
    let job = Choices { name, items, quiet: a.json };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    // Edits: those given, or with --detect the confirmed super weights; none: baseline only.
    let fallback = if a.detect { Fallback::Confirmed } else { Fallback::Nothing };
    let (r, device) = run_job(&mut model, target, &a.edits, fallback, job)?;
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device   {device}");
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
