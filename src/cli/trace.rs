//! `swk trace MODEL [--weight L,R,C] [--prompt TEXT] [--edit SPEC]... [--from-detect FILE]
//! [--json] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device cuda` too).

use swk::analysis::{down_proj_coords, token_labels, trace, AnalysisBackend};
use swk::edit::WeightEdit;
use swk::{Error, Result};

use super::analysis::{run_job, Described, EditSource, Fallback, Job, Target};
use super::device::{DeviceOpts, GpuDtype};

/// Arguments of `swk trace`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// The super weight `down_proj.weight[R, C]` of layer L, as `L,R,C` (default: the first
    /// down_proj edit, or the first super weight detection confirms).
    #[arg(long, value_name = "L,R,C")]
    weight: Option<String>,
    /// Prompt (tokenized with the model's special-token convention).
    #[arg(long, default_value = swk::detect::DEFAULT_PROMPT)]
    prompt: String,
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The trace on a backend: of `weight`, or else of the first down_proj edit studied.
struct Trace {
    weight: Option<(usize, usize, usize)>,
    tokens: Vec<u32>,
    labels: Vec<String>,
}

impl Job for Trace {
    type Out = trace::TraceReport;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        edits: Vec<WeightEdit>,
    ) -> Result<trace::TraceReport> {
        let weight = match self.weight {
            Some(w) => w,
            None => edits.iter().find_map(down_proj_coords).ok_or_else(|| {
                Error::Invalid("no down_proj weight to trace; pass --weight L,R,C".into())
            })?,
        };
        trace::trace_with(backend, &self.tokens, &self.labels, weight)
    }
}

fn parse_weight(s: &str) -> Result<(usize, usize, usize)> {
    let bad = || Error::Invalid(format!("--weight `{s}`: expected L,R,C (three indices)"));
    let v: Vec<usize> =
        s.split(',').map(|x| x.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
    match v[..] {
        [l, r, c] => Ok((l, r, c)),
        _ => Err(bad()),
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let weight = a.weight.as_deref().map(parse_weight).transpose()?;
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let tokens = model.tokenizer()?.encode(&a.prompt, true)?;
    let labels = token_labels(&model, &tokens);
    let job = Trace { weight, tokens, labels };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    // With --weight, nothing else to find; otherwise the edits name the weight.
    let fallback = if weight.is_some() { Fallback::Nothing } else { Fallback::Confirmed };
    let (r, device) = run_job(&mut model, target, &a.edits, fallback, job)?;
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device {device}");
    println!(
        "super weight: layer {} down_proj.weight[{}, {}] = {:.4}",
        r.layer, r.row, r.col, r.weight
    );
    println!("\nchannel {} at each token", r.col);
    println!(
        "{:>4} {:>20} {:>11} {:>11} {:>11} {:>12}",
        "pos", "token", "gate", "silu(gate)", "up", "silu*up"
    );
    for p in &r.positions {
        let mark = if p.position == r.spike_position { " <- spike" } else { "" };
        println!(
            "{:>4} {:>20} {:>11.3} {:>11.3} {:>11.3} {:>12.3}{mark}",
            p.position,
            super::vocab::clip(&p.token, 20),
            p.gate,
            p.silu_gate,
            p.up,
            p.activation
        );
    }
    let amp = &r.amplification;
    println!("\nat the spike token {} (position {}):", r.spike_token, r.spike_position);
    println!(
        "  w * x                    {:>12.3}  ({:.4} x {:.3})",
        r.product, r.weight, r.positions[r.spike_position].activation
    );
    println!("  rest of row {:<12} {:>12.3}", r.row, r.rest_of_row);
    println!(
        "  row output (sum)         {:>12.3}  (hook_mlp_out: {:.3}; w*x share {:.1} %)",
        r.row_output,
        r.mlp_out_row,
        100.0 * r.product_share
    );
    println!("  residual dim {:<11} {:>12.3} -> {:.3}", r.row, r.resid_before, r.resid_after);
    println!("\namplification (from the MLP's input RMSNorm to the spike):");
    println!(
        "  residual RMS {:.3}; normalized input RMS {:.3}, max |.| {:.3} at dim {}",
        amp.resid_rms, amp.normed_rms, amp.normed_max_abs, amp.normed_max_dim
    );
    println!(
        "  |gate| {:.1}x, |up| {:.1}x, |silu(gate)*up| {:.1}x the normalized input RMS",
        amp.gate_gain, amp.up_gain, amp.spike_gain
    );
    println!(
        "  spike is {:.1}x the channel's median |input| at other tokens ({:.3})",
        amp.ratio_to_other_positions, amp.median_other_positions
    );
    println!(
        "  |gate row| {:.3} (layer median {:.3}); |up row| {:.3} (layer median {:.3})",
        amp.gate_row_norm, amp.gate_row_norm_median, amp.up_row_norm, amp.up_row_norm_median
    );
    for (name, list) in [("gate", &r.gate_contributors), ("up", &r.up_contributors)] {
        let v: Vec<String> = list
            .iter()
            .map(|c| {
                format!(
                    "dim {} ({:.3} x {:.4} = {:.3})",
                    c.dim, c.normed_input, c.weight, c.product
                )
            })
            .collect();
        println!("  {name} driven by: {}", v.join(", "));
    }
    println!("\nattention on the spike token in later layers (mean over heads and later queries):");
    println!(
        "{:>5} {:>10} {:>9} {:>10} {:>10}",
        "layer", "mean", "top head", "its mean", "argmax %"
    );
    for s in &r.attention {
        println!(
            "{:>5} {:>10.3} {:>9} {:>10.3} {:>10.1}",
            s.layer,
            s.mean_weight,
            s.max_head,
            s.max_head_weight,
            100.0 * s.argmax_fraction
        );
    }
    println!("most attending layers: {:?}", r.top_sink_layers);
    Ok(())
}
