//! Compute backends. The CPU backend runs everywhere; the CUDA backend (feature `cuda`)
//! runs the same forward pass with swk's own kernels.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod dtype;
pub mod memory;
pub mod stream;

pub use dtype::WeightDtype;
