//! What the analysis subcommands share: where the studied edits come from, the text to run.

use std::path::{Path, PathBuf};

use swk::analysis::{self, AnalysisBackend};
use swk::detect::{self, DetectBackend, DetectInputs};
use swk::edit::WeightEdit;
use swk::{Error, Model, Result};

use super::device::{Backend, GpuDtype};

/// The edits an analysis studies: `--edit` specs and/or a detection report; by default, run
/// detection and take what it confirms.
#[derive(clap::Args)]
pub struct EditSource {
    /// Weight edit to study (repeatable): zero:L,R,C, scale:L,R,C,F, set:L,R,C,V or
    /// TENSOR[R,C]=zero|xF|V. Default: zero the super weights `swk detect` confirms.
    #[arg(long)]
    pub edit: Vec<String>,
    /// Take the super weights of a `swk detect --json` report (zeroed).
    #[arg(long, value_name = "FILE.json")]
    pub from_detect: Option<PathBuf>,
}

impl EditSource {
    /// The edits given by `--edit` and `--from-detect` (`candidates`: the report's rejected
    /// spikes too), or None when neither flag was given.
    pub fn given(&self, candidates: bool) -> Result<Option<Vec<WeightEdit>>> {
        let mut edits = super::parse_edits(&self.edit)?;
        if let Some(p) = &self.from_detect {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            edits.extend(analysis::edits_from_detect_json(&text, candidates)?);
        }
        Ok((!edits.is_empty() || self.from_detect.is_some()).then_some(edits))
    }
}

/// Detect the super weights to study on `backend` (the CPU model, or a device), with a
/// progress bar unless `quiet`; `candidates`: every raw candidate, unconfirmed. `inputs` are
/// [`analysis::detected_config`]'s, tokenized. Errors when nothing is found.
pub fn detect_edits<B: DetectBackend>(
    backend: &mut B,
    inputs: &DetectInputs,
    quiet: bool,
    candidates: bool,
) -> Result<Vec<WeightEdit>> {
    let pb = super::bar(quiet, 1, "detecting super weights");
    let found = analysis::detected_edits_with(backend, inputs, candidates, |done, total, what| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(format!("detect: {what}"));
    })?;
    pb.finish_and_clear();
    if found.is_empty() {
        return Err(Error::Invalid(
            "detection found no super weight to study; pass --edit or --from-detect".into(),
        ));
    }
    if !quiet {
        let list: Vec<String> = found.iter().map(ToString::to_string).collect();
        let what = if candidates { "detection's raw candidates" } else { "detected super weights" };
        eprintln!("studying {what}: {}", list.join(", "));
    }
    Ok(found)
}

/// The text of `path`, or the short confirmation text shipped with swk.
pub fn read_text(path: Option<&Path>) -> Result<String> {
    match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e)),
        None => Ok(swk::detect::DEFAULT_CONFIRM_TEXT.to_string()),
    }
}

/// Edits as a short comma-separated list.
pub fn edits_line(edits: &[WeightEdit]) -> String {
    let v: Vec<String> = edits.iter().map(ToString::to_string).collect();
    v.join(", ")
}

/// A subcommand's work on whichever backend `--device` picks (see [`run_job`]).
pub trait Job {
    /// What it produces.
    type Out;
    /// Run on `backend`, studying `edits`.
    fn run<B: AnalysisBackend>(self, backend: &mut B, edits: Vec<WeightEdit>) -> Result<Self::Out>;
}

/// Where [`run_job`] runs, and on what.
pub struct Target {
    /// The chosen backend.
    pub backend: Backend,
    /// Layers to stream to the device from the model's files (None: upload whole).
    pub lazy: Option<super::device::Files>,
    /// Weight storage on the device.
    pub dtype: GpuDtype,
    /// No progress bars or notes on stderr.
    pub quiet: bool,
}

/// What [`run_job`] studies when `--edit` and `--from-detect` give nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No edits.
    Nothing,
    /// The super weights detection confirms.
    Confirmed,
    /// Every raw candidate of detection, unconfirmed (a report's rejected spikes are taken
    /// from `--from-detect` too).
    Candidates,
}

/// Run `job` on the CPU `model` or on CUDA device 0 (per `target`), studying the edits
/// `source` gives or, when it gives none, per `fallback`, detected on the same backend.
/// Returns the output and where it ran (`cpu`, or `cuda: NAME (DTYPE weights, ENGINE[,
/// layers streamed])`).
pub fn run_job<J: Job>(
    model: &mut Model,
    target: Target,
    source: &EditSource,
    fallback: Fallback,
    job: J,
) -> Result<(J::Out, String)> {
    let candidates = fallback == Fallback::Candidates;
    let given = source.given(candidates)?;
    // Tokenized on the host before any upload; detected on the backend that runs the job.
    let inputs = match (&given, fallback) {
        (None, Fallback::Nothing) | (Some(_), _) => None,
        (None, _) => Some(detect::detect_inputs(model, &analysis::detected_config(candidates))?),
    };
    let plan = EditPlan { given, inputs, candidates, quiet: target.quiet };
    match target.backend {
        Backend::Cpu => {
            let edits = plan.resolve(model)?;
            Ok((job.run(model, edits)?, "cpu".into()))
        }
        Backend::Cuda => cuda_job(model, target, plan, job),
    }
}

/// The edits of a [`run_job`]: given, or to detect from `inputs`, or none.
struct EditPlan {
    given: Option<Vec<WeightEdit>>,
    inputs: Option<DetectInputs>,
    candidates: bool,
    quiet: bool,
}

impl EditPlan {
    fn resolve<B: DetectBackend>(self, backend: &mut B) -> Result<Vec<WeightEdit>> {
        match (self.given, self.inputs) {
            (Some(edits), _) => Ok(edits),
            (None, Some(inputs)) => detect_edits(backend, &inputs, self.quiet, self.candidates),
            (None, None) => Ok(Vec::new()),
        }
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_job<J: Job>(
    model: &Model,
    target: Target,
    plan: EditPlan,
    job: J,
) -> Result<(J::Out, String)> {
    let (mut gpu, what) = super::device::cuda_session(model, target.lazy, target.dtype)?;
    let edits = plan.resolve(&mut gpu)?;
    Ok((job.run(&mut gpu, edits)?, what))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_job<J: Job>(_: &Model, target: Target, _: EditPlan, _: J) -> Result<(J::Out, String)> {
    let _unused_without_cuda = (target.lazy, target.dtype);
    Err(Error::Backend("built without the `cuda` feature".into()))
}

/// A report and the backend that produced it, as the JSON output of a command that runs on
/// CUDA too.
#[derive(serde::Serialize)]
pub struct Described<'a, T: serde::Serialize> {
    /// `cpu`, or `cuda: NAME (DTYPE weights, ENGINE[, layers streamed])`.
    pub device: &'a str,
    /// The report's own fields.
    #[serde(flatten)]
    pub report: &'a T,
}
