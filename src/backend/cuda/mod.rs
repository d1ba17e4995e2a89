//! The CUDA backend (feature `cuda`): the forward pass of every family (the mixtures of
//! experts, `moe.rs` and `route.rs`; DeepSeek's latent attention, `mla.rs`), spike
//! statistics, perplexity scoring and in-place weight edits on an NVIDIA GPU, with swk's own
//! kernels (`kernels/*.cu`, compiled by build.rs into a fatbin embedded in the binary) and
//! cuBLAS for the matrix products when it is installed.
//!
//! * [`cuda_available`] / [`device_info`]: probe without panicking (libcuda is loaded at run
//!   time; a machine without it just reports no device).
//! * [`CudaModel`]: a [`crate::Model`]'s weights on the device as f32 or bf16
//!   ([`WeightDtype`]), [`CudaModel::forward`] mirroring `model::arch::llama::forward` op for
//!   op, with a device [`CudaKvCache`] and optional [`SpikeStats`](crate::hooks::SpikeStats).
//! * Edits: `CudaModel` implements [`EditTarget`](crate::edit::EditTarget), so
//!   [`EditGuard`](crate::edit::EditGuard) edits and restores device memory unchanged;
//!   [`CudaModel::checksum`] proves bit-exact restoration.
//!
//! ```no_run
//! # fn main() -> swk::Result<()> {
//! use swk::backend::cuda::{cuda_available, CudaKvCache, CudaModel, CudaOptions};
//! use swk::model::arch::Logits;
//! let model = swk::Model::load("tests/fixtures/tiny/llama")?;
//! if cuda_available() {
//!     let gpu = CudaModel::new(&model, &CudaOptions::default())?;
//!     let mut cache = CudaKvCache::new(&gpu);
//!     let logits = gpu.forward(&[1, 2, 3], &mut cache, None, Logits::All)?;
//!     assert_eq!(logits.len(), 3 * model.config.vocab_size);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! * Hook points, read-only: [`CudaModel::capture`] copies the activations at chosen points
//!   out of a pass, as the CPU's hooks see them.
//!
//! Not supported on the device (use the CPU backend): hooks that rewrite activations, and
//! starting a pass from a residual stream (`Input::Residual`).

mod detect;
mod device;
#[cfg(feature = "cuda")]
mod driver;
mod edit;
#[cfg(not(feature = "cuda"))]
mod emu;
#[cfg(not(feature = "cuda"))]
use emu as driver;
mod eval;
mod family;
mod forward;
mod graph;
pub mod kernels;
mod linear;
mod mla;
mod model;
mod moe;
mod products;
mod profile;
mod route;
mod streamed;
mod taps;

pub use detect::CudaBaseline;
pub use driver::{cublas_present, cuda_available, device_info, driver_present, CudaDevice};
pub use edit::{checksum_bits_u16, checksum_bits_u32, combine_checksums};
pub use forward::CudaKvCache;
pub use model::{CudaModel, CudaOptions, GemmEngine, WeightDtype};
pub use profile::{process_profile, profile_process, KernelTime, Profile};

/// Whether this build runs the CUDA backend on swk's CPU emulator (feature `cuda-emu`
/// without `cuda`) instead of a GPU: for testing the backend's code without a device.
pub const EMULATED: bool = cfg!(not(feature = "cuda"));

/// A tiny test fixture's directory: `$SWK_FIXTURES/tiny/{name}` when set (the GPU machine
/// runs test binaries built elsewhere, away from this source tree), else this crate's.
#[cfg(test)]
pub(crate) fn tiny_fixture(name: &str) -> String {
    let root = std::env::var("SWK_FIXTURES")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures").to_string());
    format!("{root}/tiny/{name}")
}

/// Under the CPU emulator, run the threads of each block and the blocks of each grid in
/// reverse order (`true`) or in index order (`false`, the default): a kernel whose results
/// differ between the two has a race on a GPU. Returns whether it applied (false, doing
/// nothing, on a GPU build).
pub fn emulate_in_reverse(on: bool) -> bool {
    #[cfg(not(feature = "cuda"))]
    emu::set_reverse_order(on);
    let _ = on;
    EMULATED
}

#[cfg(feature = "cuda")]
/// The compiled kernels: one fatbin with cubins for [`CUBIN_ARCHS`] and compute_80 PTX.
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/swk_kernels.fatbin"));

#[cfg(feature = "cuda")]
/// The compute_80 PTX of the kernels (also inside [`FATBIN`]), kept for inspection.
pub static PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swk_kernels.ptx"));

