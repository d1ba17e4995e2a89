//! Build script. Without the `cuda` or `cuda-emu` feature it does nothing.
//!
//! With `--features cuda` it compiles every `kernels/*.cu` (as one translation unit) into a
//! fatbin with cubins for sm_80, sm_86, sm_89, sm_90 and PTX for compute_80, written to
//! `$OUT_DIR/swk_kernels.fatbin` and embedded by `src/backend/cuda`. It also compiles the
//! compute_80 PTX on its own to check its ISA version: the GPU machines run driver 580
//! (CUDA 13.0), which loads PTX ISA 9.0 at most (see shared/CUDA-TOOLCHAIN.md).
//!
//! With `--features cuda-emu` (and not `cuda`) it compiles the same kernels as C++ with the
//! host compiler instead, into swk's CPU emulator of them (`kernels/emu`): the CUDA
//! backend's code then runs, slowly, on machines without a GPU or a CUDA toolkit.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//! `nvcc` on `PATH`, and the pinned PyPI toolchain that `scripts/install-cuda.sh` puts in
//! `.cuda-venv` next to Cargo.toml.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Real GPU architectures that get a cubin (Ampere, Ampere consumer, Ada, Hopper).
const CUBIN_ARCHS: [&str; 4] = ["80", "86", "89", "90"];
/// The PTX target embedded for JIT on anything newer.
const PTX_ARCH: &str = "80";
/// Newest PTX ISA the driver of the GPU machines (580, CUDA 13.0) loads.
const MAX_PTX_ISA: (u32, u32) = (9, 0);

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let emu = env::var_os("CARGO_FEATURE_CUDA_EMU").is_some();
    if !cuda && !emu {
        return;
    }
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");
    let (units, names) = kernel_sources(&kernel_dir, &out);
    if cuda {
        build_fatbin(&manifest, &kernel_dir, &out, &units);
    } else {
        build_emulator(&kernel_dir, &out, &units, &names);
    }
}

