#!/usr/bin/env bash
# GPU check of swk's CUDA backend in two steps, for GPU machines that have the NVIDIA driver
# but no cargo, no CUDA toolkit and no network.
#
#   1. Here (a build machine, no GPU needed):
#          scripts/gpu-check.sh build
#      installs the pinned nvcc (scripts/install-cuda.sh), builds with
#      `--features cuda --release` the `swk` binary, the library's unit tests and the GPU
#      parity tests (tests/cuda/), and packs them, stripped and compressed, into
#      .gpu/bin.tar.xz (gitignored; about 13 MB: the device tool carries at most 64 MiB with
#      the working tree, so more is an error).
#      The tiny fixtures are tracked files: they travel with the working tree, and the run
#      reads them from tests/fixtures. It prints the command for step 2.
#
#   2. There (the GPU machine, in a copy of this repository with .gpu/ carried along):
#          scripts/gpu-check.sh run [STEP...]
#      runs the steps named (unit, parity, smoke, timing, bench; all when none), each under a
#      time limit:
#        - device info (nvidia-smi when present),
#        - the CUDA unit tests of the library (backend::cuda),
#        - the parity tests: CUDA vs CPU logits on every tiny fixture (f32 weights rel err
#          <= 1e-4, bf16 <= 1e-2, f16 <= 1e-4 against the CPU on f16-rounded weights),
#          spike statistics, decode through the device KV cache, perplexity scoring,
#          edits restored bit-exactly (device checksums),
#        - detection on planted models: the same super weights as the CPU backend,
#        - captured activations (every hook point of every fixture) and the analyses on the
#          device (screen, vocab, cascade, trace, compare-generate, quantize-study, mc,
#          groups, research) against the CPU's,
#        - layer streaming (`--stream`): streamed logits, statistics, edits and detection
#          equal the resident upload's; a streamed mixture of experts reading its routed
#          experts once chosen equals reading whole layers,
#        - the timing table at Llama-2-7B shapes (random weights filled on the device), with
#          the detection forward against the bandwidth floor and perplexity throughput
#          against the measured bf16 GEMM rate, and swk's gemv alone at those shapes for 1
#          to 16 rows beside cuBLAS and the mma engine (GB/s, GFMA/s; mma also by blocks
#          per multiprocessor),
#        - device profiles at 7B shapes (cublas-split and mma): the time of a detection
#          forward, a 512-token perplexity window and a decode step, kernel by kernel,
#        - the criterion hook-overhead bench on the device (benches/hook_overhead.rs),
#        - the streaming timing (8 layers at 7B shapes, streamed vs resident pass; layers
#          staged in page-locked vs pageable memory; the bf16 checkpoint's resident upload),
#        - the mixture-of-experts timing (OLMoE-1B-7B shapes: detection forward against the
#          bytes its routed experts need, one 512-token perplexity window; streamed
#          decoding with experts read once chosen vs whole layers),
#        - latent attention at DeepSeek-V3 shapes (2 dense layers: decode after 512 and
#          4096 positions against the bytes a step reads, latent KV cache included),
#        - a smoke run of the swk binary (info; detect on cuda bf16 (with --profile)/f32/f16, with the mma
#          engine, and on cpu; detect
#          on Phi-3 and Qwen2-MoE; detect and ppl with `--stream always`, Mixtral's GGUF too).
#      Logs and timing.md go to $OUT when it is set (else .gpu/results/). Exit status 0
#      only when every step passed.
#
# cuBLAS: the tests use libcublas when it loads (LD_LIBRARY_PATH is extended with the usual
# CUDA library directories found on the machine); without it they test swk's own GEMM
# kernels only, and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU_DIR=$ROOT/.gpu

usage() {
    # The header comment, up to the first line of code.
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    exit 2
}

