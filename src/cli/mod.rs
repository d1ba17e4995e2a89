//! Argument parsing and dispatch; one file per subcommand.

mod analysis;
mod cascade;
mod catalog;
mod compare_generate;
mod detect;
mod device;
mod experts;
mod generate;
mod groups;
mod info;
mod mc;
mod ppl;
mod quantize_study;
mod report;
mod research;
mod screen;
mod trace;
mod vocab;

use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use swk::{Model, Result};

/// swk, the super weight kit: find, measure and edit super weights in LLMs.
#[derive(Parser)]
#[command(name = "swk", version, about)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Backend of every command that runs a model: cuda, cpu, or auto (CUDA when usable, else
    /// CPU).
    #[arg(long, global = true, value_enum, default_value_t = device::DeviceArg::Auto)]
    device: device::DeviceArg,
    /// On CUDA: stream the layers from the model's files, one at a time on the device, when
    /// the weights do not fit (auto), always, or never.
    #[arg(long, global = true, value_enum, default_value_t = device::StreamArg::Auto)]
    stream: device::StreamArg,
    /// On CUDA: who multiplies the matrices.
    #[arg(long, global = true, value_enum, default_value_t = device::GpuGemm::Auto)]
    gpu_gemm: device::GpuGemm,
    /// On CUDA: time every kernel launch and print, when the command ends, where the device
    /// time went, kernel by kernel (on stderr; timing each launch slows the run a little).
    #[arg(long, global = true)]
    profile: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model: architecture, sizes, dtypes, parameter count, format, and the device
    /// memory it needs on CUDA (resident or streamed).
    Info(info::Args),
    /// Perplexity of a text file (fixed protocol, see README).
    Ppl(ppl::Args),
    /// Greedy generation from a prompt.
    Generate(generate::Args),
    /// Find super weights (the paper's method plus causal confirmation).
    Detect(detect::Args),
    /// List the published super weights swk knows.
    Catalog(catalog::Args),
    /// How the edits shift next-token probabilities over a text (per token, KL).
    Vocab(vocab::Args),
    /// Massive activations layer by layer, with and without the edits.
    Cascade(cascade::Args),
    /// The arithmetic of one super weight: gate, up, w*x, amplification, attention sink.
    Trace(trace::Args),
    /// Greedy continuations: baseline vs the edited weights zeroed or scaled.
    CompareGenerate(compare_generate::Args),
    /// Round-to-nearest quantization with and without holding out the super weights.
    QuantizeStudy(quantize_study::Args),
    /// Rank candidate weights by the perplexity impact of zeroing each.
    Screen(screen::Args),
    /// Router statistics and super experts of a mixture-of-experts model.
    Experts(experts::Args),
    /// Massive activations written by groups of weights, decisive only together.
    Groups(groups::Args),
    /// Zero-shot multiple choice (HellaSwag, ARC, PIQA; lm-eval's protocol), baseline vs edited.
    Mc(mc::Args),
    /// The whole pipeline (detect, confirm, screen, every analysis) into session.json and
    /// report.html; several models add a comparison.
    Research(research::Args),
    /// Re-render report.html from a research session.json.
    Report(report::Args),
}

/// Parse the command line and run the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| swk::Error::Invalid(format!("--threads {n}: {e}")))?;
    }
    if matches!(cli.command, Command::Report(_)) {
        device::require_no_model(cli.device)?;
    }
    device::set_gemm(cli.gpu_gemm);
    if cli.profile {
        device::start_profile();
    }
    let started = std::time::Instant::now();
    let dev = device::DeviceOpts { device: cli.device, stream: cli.stream, positions: 0 };
    let done = match cli.command {
        Command::Info(a) => info::run(a, dev),
        Command::Ppl(a) => ppl::run(a, dev),
        Command::Generate(a) => generate::run(a, dev),
        Command::Detect(a) => detect::run(a, dev),
        Command::Catalog(a) => catalog::run(a),
        Command::Vocab(a) => vocab::run(a, dev),
        Command::Cascade(a) => cascade::run(a, dev),
        Command::Trace(a) => trace::run(a, dev),
        Command::CompareGenerate(a) => compare_generate::run(a, dev),
        Command::QuantizeStudy(a) => quantize_study::run(a, dev),
        Command::Screen(a) => screen::run(a, dev),
        Command::Experts(a) => experts::run(a, dev),
        Command::Groups(a) => groups::run(a, dev),
        Command::Mc(a) => mc::run(a, dev),
        Command::Research(a) => research::run(a, dev),
        Command::Report(a) => report::run(a),
    };
    if cli.profile {
        eprintln!("{}", device::profile_report(started.elapsed().as_secs_f64() * 1e3, 20));
    }
    done
}

/// Load a model with a spinner on stderr (hidden when `quiet`).
fn load_model(spec: &str, quiet: bool) -> Result<Model> {
    let sp = spinner(quiet, format!("loading {spec}"));
    let m = Model::load(spec);
    sp.finish_and_clear();
    m
}

/// A spinner on stderr, hidden when `quiet` or not a terminal.
fn spinner(quiet: bool, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A progress bar of `len` steps on stderr, hidden when `quiet`.
fn bar(quiet: bool, len: u64, msg: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len).with_message(msg.to_string());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// A `(done, total)` progress callback that drives `pb`.
fn steps(pb: &ProgressBar) -> impl FnMut(usize, usize) + '_ {
    move |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    }
}

/// A `(done, total, what)` progress callback that drives `pb`, `what` as its message.
fn stages(pb: &ProgressBar) -> impl FnMut(usize, usize, &str) + '_ {
    move |done, total, what| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(what.to_string());
    }
}

/// Print a value as pretty JSON on stdout.
fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let s =
        serde_json::to_string_pretty(v).map_err(|e| swk::Error::Invalid(format!("json: {e}")))?;
    println!("{s}");
    Ok(())
}

/// Parse `--edit` specs.
fn parse_edits(specs: &[String]) -> Result<Vec<swk::edit::WeightEdit>> {
    specs.iter().map(|s| swk::edit::WeightEdit::parse(s)).collect()
}
