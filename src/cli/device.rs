//! `--device cuda|cpu|auto`: which backend runs the forward passes.

use swk::{Error, Result};

/// The `--device` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA when a device is usable, else CPU (saying which).
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend (error when no device is usable).
    Cuda,
}

/// The backend chosen for this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU.
    Cpu,
    /// CUDA device 0.
    Cuda,
}

#[cfg(feature = "cuda")]
fn cuda_usable() -> std::result::Result<(), String> {
    if swk::backend::cuda::cuda_available() {
        Ok(())
    } else {
        Err("no usable CUDA device (driver library or device missing)".into())
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable() -> std::result::Result<(), String> {
    Err("this swk was built without the `cuda` feature (cargo build --release --features cuda)"
        .into())
}

/// Resolve the flag; `auto` reports its choice on stderr unless `quiet`.
pub fn choose(arg: DeviceArg, quiet: bool) -> Result<Backend> {
    match (arg, cuda_usable()) {
        (DeviceArg::Cpu, _) => Ok(Backend::Cpu),
        (DeviceArg::Cuda, Ok(())) => Ok(Backend::Cuda),
        (DeviceArg::Cuda, Err(why)) => Err(Error::Backend(format!("--device cuda: {why}"))),
        (DeviceArg::Auto, Ok(())) => {
            if !quiet {
                eprintln!("swk: device: cuda");
            }
            Ok(Backend::Cuda)
        }
        (DeviceArg::Auto, Err(why)) => {
            if !quiet {
                eprintln!("swk: device: cpu ({why})");
            }
            Ok(Backend::Cpu)
        }
    }
}

/// Commands that run on the CPU only say so when CUDA was asked for explicitly.
pub fn require_cpu(arg: DeviceArg) -> Result<()> {
    if arg == DeviceArg::Cuda {
        return Err(Error::Backend(
            "this command runs on the CPU backend only for now (CUDA: ppl, generate, detect); use --device cpu".into(),
        ));
    }
    Ok(())
}