# The executable of the test target NAME ("lib" for the library's unit tests), or with KIND
# "bench" of the bench target NAME, in cargo's JSON messages (file PATH).
artifact() { # artifact PATH NAME [KIND]
    python3 - "$1" "$2" "${3:-test}" <<'EOF'
import json, sys
path, want, kind = sys.argv[1], sys.argv[2], sys.argv[3]
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if kind == "bench":
        if "bench" in t.get("kind", []) and t.get("name") == want:
            print(m["executable"])
    elif m.get("profile", {}).get("test") and (
        (want == "lib" and "lib" in t.get("kind", [])) or (want != "lib" and t.get("name") == want)
    ):
        print(m["executable"])
EOF
}

build() {
    set -e
    eval "$(scripts/install-cuda.sh | tail -n 1)"
    export NVCC
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
    echo "== building swk (release, --features cuda)" >&2
    cargo build --release --features cuda --bin swk
    echo "== building the test binaries (release, --features cuda)" >&2
    local json
    json=$(mktemp)
    cargo test --release --features cuda --no-run --lib --test cuda --message-format=json >"$json"
    # The executables of the library's unit tests and of tests/cuda/.
    local unit cuda
    unit=$(artifact "$json" lib)
    cuda=$(artifact "$json" cuda)
    echo "== building the hook-overhead bench (--features cuda)" >&2
    cargo bench --features cuda --no-run --bench hook_overhead --message-format=json >"$json"
    local bench
    bench=$(artifact "$json" hook_overhead bench)
    rm -f "$json"
    if [ -z "$unit" ] || [ -z "$cuda" ] || [ -z "$bench" ]; then
        echo "error: could not find the test executables (unit: '$unit', cuda: '$cuda')" >&2
        exit 1
    fi
    rm -rf "$GPU_DIR"
    mkdir -p "$GPU_DIR/bin"
    cp "$CARGO_TARGET_DIR/release/swk" "$GPU_DIR/bin/swk"
    cp "$unit" "$GPU_DIR/bin/swk-unit-tests"
    cp "$cuda" "$GPU_DIR/bin/swk-cuda-tests"
    cp "$bench" "$GPU_DIR/bin/swk-hook-bench"
    # Debug info is most of each binary; the GPU machine needs none of it.
    for b in "$GPU_DIR"/bin/*; do
        strip --strip-debug "$b" 2>/dev/null || objcopy --strip-debug "$b" 2>/dev/null || true
    done
    {
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git diff --quiet 2>/dev/null || echo '(with uncommitted changes)')"
        echo "nvcc: $("$NVCC" --version | grep release)"
        (cd "$GPU_DIR" && sha256sum bin/*)
    } >"$GPU_DIR/MANIFEST"
    # The device tool carries at most 64 MiB with the working tree: the binaries travel
    # compressed (about a quarter of their size) and `run` unpacks them.
    tar -C "$GPU_DIR" -cJf "$GPU_DIR/bin.tar.xz" bin
    rm -rf "$GPU_DIR/bin"
    cat "$GPU_DIR/MANIFEST" >&2
    local gpu_kb tree_kb
    gpu_kb=$(du -sk "$GPU_DIR" | cut -f1)
    tree_kb=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -n 1 | cut -f1)
    echo "== .gpu/ is $((gpu_kb / 1024)) MB; with the tracked files $(((gpu_kb + tree_kb) / 1024)) MB" >&2
    if [ $((gpu_kb + tree_kb)) -gt $((64 * 1024)) ]; then
        echo "error: .gpu/ and the working tree are over the 64 MiB the device tool carries" >&2
        exit 1
    fi
    cat <<EOF

Next, on the GPU machine (repository root, with .gpu/ carried along):

    scripts/gpu-check.sh run

e.g. with the device tool: command "scripts/gpu-check.sh run", carry [".gpu"], timeout_s 590
(the steps unit, parity, smoke, timing and bench are capped at 60 + 180 + 30 + 240 + 90 s,
plus up to 30 s looking for libcublas; set UNIT_S, PARITY_S, SMOKE_S, TIMING_S, BENCH_S to
change them, or name the steps to run: "scripts/gpu-check.sh run unit parity").
Results (logs, timing.md, summary.txt) land in \$OUT.
EOF
}

# Add directories holding libcublas.so.13 (or any libcublas.so.*) to LD_LIBRARY_PATH.
find_cublas() {
    local dirs=() d
    while IFS= read -r d; do
        dirs+=("$d")
    done < <(
        {
            ldconfig -p 2>/dev/null | awk '/libcublas\.so/ {print $NF}'
            local known
            known=$(ls -d /usr/local/cuda*/lib64/libcublas.so* /usr/local/cuda*/targets/*/lib/libcublas.so* \
                /usr/lib/x86_64-linux-gnu/libcublas.so* /usr/lib64/libcublas.so* \
                /opt/*/.venv/lib/python3*/site-packages/nvidia/cu*/lib/libcublas.so* \
                /usr/local/lib/python3*/dist-packages/nvidia/cu*/lib/libcublas.so* 2>/dev/null)
            if [ -n "$known" ]; then
                echo "$known"
            else
                timeout 30 find / -xdev \( -path /proc -o -path /sys \) -prune -o -name 'libcublas.so.*' -print 2>/dev/null | head -n 20
            fi
        } | xargs -r -n1 dirname | awk '!seen[$0]++'
    )
    for d in "${dirs[@]}"; do
        case ":${LD_LIBRARY_PATH:-}:" in
            *":$d:"*) ;;
            *) LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
        esac
    done
    export LD_LIBRARY_PATH
    echo "libcublas directories: ${dirs[*]:-none found}"
}