/// Every `kernels/*.cu` (sorted), and the kernel names they define; writes
/// `swk_kernel_names.rs` for the host's check that every kernel it loads was compiled.
fn kernel_sources(kernel_dir: &Path, out: &Path) -> (Vec<PathBuf>, Vec<String>) {
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    let mut sources: Vec<PathBuf> = fs::read_dir(kernel_dir)
        .unwrap_or_else(|e| panic!("swk: cannot read {}: {e}", kernel_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let units: Vec<PathBuf> =
        sources.into_iter().filter(|p| p.extension().is_some_and(|x| x == "cu")).collect();
    if units.is_empty() {
        panic!("swk: no kernels/*.cu found in {}", kernel_dir.display());
    }
    let mut names = Vec::new();
    for p in &units {
        let src = fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("swk: cannot read {}: {e}", p.display()));
        names.extend(kernel_names(&src));
    }
    names.sort();
    let list: String = names.iter().map(|n| format!("    \"{n}\",\n")).collect();
    fs::write(
        out.join("swk_kernel_names.rs"),
        format!("/// Every `extern \"C\" __global__` kernel defined in kernels/*.cu, sorted.\npub const SOURCE_KERNELS: &[&str] = &[\n{list}];\n"),
    )
    .unwrap_or_else(|e| panic!("swk: cannot write the kernel name list: {e}"));
    (units, names)
}

/// Feature `cuda-emu` (without `cuda`): the kernels compiled as C++ by the host compiler,
/// with kernels/emu/cuda_emu.h standing in for the CUDA dialect and kernels/emu/emu.cpp
/// running them (see there). Needs only a C++17 compiler.
#[cfg(feature = "cuda-emu")]
fn build_emulator(kernel_dir: &Path, out: &Path, units: &[PathBuf], names: &[String]) {
    let emu_dir = kernel_dir.join("emu");
    for f in ["cuda_emu.h", "emu.cpp"] {
        println!("cargo:rerun-if-changed={}", emu_dir.join(f).display());
    }
    let mut inc: String = units.iter().map(|p| format!("#include \"{}\"\n", p.display())).collect();
    inc.push_str("#define SWK_EMU_KERNEL_LIST(X)");
    for n in names {
        inc.push_str(&format!(" X({n})"));
    }
    inc.push('\n');
    let inc_path = out.join("swk_emu_kernels.inc");
    fs::write(&inc_path, inc)
        .unwrap_or_else(|e| panic!("swk: cannot write {}: {e}", inc_path.display()));
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file(emu_dir.join("emu.cpp"))
        .include(&emu_dir)
        .include(kernel_dir)
        .include(out)
        .opt_level(2)
        // The kernels' `_rn` intrinsics must stay separate IEEE operations.
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .compile("swk_emu");
}

#[cfg(not(feature = "cuda-emu"))]
fn build_emulator(_: &Path, _: &Path, _: &[PathBuf], _: &[String]) {
    unreachable!("only called with the cuda-emu feature");
}

/// Feature `cuda`: the fatbin (cubins and PTX) and the PTX on its own, by nvcc.
fn build_fatbin(manifest: &Path, kernel_dir: &Path, out: &Path, units: &[PathBuf]) {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // One translation unit including every kernel file, so one nvcc call makes one fatbin.
    let unity = out.join("swk_kernels_all.cu");
    let text: String = units.iter().map(|p| format!("#include \"{}\"\n", p.display())).collect();
    fs::write(&unity, text)
        .unwrap_or_else(|e| panic!("swk: cannot write {}: {e}", unity.display()));

    let nvcc = find_nvcc(manifest).unwrap_or_else(|| {
        panic!(
            "\n\nswk: the `cuda` feature compiles kernels/*.cu with nvcc (CUDA 13.0), and no nvcc was found.\n\
             Install the pinned toolchain (no GPU needed):\n\n    scripts/install-cuda.sh\n\n\
             which creates .cuda-venv (found automatically), or set NVCC=/path/to/nvcc or CUDA_HOME.\n\
             Searched: $NVCC, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, PATH, {}/.cuda-venv.\n",
            manifest.display()
        )
    });
    let version = nvcc_version(&nvcc);
    println!("cargo:rustc-env=SWK_NVCC_VERSION={version}");

    let help = Command::new(&nvcc)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let can_skip_compress = help.as_deref().is_ok_and(|h| h.contains("--no-compress"));
    let threads = env::var("NUM_JOBS").unwrap_or_else(|_| "1".into());

    // The fatbin: cubins for each real architecture plus compute_80 PTX.
    let fatbin = out.join("swk_kernels.fatbin");
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin").arg("-O3").arg("-I").arg(kernel_dir).arg("--threads").arg(&threads);
    if can_skip_compress {
        // Uncompressed, so the kernel names are visible in the bytes (checked by unit tests).
        cmd.arg("--no-compress");
    }
    for a in CUBIN_ARCHS {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    cmd.arg("-gencode").arg(format!("arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"));
    host_compiler(&mut cmd);
    cmd.arg("-o").arg(&fatbin).arg(&unity);
    run(cmd, "compiling the fatbin");

    // The PTX alone, to check the ISA version the driver must load.
    let ptx = out.join("swk_kernels.ptx");
    let mut cmd = Command::new(&nvcc);
    cmd.arg("--ptx").arg("-O3").arg(format!("-arch=compute_{PTX_ARCH}")).arg("-I").arg(kernel_dir);
    host_compiler(&mut cmd);
    cmd.arg("-o").arg(&ptx).arg(&unity);
    run(cmd, "compiling the PTX");
    let ptx_text = fs::read_to_string(&ptx)
        .unwrap_or_else(|e| panic!("swk: cannot read {}: {e}", ptx.display()));
    let isa = ptx_isa(&ptx_text)
        .unwrap_or_else(|| panic!("swk: {} has no `.version` line", ptx.display()));
    if isa > MAX_PTX_ISA {
        panic!(
            "\n\nswk: {} emits PTX ISA {}.{}, newer than {}.{} (the newest the CUDA 13.0 driver 580 loads).\n\
             Use the pinned toolchain: scripts/install-cuda.sh (nvcc, nvvm and crt 13.0.88).\n",
            nvcc.display(),
            isa.0,
            isa.1,
            MAX_PTX_ISA.0,
            MAX_PTX_ISA.1
        );
    }
    println!("cargo:rustc-env=SWK_PTX_ISA={}.{}", isa.0, isa.1);
    println!("cargo:rustc-env=SWK_CUBIN_ARCHS=sm_{}", CUBIN_ARCHS.join(",sm_"));
}

/// Names of `extern "C" __global__ void NAME(` kernels in a source file (also with
/// `__launch_bounds__(..)` before NAME).
fn kernel_names(src: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut rest = src;
    let pat = "extern \"C\" __global__ void ";
    while let Some(i) = rest.find(pat) {
        rest = &rest[i + pat.len()..];
        if let Some(bounds) = rest.strip_prefix("__launch_bounds__(") {
            rest = bounds.split_once(')').map_or("", |(_, after)| after.trim_start());
        }
        let name: String =
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            v.push(name);
        }
    }
    v
}

/// `(major, minor)` of the first `.version X.Y` line of a PTX file.
fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx.lines().find_map(|l| l.trim().strip_prefix(".version "))?;
    let (a, b) = line.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn host_compiler(cmd: &mut Command) {
    if let Some(cc) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(cc);
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("swk: {what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "swk: {what} failed ({}):\n{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning=nvcc: {line}");
    }
}

fn nvcc_version(nvcc: &Path) -> String {
    Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.lines().find(|l| l.contains("release")).map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} is not a file; looking elsewhere", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    // .cuda-venv/lib/python3.X/site-packages/nvidia/cu13/bin/nvcc (or cuda_nvcc/bin/nvcc).
    let mut libs: Vec<PathBuf> = fs::read_dir(manifest.join(".cuda-venv").join("lib"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("site-packages").join("nvidia")))
        .collect();
    libs.sort();
    libs.iter().find_map(|d| find_in(d, 2))
}

/// A `bin/nvcc` file under `dir`, at most `depth` levels down (sorted, so the choice is stable).
fn find_in(dir: &Path, depth: usize) -> Option<PathBuf> {
    let p = dir.join("bin").join("nvcc");
    if p.is_file() {
        return Some(p);
    }
    if depth == 0 {
        return None;
    }
    let mut subdirs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subdirs.sort();
    subdirs.into_iter().find_map(|d| find_in(&d, depth - 1))
}