#[cfg(feature = "cuda")]
/// PTX ISA version of [`PTX`], as build.rs read it (at most 9.0 for driver 580 / CUDA 13.0).
pub const PTX_ISA: &str = env!("SWK_PTX_ISA");

#[cfg(feature = "cuda")]
/// The real architectures with a cubin in [`FATBIN`].
pub const CUBIN_ARCHS: &str = env!("SWK_CUBIN_ARCHS");

#[cfg(feature = "cuda")]
/// The nvcc that built the kernels (its `--version` release line).
pub const NVCC_VERSION: &str = env!("SWK_NVCC_VERSION");

include!(concat!(env!("OUT_DIR"), "/swk_kernel_names.rs"));

/// One cuBLAS product in column-major terms: C (m × n, ld `ldc`) = Aᵀ · B for A (k × m, ld
/// `lda`) and B (k × n, ld `ldb`), alpha 1 and beta 0; inputs f32, or bf16 bits when
/// `bf16_inputs`; output f32; f32 accumulation. Addresses are device addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlasGemm {
    pub(crate) m: i32,
    pub(crate) n: i32,
    pub(crate) k: i32,
    pub(crate) a: u64,
    pub(crate) lda: i32,
    pub(crate) b: u64,
    pub(crate) ldb: i32,
    pub(crate) c: u64,
    pub(crate) ldc: i32,
    pub(crate) bf16_inputs: bool,
}

/// Error unless a device copy of `len` elements fits both buffers.
pub(crate) fn check_copy(len: usize, src: usize, dst: usize) -> crate::Result<()> {
    if len > src || len > dst {
        return Err(crate::Error::Backend(format!(
            "device copy of {len} elements between buffers of {src} and {dst}"
        )));
    }
    Ok(())
}

/// A map_err helper: a cudarc (or other) error as [`crate::Error::Backend`] with context.
pub(crate) fn be<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> crate::Error + '_ {
    move |e| crate::Error::Backend(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cuda")]
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn fatbin_is_embedded_with_every_kernel() {
        assert!(FATBIN.len() > 10_000, "fatbin of {} bytes", FATBIN.len());
        // Fatbin container magic 0xBA55ED50, little endian.
        assert_eq!(&FATBIN[..4], &[0x50, 0xed, 0x55, 0xba]);
        for k in kernels::KERNELS {
            assert!(contains(FATBIN, k.as_bytes()), "kernel {k} is not in the fatbin");
        }
    }

    #[test]
    fn host_kernel_list_matches_the_sources() {
        assert_eq!(kernels::KERNELS, SOURCE_KERNELS, "kernels/*.cu and kernels::KERNELS disagree");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn ptx_targets_compute_80_with_isa_at_most_9_0() {
        let (major, minor) = PTX_ISA.split_once('.').expect("X.Y");
        let v = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
        assert!(v <= (9, 0), "PTX ISA {PTX_ISA} is too new for driver 580");
        assert!(PTX.contains(&format!(".version {PTX_ISA}")));
        assert!(PTX.contains(".target sm_80"));
        for k in kernels::KERNELS {
            assert!(PTX.contains(&format!(".entry {k}(")), "kernel {k} is not in the PTX");
        }
        assert_eq!(CUBIN_ARCHS, "sm_80,sm_86,sm_89,sm_90");
        assert!(NVCC_VERSION.contains("13.0"), "{NVCC_VERSION}");
    }

    #[cfg(feature = "cuda")]
    /// The fatbin's entries (fatbin header: magic, version, header size, payload size; each
    /// entry: kind 1 = PTX / 2 = cubin, header size, payload size, architecture at byte 28).
    fn fatbin_entries(b: &[u8]) -> Vec<(u16, u32)> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let (header, size) = (u16_at(6) as usize, u64_at(8) as usize);
        assert_eq!(header + size, b.len(), "one fatbin, nothing after it");
        let mut v = Vec::new();
        let mut off = header;
        while off < header + size {
            let (kind, entry_header, payload) =
                (u16_at(off), u32_at(off + 4) as usize, u64_at(off + 8) as usize);
            v.push((kind, u32_at(off + 28)));
            off += entry_header + payload;
        }
        v
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn fatbin_holds_cubins_for_ampere_ada_hopper_and_compute_80_ptx() {
        let mut e = fatbin_entries(FATBIN);
        e.sort();
        assert_eq!(e, vec![(1, 80), (2, 80), (2, 86), (2, 89), (2, 90)]);
    }
}