# Add the driver's directory to LD_LIBRARY_PATH when libcuda is not in the loader's cache
# (cudarc opens libcuda.so.1 by name).
find_libcuda() {
    if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; then
        echo "libcuda: in the loader cache"
        return
    fi
    local d
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
        if ls "$d"/libcuda.so* >/dev/null 2>&1; then
            LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            export LD_LIBRARY_PATH
            echo "libcuda: $d"
            return
        fi
    done
    echo "libcuda: not found"
}

run() {
    if [ ! -x "$GPU_DIR/bin/swk-cuda-tests" ] && [ -f "$GPU_DIR/bin.tar.xz" ]; then
        tar -C "$GPU_DIR" -xJf "$GPU_DIR/bin.tar.xz"
    fi
    if [ ! -x "$GPU_DIR/bin/swk-cuda-tests" ]; then
        echo "error: $GPU_DIR/bin/swk-cuda-tests is missing: run 'scripts/gpu-check.sh build' on a build machine and carry .gpu/ here" >&2
        exit 2
    fi
    local out=${OUT:-$GPU_DIR/results}
    mkdir -p "$out"
    if [ ! -d "$ROOT/tests/fixtures/tiny" ]; then
        echo "error: $ROOT/tests/fixtures/tiny is missing (the tracked fixtures travel with the working tree)" >&2
        exit 2
    fi
    # The test binaries were built elsewhere: fixtures and the swk binary by these paths.
    export SWK_FIXTURES=$ROOT/tests/fixtures
    export SWK_BIN=$GPU_DIR/bin/swk
    export SWK_TIMING_OUT=$out/timing.md
    # On the GPU machine a missing device is a failure, not a skip.
    export SWK_REQUIRE_GPU=${SWK_REQUIRE_GPU:-1}
    export RUST_BACKTRACE=1
    local failed=0 summary=$out/summary.txt
    : >"$summary"
    step() { # step NAME SECONDS CMD...
        local name=$1 secs=$2
        shift 2
        local t0=$SECONDS rc
        echo "== $name" | tee -a "$summary"
        timeout --kill-after=10 "$secs" "$@" >"$out/$name.log" 2>&1
        rc=$?
        tail -n 40 "$out/$name.log"
        echo "-- $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$summary"
        # The failed tests by name, so that the summary alone says which.
        grep -E '^test .* \.\.\. FAILED$' "$out/$name.log" | tee -a "$summary" || true
        [ "$rc" = 0 ] || failed=1
    }
    {
        cat "$GPU_DIR/MANIFEST" 2>/dev/null
        nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    } >"$out/device.log" 2>&1
    find_libcuda >>"$out/device.log" 2>&1
    find_cublas >>"$out/device.log" 2>&1
    cat "$out/device.log"
    # The steps named on the command line (all when none), in this order: the correctness
    # checks first, so a run cut short by its time limit loses timings, not verdicts.
    local wanted=" ${*:-unit parity smoke timing bench} "
    wants() { [[ $wanted == *" $1 "* ]]; }
    # Step limits in seconds; override with UNIT_S, PARITY_S, SMOKE_S, TIMING_S, BENCH_S.
    # PARITY_FILTER narrows the parity step to the tests whose names contain it.
    wants unit && step unit "${UNIT_S:-60}" "$GPU_DIR/bin/swk-unit-tests" backend::cuda --test-threads=1
    wants parity && step parity "${PARITY_S:-180}" "$GPU_DIR/bin/swk-cuda-tests" ${PARITY_FILTER:+"$PARITY_FILTER"} --test-threads=1 --nocapture
    wants smoke && step smoke "${SMOKE_S:-30}" sh -c "'$GPU_DIR/bin/swk' info '$SWK_FIXTURES/tiny/llama' &&
        '$GPU_DIR/bin/swk' --device cuda --profile detect '$SWK_FIXTURES/tiny/llama' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda detect '$SWK_FIXTURES/tiny/llama' --threshold 1 --max-iterations 2 --gpu-dtype f32 --json &&
        '$GPU_DIR/bin/swk' --device cuda detect '$SWK_FIXTURES/tiny/llama' --threshold 1 --max-iterations 2 --gpu-dtype f16 &&
        '$GPU_DIR/bin/swk' --device cuda --gpu-gemm mma detect '$SWK_FIXTURES/tiny/llama' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cpu detect '$SWK_FIXTURES/tiny/llama' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda detect '$SWK_FIXTURES/tiny/phi3' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda detect '$SWK_FIXTURES/tiny/qwen2_moe' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda --gpu-gemm mma detect '$SWK_FIXTURES/tiny/qwen2_moe' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda --stream always detect '$SWK_FIXTURES/tiny/mixtral_gguf/model.gguf' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda --stream always detect '$SWK_FIXTURES/tiny/qwen2_gguf/model.gguf' --threshold 1 --max-iterations 2 &&
        '$GPU_DIR/bin/swk' --device cuda --stream always ppl '$SWK_FIXTURES/tiny/llama' --text '$SWK_FIXTURES/tiny/llama/config.json' --context 16"
    # The 7B table first (timing_7b rewrites timing.md as it goes), then the kernel-by-kernel
    # profiles and the gemv table, then the mixture-of-experts and streaming tables
    # (timing_7b_*), then latent attention (timing_mla), so that a step cut short by its cap
    # loses the last of these first.
    wants timing && step timing "${TIMING_S:-240}" sh -c "'$GPU_DIR/bin/swk-cuda-tests' timing::timing_7b --exact --ignored --nocapture --test-threads=1 &&
        '$GPU_DIR/bin/swk-cuda-tests' timing::timing_profile --exact --ignored --nocapture --test-threads=1 &&
        '$GPU_DIR/bin/swk-unit-tests' gemv_rates --ignored --nocapture --test-threads=1 &&
        '$GPU_DIR/bin/swk-cuda-tests' timing_7b_ --ignored --nocapture --test-threads=1 &&
        '$GPU_DIR/bin/swk-cuda-tests' timing::timing_mla --exact --ignored --nocapture --test-threads=1"
    wants bench && step bench "${BENCH_S:-90}" "$GPU_DIR/bin/swk-hook-bench" cuda_7b --bench --noplot
    if [ -f "$out/timing.md" ]; then
        echo "== timing.md"
        cat "$out/timing.md"
    fi
    echo "== summary"
    cat "$summary"
    exit "$failed"
}

case "${1:-}" in
    build) build ;;
    run)
        shift
        run "$@"
        ;;
    *) usage ;;
esac
