//! Where a pass spends its device time: per kernel (and per cuBLAS product), the launches and
//! their summed time, measured between [`CudaDevice::start_profile`] and
//! [`CudaDevice::finish_profile`]. On a GPU each launch is timed by a pair of CUDA events
//! around it on the stream; on the emulator by the host clock around the emulated launch.
//! Graph replays count as one entry (their launches are not seen one by one); work queued
//! while a graph is being captured is not timed.
//!
//! [`profile_process`] profiles every device opened afterwards, from its opening to its drop,
//! into process-wide totals ([`process_profile`]): `swk --profile` prints them.
//!
//! [`CudaDevice::start_profile`]: super::CudaDevice::start_profile
//! [`CudaDevice::finish_profile`]: super::CudaDevice::finish_profile

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Whether devices opened from now on profile themselves into [`PROCESS`].
static ENABLED: AtomicBool = AtomicBool::new(false);
/// What the profiled devices dropped so far timed.
static PROCESS: Mutex<Option<Totals>> = Mutex::new(None);

/// Profile every CUDA device opened from now on, from its opening until it is dropped, into
/// process-wide totals ([`process_profile`]); `false` stops profiling devices opened later.
pub fn profile_process(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`profile_process`] is on (a device being opened starts its profile).
pub(crate) fn profiling_process() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Fold a dropped device's timings into the process-wide totals.
pub(crate) fn add_to_process(t: Totals) {
    let mut p = PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    p.get_or_insert_with(Totals::default).merge(t);
}

/// The time per kernel of every device profiled by [`profile_process`] and dropped so far
/// (None when no such device was dropped).
pub fn process_profile() -> Option<Profile> {
    PROCESS.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(Totals::profile)
}

/// Launches and summed milliseconds per kernel name.
#[derive(Clone, Debug, Default)]
pub(crate) struct Totals(HashMap<&'static str, (usize, f64)>);

impl Totals {
    /// Count one launch of `name` that took `ms`.
    pub(crate) fn add(&mut self, name: &'static str, ms: f64) {
        let e = self.0.entry(name).or_default();
        e.0 += 1;
        e.1 += ms;
    }

    /// Add `other`'s counts to these.
    pub(crate) fn merge(&mut self, other: Totals) {
        for (name, (n, ms)) in other.0 {
            let e = self.0.entry(name).or_default();
            e.0 += n;
            e.1 += ms;
        }
    }

    /// As a [`Profile`], most time first.
    pub(crate) fn profile(&self) -> Profile {
        let mut kernels: Vec<KernelTime> = self
            .0
            .iter()
            .map(|(&name, &(launches, ms))| KernelTime { name, launches, ms })
            .collect();
        kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(b.name)));
        Profile { kernels }
    }
}

/// The name a cuBLAS product is profiled under: f32 (`sgemm`) or bf16 inputs (`GemmEx`).
pub(crate) fn gemm_name(bf16_inputs: bool) -> &'static str {
    if bf16_inputs {
        "cublas_gemm_bf16"
    } else {
        "cublas_gemm_f32"
    }
}

/// The name a graph replay is profiled under.
pub(crate) const GRAPH_REPLAY: &str = "graph_replay";

/// One kernel's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's `extern "C"` name, `cublas_gemm_f32` / `cublas_gemm_bf16` for cuBLAS
    /// products, or `graph_replay`.
    pub name: &'static str,
    /// Launches timed.
    pub launches: usize,
    /// Their summed device time in milliseconds.
    pub ms: f64,
}

/// Device time per kernel over a stretch of work, most time first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// Per kernel, by descending time (ties by name).
    pub kernels: Vec<KernelTime>,
}

impl Profile {
    /// The profile of timed launches `(name, ms)`.
    #[cfg(test)]
    pub(crate) fn of(samples: impl IntoIterator<Item = (&'static str, f64)>) -> Self {
        let mut t = Totals::default();
        for (name, ms) in samples {
            t.add(name, ms);
        }
        t.profile()
    }

    /// Summed time of every timed launch, in milliseconds.
    pub fn total_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.ms).sum()
    }

    /// Launches timed.
    pub fn launches(&self) -> usize {
        self.kernels.iter().map(|k| k.launches).sum()
    }

    /// A markdown table: for the `top` most costly kernels their launches, time, mean time
    /// per launch and share of `wall_ms` (the stretch's wall time), the other kernels in one
    /// row, then every launch's total and what the wall time holds besides (host work,
    /// copies, synchronization, gaps between launches).
    pub fn table(&self, wall_ms: f64, top: usize) -> String {
        let share = |ms: f64| if wall_ms > 0.0 { 100.0 * ms / wall_ms } else { 0.0 };
        let mut s = String::from(
            "| kernel | launches | ms | µs per launch | of wall |\n|---|---|---|---|---|\n",
        );
        let mut row = |name: &str, launches: usize, ms: f64| {
            let per = 1e3 * ms / launches.max(1) as f64;
            let _ =
                writeln!(s, "| {name} | {launches} | {ms:.3} | {per:.1} | {:.1} % |", share(ms));
        };
        for k in self.kernels.iter().take(top) {
            row(k.name, k.launches, k.ms);
        }
        let rest = &self.kernels[top.min(self.kernels.len())..];
        if !rest.is_empty() {
            let name = format!("({} other kernels)", rest.len());
            let ms = rest.iter().map(|k| k.ms).sum();
            row(&name, rest.iter().map(|k| k.launches).sum(), ms);
        }
        let total = self.total_ms();
        let _ = writeln!(
            s,
            "| (all launches) | {} | {:.3} | | {:.1} % |",
            self.launches(),
            total,
            share(total)
        );
        let _ = writeln!(
            s,
            "| (wall time outside launches) | | {:.3} | | {:.1} % |",
            (wall_ms - total).max(0.0),
            share((wall_ms - total).max(0.0))
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_group_by_kernel_and_sort_by_time() {
        let p = Profile::of([
            ("swk_attention", 1.0),
            ("cublas_gemm_f32", 2.5),
            ("swk_attention", 0.5),
            ("swk_rmsnorm", 1.5),
        ]);
        let rows: Vec<(&str, usize, f64)> =
            p.kernels.iter().map(|k| (k.name, k.launches, k.ms)).collect();
        assert_eq!(
            rows,
            [("cublas_gemm_f32", 1, 2.5), ("swk_attention", 2, 1.5), ("swk_rmsnorm", 1, 1.5)]
        );
        assert_eq!((p.total_ms(), p.launches()), (5.5, 4));
        let t = p.table(11.0, 9);
        assert!(t.contains("| swk_attention | 2 | 1.500 | 750.0 | 13.6 % |"), "{t}");
        assert!(t.contains("| (all launches) | 4 | 5.500 | | 50.0 % |"), "{t}");
        assert!(t.contains("| (wall time outside launches) | | 5.500 | | 50.0 % |"), "{t}");
        assert_eq!(t.lines().count(), 2 + 3 + 2);
        // The top one kernel, the other two in one row; the totals still of all four.
        let t = p.table(11.0, 1);
        assert!(t.contains("| cublas_gemm_f32 | 1 | 2.500 |"), "{t}");
        assert!(t.contains("| (2 other kernels) | 3 | 3.000 | 1000.0 | 27.3 % |"), "{t}");
        assert!(t.contains("| (all launches) | 4 | 5.500 |"), "{t}");
        assert_eq!(t.lines().count(), 2 + 2 + 2);
        assert_eq!(Profile::of([]).table(0.0, 5).lines().count(), 4);
    }
}
