#!/usr/bin/env bash
# The CUDA executor on a GPU machine with CUDA 13 and no Rust toolchain, from a bundle made
# by scripts/build-gpu-bundle.sh (prebuilt, stripped x86-64 binaries):
#   1. finds libcuda, libnvrtc and libcublas and puts their folders on LD_LIBRARY_PATH;
#   2. makes the tiny and 0.5b presets (ngpt init; ngpt compile --dtype bf16, tiny also f32,
#      int8 and int4: weight-only quantized plans, issue 23);
#   3. runs the CUDA tests: runtime/tests/cuda.rs (CUDA against the CPU executor on made and
#      on these compiled plans) and tests/it/plan_parity.rs's plan_cuda bodies (against the
#      float64 reference: f32 1e-5, bf16 2e-2 with top-1 >= 95%);
#   4. ngpt validate on each plan (plan-cpu and plan-cuda against the reference);
#   5. times ngpt generate (and ngpt bench where the CLI has it) with plan-cuda, and
#      plan-cpu beside it; runs ngpt logits --engine plan-cuda (against the float64
#      reference) and ngpt demo (its plan-cuda row must be ok); prints a short table.
# Every step has a time limit; the whole run stays well under 10 minutes on an H200 machine.
# Logs go to $OUT (the device tool's folder) when set, else to the work folder.
#
#   6. with NGPT_GPU_PARTS naming `targets`: issue 7's GPU figures on the 0.5b bf16 plan
#      (decode floor fraction at 256 new tokens, with and without the CUDA graph; a
#      2048-token prefill against cuBLAS's bf16 rate; batch 8 and 32 decode), then the
#      PyTorch nGPT (scripts/torch_ngpt.py, carried in the bundle): its f32 logits checked
#      against ngpt's reference, then bf16 as model.py runs it and under torch.compile
#      with a static cache, 128-token prompt and 256 new tokens; a second table.
#
# Usage: bash gpu-check.sh [BUNDLE_DIR]       (default: the folder holding this script)
# NGPT_GPU_CHECK_HALF=0 leaves out the 0.5b preset (a dry run on a small machine).
# NGPT_GPU_CPU_ROWS=0 leaves out the plan-cpu generate and bench rows, NGPT_GPU_TORCH=0
# the PyTorch rows (each saves device time).
# NGPT_GPU_PARTS: comma-separated, of `tests` (steps 3 to 5), `optin` (step 5c: the tests
# again with the opt-in GPU paths on), `quant` (step 5d: issue 23's GPU rows, the 0.5b
# int8 and int4 plans' decode against bf16 and decode_persistent's int4 gemv entries
# against bf16's, about 3 minutes), `targets` (step 6) and
# `compare` (step 7: scripts/bench_compare.sh's table, about 5 minutes), or
# `targets-if-ok` (step 6 only when every earlier check passed); default `tests`. The work folder is /tmp/ngpt-gpu-check: a second call on a machine
# still warm reuses the models made by the first.
# Exit status: 0 when every check passed, 1 otherwise.
set -uo pipefail

bundle=${1:-$(cd "$(dirname "$0")" && pwd)}
bundle=$(cd "$bundle" && pwd)
work=/tmp/ngpt-gpu-check
mkdir -p "$work"
parts=",${NGPT_GPU_PARTS:-tests},"
# The opt-in GPU paths (off by default until measured on a GPU): run again with these.
# The CUDA executor takes typed options; the binaries here read them from NGPT_CUDA_OPTIONS
# (key=value,...; runtime/src/options.rs), which parses strictly.
optin_keys="experimental.prefill_mma=on,experimental.pd_stream=on,experimental.pd_barrier=acqrel,experimental.pd_attention=wide"
optin="NGPT_CUDA_OPTIONS=$optin_keys"
logdir=${OUT:-$work}
mkdir -p "$logdir"
log="$logdir/gpu-check.log"
table="$logdir/gpu-check-table.txt"
: > "$log"
failures=0
started=$(date +%s)

say() { echo "$*" | tee -a "$log" >&2; }
fail() { say "FAIL: $*"; failures=$((failures + 1)); }
# run LIMIT_S LABEL CMD...: runs with a time limit, output to the log (stdout to
# $STDOUT instead when that is set).
run() {
    local limit=$1 label=$2
    shift 2
    say "== $label"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >>"${STDOUT:-$log}" 2>>"$log"
    rc=$?
    t1=$(date +%s.%N)
    say "   exit $rc after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s"
    return $rc
}

# --- 1. binaries and libraries ---------------------------------------------------------
for f in "$bundle"/bin/*.gz; do
    gunzip -c "$f" > "$work/$(basename "${f%.gz}")" && chmod +x "$work/$(basename "${f%.gz}")"
done
ngpt="$work/ngpt"
for b in ngpt cuda-tests it-tests; do
    [ -x "$work/$b" ] || { say "error: $bundle/bin/$b.gz is missing (scripts/build-gpu-bundle.sh)"; exit 1; }
done
[ -f "$bundle/BUNDLE.txt" ] && cat "$bundle/BUNDLE.txt" >> "$log"

add_lib_dir() {
    case ":${LD_LIBRARY_PATH:-}:" in
    *":$1:"*) ;;
    *) export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
}
# find_lib SONAME: succeeds when the loader can find it, adding its folder if needed.
find_lib() {
    ldconfig -p 2>/dev/null | awk '{print $1}' | grep -qx "$1" && return 0
    local d f path=${LD_LIBRARY_PATH:-}
    for d in ${path//:/ }; do [ -e "$d/$1" ] && return 0; done
    f=$(find /usr/local/nvidia /usr/local/cuda /usr/local/cuda-13* /usr/lib/x86_64-linux-gnu \
        /usr/lib64 /opt -maxdepth 10 -name "$1" 2>/dev/null | head -1)
    [ -n "$f" ] || return 1
    add_lib_dir "$(dirname "$f")"
}
for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
    find_lib "$lib" || fail "$lib not found; plan-cuda will say what is missing"
done
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log" >&2
export NGPT_CACHE_DIR="$work/kernel-cache"

# plan_parity reads nv-tiny from the path compiled into it: put the fixture there.
mdir=$(cat "$bundle/manifest_dir" 2>/dev/null || echo /nonexistent)
if [ ! -e "$mdir/tests/fixtures/nv-tiny/ckpt.pt" ]; then
    mkdir -p "$mdir/tests/fixtures" && cp -r "$bundle/fixtures/nv-tiny" "$mdir/tests/fixtures/" ||
        fail "cannot place the nv-tiny fixture at $mdir/tests/fixtures (plan_parity needs it)"
fi
# tract's records, which tract_snapshots::plan_cuda reads from the same compiled-in path.
if [ -d "$bundle/snapshots" ]; then
    mkdir -p "$mdir/tests/it/snapshots" && cp "$bundle"/snapshots/*.snap "$mdir/tests/it/snapshots/" ||
        fail "cannot place tract's records at $mdir/tests/it/snapshots"
fi

json_field() { # FILE FIELD: a number from the last JSON line of FILE
    python3 - "$1" "$2" <<'EOF' 2>/dev/null || echo "-"
import json, sys
last = [l for l in open(sys.argv[1]) if l.startswith("{")][-1]
v = json.loads(last).get(sys.argv[2])
print("-" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.1f}" if isinstance(v, float) else v))
EOF
}
vocab_of() { grep -o '"vocab_size": *[0-9]*' "$1/config.json" | grep -o '[0-9]*$'; }
tokens_for() { # VOCAB N: N pseudo-random ids
    awk -v v="$1" -v n="$2" 'BEGIN{for(i=0;i<n;i++) printf "%s%d", (i?",":""), (i*7919+5)%v}'
}
# --- 2. models --------------------------------------------------------------------------
models="$work/models"
mkdir -p "$models"
# once LIMIT_S LABEL OUTPUT CMD...: runs CMD unless OUTPUT was made by an earlier call.
once() {
    local limit=$1 label=$2 made=$3
    shift 3
    [ -f "$made.done" ] && { say "== $label: kept from an earlier call"; return 0; }
    rm -rf "$made"
    run "$limit" "$label" "$@" && touch "$made.done"
}
once 60 "init tiny" "$models/tiny" "$ngpt" init "$models/tiny" --preset tiny || fail "ngpt init tiny"
half=${NGPT_GPU_CHECK_HALF:-1}
if [ "$half" != 0 ]; then
    once 120 "init 0.5b" "$models/half" "$ngpt" init "$models/half" --preset 0.5b || fail "ngpt init 0.5b"
fi
once 60 "compile tiny f32" "$models/tiny-f32" "$ngpt" compile "$models/tiny" -o "$models/tiny-f32" ||
    fail "compile tiny f32"
once 60 "compile tiny bf16" "$models/tiny-bf16" "$ngpt" compile "$models/tiny" -o "$models/tiny-bf16" \
    --dtype bf16 || fail "compile tiny bf16"
# Weight-only int8 and int4 plans (issue 23; no model.onnx: --no-onnx).
for q in int8 int4; do
    once 60 "compile tiny $q" "$models/tiny-$q" "$ngpt" compile "$models/tiny" -o "$models/tiny-$q" \
        --dtype "$q" --no-onnx || fail "compile tiny $q"
done
plans="$models/tiny-f32,$models/tiny-bf16,$models/tiny-int8,$models/tiny-int4"
if [ "$half" != 0 ]; then
    once 240 "compile 0.5b bf16" "$models/half-bf16" "$ngpt" compile "$models/half" \
        -o "$models/half-bf16" --dtype bf16 --max-seq-len 2304 || fail "compile 0.5b bf16"
    plans="$plans,$models/half-bf16"
fi

if [[ $parts == *,tests,* ]]; then
# --- 3. CUDA tests ------------------------------------------------------------------------
# NGPT_GPU_TEST_REPEAT passes (default 1; session 5 ran 9 passes after the concurrency fix
# without a failure, RELIABILITY.md), to look for failures that come and go.
for i in $(seq 1 "${NGPT_GPU_TEST_REPEAT:-1}"); do
    NGPT_CUDA_TEST_PLANS="$plans" run 300 "runtime/tests/cuda.rs (pass $i)" \
        "$work/cuda-tests" --test-threads 4 --nocapture || fail "runtime/tests/cuda.rs (pass $i)"
done
NGPT_CUDA_OPTIONS=attention=simple,persistent=off NGPT_CUDA_TEST_PLANS="$plans" run 200 \
    "runtime/tests/cuda.rs, first (untiled) attention kernels, decode launch by launch" \
    "$work/cuda-tests" --test-threads 4 ||
    fail "runtime/tests/cuda.rs (attention=simple,persistent=off)"
run 200 "tests/it/plan_parity.rs plan_cuda" \
    "$work/it-tests" plan_parity::plan_cuda --test-threads 4 --nocapture || fail "plan_parity plan_cuda"
# plan-cuda (f32 and bf16 weights) against tract's recorded output of each test model.
run 200 "tests/it/tract_snapshots.rs plan_cuda" \
    "$work/it-tests" tract_snapshots::plan_cuda --test-threads 2 --nocapture ||
    fail "tract_snapshots plan_cuda"
say "   tract records: $(grep -cE "weights match tract's record" "$log") model x dtype rows match"
if grep -q "cooperative launch" "$log"; then
    say "   NOTE: the driver refused decode_persistent's cooperative launch at least once: $(grep -m1 'cooperative launch' "$log")"
fi
if grep -q "^skipped: " "$log"; then
    fail "some CUDA tests skipped on a GPU machine: $(grep -m1 '^skipped: ' "$log")"
fi

# --- 4 and 5. validate and timings -------------------------------------------------------
has_bench=0
"$ngpt" bench --help >/dev/null 2>&1 && has_bench=1

rows=()
for m in tiny-f32 tiny-bf16 tiny-int8 tiny-int4 half-bf16; do
    dir="$models/$m"
    [ -f "$dir/model.plan" ] || continue
    src="$models/${m%%-*}"
    vocab=$(vocab_of "$src")
    if run 240 "validate $m" "$ngpt" validate "$dir" --engines plan-cpu,plan-cuda; then
        validate=ok
    else
        validate=FAIL
        fail "ngpt validate $m"
    fi
    # The validate table's plan-cuda line, for the summary.
    cuda_line=$(grep -E "^ *plan-cuda " "$log" | tail -1 | tr -s ' ')
    case "$cuda_line" in *skipped*) fail "validate $m: plan-cuda was skipped on a GPU machine" ;; esac
    toks=$(tokens_for "$vocab" 128)
    engines="plan-cuda plan-cpu"
    [ "${NGPT_GPU_CPU_ROWS:-1}" = 0 ] && engines=plan-cuda
    for engine in $engines; do
        gen="$work/gen-$m-$engine.out"
        if ! STDOUT="$gen" run 180 "generate $m $engine" "$ngpt" generate "$dir" \
            --engine "$engine" --tokens "$toks" --max-new-tokens 64 --json; then
            [ "$engine" = plan-cuda ] && fail "generate $m plan-cuda"
        fi
        cat "$gen" >> "$log"
        gp=$(json_field "$gen" prefill_tokens_per_s)
        gd=$(json_field "$gen" decode_tokens_per_s)
        bp=- bd=- ttft=- floor=-
        if [ "$has_bench" = 1 ]; then
            bench="$work/bench-$m-$engine.out"
            if STDOUT="$bench" run 240 "bench $m $engine" "$ngpt" bench "$dir" \
                --engine "$engine" --prompt-len 128 --gen-len 64 --runs 3 --json; then
                bp=$(json_field "$bench" prefill_tokens_per_s)
                bd=$(json_field "$bench" decode_tokens_per_s)
                ttft=$(json_field "$bench" ttft_ms)
                floor=$(json_field "$bench" decode_floor_fraction)
            elif [ "$engine" = plan-cuda ]; then
                fail "bench $m plan-cuda"
            fi
            cat "$bench" >> "$log"
        fi
        rows+=("$(printf '%-10s %-9s %-8s %12s %12s %12s %12s %9s %7s' \
            "$m" "$engine" "$validate" "$gp" "$gd" "$bp" "$bd" "$ttft" "$floor")")
    done
    say "   validate $m: ${cuda_line:-no plan-cuda line}"
done

# --- 5b. the other plan-cuda entry points: ngpt logits and ngpt demo ---------------------
cat > "$work/compare_npy.py" <<'EOF'
import sys
import numpy as np
a = np.load(sys.argv[1]).astype(np.float64)
b = np.load(sys.argv[2]).astype(np.float64)
rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
print(f"relative error {rel:.3e}, top-1 {top1:.3f}")
sys.exit(0 if np.isfinite(rel) and rel <= 1e-5 and top1 >= 0.95 else 1)
EOF
ltoks=$(tokens_for "$(vocab_of "$models/tiny")" 48)
if run 120 "logits tiny-f32 --engine plan-cuda" "$ngpt" logits "$models/tiny-f32" --tokens "$ltoks" \
    --engine plan-cuda -o "$work/logits-cuda.npy" &&
    run 120 "logits tiny (reference, f64)" "$ngpt" logits "$models/tiny" --tokens "$ltoks" \
        -o "$work/logits-ref.npy"; then
    lcmp=$(python3 "$work/compare_npy.py" "$work/logits-cuda.npy" "$work/logits-ref.npy" 2>&1) ||
        fail "ngpt logits --engine plan-cuda against the reference: $lcmp"
    say "   ngpt logits --engine plan-cuda vs the float64 reference (tiny, f32 plan): $lcmp"
else
    fail "ngpt logits --engine plan-cuda"
fi
if STDOUT="$work/demo.out" run 300 "ngpt demo" "$ngpt" demo; then
    demo_row=$(grep -E "^ *plan-cuda " "$work/demo.out" | tail -1 | tr -s ' ')
    say "   ngpt demo's plan-cuda row:${demo_row:- none}"
    case "$demo_row" in *" ok") ;; *) fail "ngpt demo: plan-cuda did not run ok" ;; esac
else
    fail "ngpt demo"
fi
cat "$work/demo.out" >> "$log" 2>/dev/null

{
    echo
    echo "ngpt gpu-check on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%Y-%m-%d)"
    printf '%-10s %-9s %-8s %12s %12s %12s %12s %9s %7s\n' model engine validate \
        "gen pre t/s" "gen dec t/s" "bench pre" "bench dec" "ttft ms" "floor"
    printf '%s\n' "${rows[@]}"
    echo "(generate: 128-token prompt, 64 new tokens, batch 1; bench: medians of 3 runs; floor: decode time floor / measured)"
    echo "tests: $(grep -cE '^test .* ok$' "$log") ok, $(grep -cE '^test .* FAILED$' "$log") failed; $failures check(s) failed; $(( $(date +%s) - started )) s; log: $log"
} | tee "$table"
fi

# --- 5c. the opt-in paths (`optin`), until measured here: prefill attention on the tensor
# cores (attention_prefill_mma, bf16 plans), decode_persistent's weight streaming and its
# release/acquire barrier; every plan of both test binaries through them, against the CPU
# executor and the float64 reference, and ngpt validate on the bf16 plans.
if [[ $parts == *,optin,* ]]; then
    run 300 "runtime/tests/cuda.rs, $optin" env $optin NGPT_CUDA_TEST_PLANS="$plans" \
        "$work/cuda-tests" --test-threads 4 --nocapture || fail "runtime/tests/cuda.rs ($optin)"
    run 200 "tests/it/plan_parity.rs plan_cuda, $optin" env $optin \
        "$work/it-tests" plan_parity::plan_cuda --test-threads 4 --nocapture ||
        fail "plan_parity plan_cuda ($optin)"
    for m in tiny-bf16 half-bf16; do
        [ -f "$models/$m/model.plan" ] || continue
        run 240 "validate $m, $optin" env $optin "$ngpt" validate "$models/$m" --engines plan-cuda ||
            fail "ngpt validate $m ($optin)"
        say "   validate $m, $optin: $(grep -E "^ *plan-cuda " "$log" | tail -1 | tr -s ' ')"
    done
    if grep -q "^skipped: " "$log"; then
        fail "some CUDA tests skipped on a GPU machine: $(grep -m1 '^skipped: ' "$log")"
    fi
fi

# --- 5d. issue 23's GPU rows (`quant`): decode of the 0.5b preset's int8 and int4 plans
# (lm_head int8 in both, the default) against its bf16 plan, batch 1, 128-token prompt, 256
# new tokens, one machine, one call; then the GPU time of decode_persistent's gemv entries
# (option profile=on, program decode.pd: the gemv entries' times per decode step summed)
# for the int8 and int4 plans against the bf16 one. Issue 23's target: int4 gemv entries
# at least 2x faster than bf16's.
if [[ $parts == *,quant,* ]] && [ "$half" != 0 ] && [ -f "$models/half/config.json" ]; then
    qrows=()
    for q in int8 int4; do
        once 300 "compile 0.5b $q" "$models/half-$q" "$ngpt" compile "$models/half" -o "$models/half-$q" \
            --dtype "$q" --no-onnx --max-seq-len 2304 || fail "compile 0.5b $q"
    done
    for m in half-bf16 half-int8 half-int4; do
        [ -f "$models/$m/model.plan" ] || continue
        out="$work/q-bench-$m.out"
        if STDOUT="$out" run 180 "quant: bench $m plan-cuda b1 p128 g256" env NGPT_CUDA_OPTIONS=check=off \
            "$ngpt" bench "$models/$m" --engine plan-cuda --prompt-len 128 --gen-len 256 --runs 3 --json; then
            qrows+=("$(printf '%-10s %12s %12s %9s %8s' "$m" "$(json_field "$out" prefill_tokens_per_s)" \
                "$(json_field "$out" decode_tokens_per_s)" "$(json_field "$out" ttft_ms)" \
                "$(json_field "$out" decode_floor_fraction)")")
        else
            fail "quant: bench $m plan-cuda"
            qrows+=("$(printf '%-10s failed' "$m")")
        fi
        cat "$out" >> "$log"
    done
    # GPU time of the gemv entries a decode step, from a profile's decode.pd lines
    # (`  decode.pd gemv int4 m3072 k1024 + lerp_norm   31 calls   1.234 ms ...`).
    cat > "$work/gemv_time.py" <<'EOF'
import re, sys
total, n = 0.0, 0
for line in open(sys.argv[1]):
    m = re.match(r"\s+decode\.pd\s+gemv.*?\s(\d+) calls\s+([\d.]+) ms", line)
    if m:
        total += float(m.group(2)) / int(m.group(1))
        n += 1
print(f"{total:.4f} {n}" if n else "- 0")
EOF
    declare -A gemv_ms=()
    for m in half-bf16 half-int8 half-int4; do
        [ -f "$models/$m/model.plan" ] || continue
        prof="$work/q-profile-$m.out"
        say "== quant: profile $m p128 g32"
        env NGPT_CUDA_OPTIONS=check=off,profile=on timeout 180 "$ngpt" bench "$models/$m" \
            --engine plan-cuda --prompt-len 128 --gen-len 32 --runs 1 >"$prof" 2>&1 || fail "quant: profile $m"
        cat "$prof" >> "$log"
        read -r ms entries < <(python3 "$work/gemv_time.py" "$prof")
        gemv_ms[$m]=$ms
        say "   $m: decode_persistent gemv entries $ms ms a decode step ($entries entries)"
        [ "${entries:-0}" != 0 ] ||
            fail "quant: no decode.pd gemv entries in the $m profile (did decode run as decode_persistent?)"
    done
    # speedup PLAN: bf16's gemv time over PLAN's.
    speedup() {
        awk -v a="${gemv_ms[half-bf16]:--}" -v b="${gemv_ms[$1]:--}" \
            'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else printf "-" }'
    }
    {
        echo
        echo "issue 23 GPU rows, 0.5b preset, weight-only int8/int4 plans against bf16, $(date -u +%Y-%m-%d)"
        printf '%-10s %12s %12s %9s %8s\n' plan "prefill t/s" "decode t/s" "ttft ms" "dec.fl"
        printf '%s\n' "${qrows[@]}"
        echo "decode_persistent gemv entries a decode step (profile=on, p128 g32): bf16 ${gemv_ms[half-bf16]:--} ms," \
            "int8 ${gemv_ms[half-int8]:--} ms ($(speedup half-int8) faster), int4 ${gemv_ms[half-int4]:--} ms" \
            "($(speedup half-int4) faster; target >= 2x)"
    } | tee -a "$table"
fi

# --- 6. issue 7's GPU targets --------------------------------------------------------------
# `targets-if-ok` runs them only when every earlier check passed.
if [[ -f "$models/half-bf16/model.plan" ]] &&
    { [[ $parts == *,targets,* ]] || { [[ $parts == *,targets-if-ok,* ]] && [ "$failures" -eq 0 ]; }; }; then
    dir="$models/half-bf16"
    trows=()
    profiles=()
    # bench_row LABEL LIMIT ENV... -- ARGS...: one ngpt bench plan-cuda row.
    bench_row() {
        local label=$1 limit=$2
        shift 2
        local envs=()
        while [ "$1" != -- ]; do envs+=("$1"); shift; done
        shift
        local out="$work/t-${label//[^a-zA-Z0-9]/_}.out"
        if STDOUT="$out" run "$limit" "target: $label" env "${envs[@]}" "$ngpt" bench "$dir" \
            --engine plan-cuda --json "$@"; then
            cat "$out" >> "$log"
            trows+=("$(printf '%-34s %12s %12s %9s %8s %8s' "$label" \
                "$(json_field "$out" prefill_tokens_per_s)" "$(json_field "$out" decode_tokens_per_s)" \
                "$(json_field "$out" ttft_ms)" "$(json_field "$out" decode_floor_fraction)" \
                "$(json_field "$out" prefill_floor_fraction)")")
        else
            cat "$out" >> "$log"
            fail "target bench: $label"
            trows+=("$(printf '%-34s failed' "$label")")
        fi
    }
    # (Session 5 measured no graph, steps unfolded, no L2 prefetch and cuBLAS only:
    # BENCHMARKS.md. The rows below are what is open.)
    bench_row "plan-cuda b1 p128 g256" 120 NGPT_CUDA_OPTIONS=check=off -- --prompt-len 128 --gen-len 256 --runs 5
    # decode_persistent launched cooperatively is the default since issue 19 (unmeasured):
    # the plain launch beside it, and the log says whether the driver refused it.
    bench_row "plan-cuda b1 p128 g256 plain launch" 120 NGPT_CUDA_OPTIONS=check=off,cooperative=off -- \
        --prompt-len 128 --gen-len 256 --runs 5
    bench_row "plan-cuda b1 p128 g256 launch by launch" 120 NGPT_CUDA_OPTIONS=check=off,persistent=off -- \
        --prompt-len 128 --gen-len 256 --runs 3
    bench_row "plan-cuda b1 p128 g256 2 blocks/SM" 120 NGPT_CUDA_OPTIONS=check=off,experimental.pd_min_blocks=2 -- \
        --prompt-len 128 --gen-len 256 --runs 3
    bench_row "plan-cuda b1 p128 g256 weights streamed" 120 NGPT_CUDA_OPTIONS=check=off,experimental.pd_stream=on -- \
        --prompt-len 128 --gen-len 256 --runs 5
    bench_row "plan-cuda b1 p128 g256 acq/rel barrier" 120 NGPT_CUDA_OPTIONS=check=off,experimental.pd_barrier=acqrel -- \
        --prompt-len 128 --gen-len 256 --runs 5
    bench_row "plan-cuda b1 p128 g256 wide attention" 120 NGPT_CUDA_OPTIONS=check=off,experimental.pd_attention=wide -- \
        --prompt-len 128 --gen-len 256 --runs 5
    bench_row "plan-cuda b1 p128 g256 all opt-ins" 120 NGPT_CUDA_OPTIONS=check=off,$optin_keys -- \
        --prompt-len 128 --gen-len 256 --runs 5
    bench_row "plan-cuda b1 p2048 g16" 120 NGPT_CUDA_OPTIONS=check=off -- --prompt-len 2048 --gen-len 16 --runs 3
    bench_row "plan-cuda b1 p2048 g64 wide attention" 120 NGPT_CUDA_OPTIONS=check=off,experimental.pd_attention=wide -- \
        --prompt-len 2048 --gen-len 64 --runs 3
    bench_row "plan-cuda b1 p2048 g64" 120 NGPT_CUDA_OPTIONS=check=off -- --prompt-len 2048 --gen-len 64 --runs 3
    bench_row "plan-cuda b1 p2048 g16 tensor-core attention" 120 NGPT_CUDA_OPTIONS=check=off,experimental.prefill_mma=on -- \
        --prompt-len 2048 --gen-len 16 --runs 3
    bench_row "plan-cuda b8 p128 g64" 120 NGPT_CUDA_OPTIONS=check=off -- --prompt-len 128 --gen-len 64 --batch 8 --runs 3
    bench_row "plan-cuda b8 p128 g64 weights streamed" 120 NGPT_CUDA_OPTIONS=check=off,experimental.pd_stream=on -- \
        --prompt-len 128 --gen-len 64 --batch 8 --runs 3
    bench_row "plan-cuda b32 p128 g64" 120 NGPT_CUDA_OPTIONS=check=off -- --prompt-len 128 --gen-len 64 --batch 32 --runs 3
    # Where the time goes: GPU time per kernel (the option profile=on, printed at exit).
    for shape in "128 32 0" "128 32 1" "2048 4 0" "2048 4 1"; do
        set -- $shape
        prof="$work/profile-p$1-optin$3.out"
        say "== profile p$1 g$2 (opt-ins: ${3/1/$optin})"
        optins=""
        [ "$3" = 1 ] && optins=",$optin_keys"
        env NGPT_CUDA_OPTIONS="check=off,profile=on$optins" timeout 120 "$ngpt" bench "$dir" \
            --engine plan-cuda --prompt-len "$1" --gen-len "$2" --runs 1 >"$prof" 2>&1 ||
            fail "profile p$1"
        cat "$prof" >> "$log"
        profiles+=("$(grep -E '^  (prefill|decode|decode\.pd) ' "$prof" |
            awk '{c[$1]++} c[$1] <= ($1 == "decode.pd" ? 14 : 8)')")
    done
    # PyTorch: first its f32 logits against ngpt's reference (so that the rows below time
    # the same model), then the two ways users run it.
    torch_py="$bundle/torch_ngpt.py"
    if [ "${NGPT_GPU_TORCH:-1}" != 0 ]; then
    ids=$(tokens_for "$(vocab_of "$models/half")" 48)
    if run 180 "reference logits 0.5b (48 tokens)" "$ngpt" logits "$models/half" --tokens "$ids" \
        -o "$work/half-ref.npy" --precision f64 &&
        STDOUT="$work/torch-check.out" run 120 "torch f32 check" python3 "$torch_py" "$models/half" \
            --check "$work/half-ref.npy" --tokens "$ids"; then
        tcheck=$(tail -1 "$work/torch-check.out")
    else
        tcheck="FAILED: $(tail -1 "$work/torch-check.out" 2>/dev/null)"
        fail "torch_ngpt.py --check"
    fi
    cat "$work/torch-check.out" >> "$log" 2>/dev/null
    for mode in nvidia static; do
        out="$work/torch-$mode.out"
        if STDOUT="$out" run 300 "torch $mode" python3 "$torch_py" "$models/half" --mode "$mode" \
            --prompt-len 128 --gen-len 256; then
            trows+=("$(printf '%-34s %12s %12s %9s' "torch $mode b1 p128 g256" \
                "$(json_field "$out" prefill_tokens_per_s)" "$(json_field "$out" decode_tokens_per_s)" \
                "$(json_field "$out" ttft_ms)")")
        else
            fail "torch $mode"
            trows+=("$(printf '%-34s failed' "torch $mode b1 p128 g256")")
        fi
        cat "$out" >> "$log"
    done
    else
        tcheck="not run (NGPT_GPU_TORCH=0)"
    fi
    {
        echo
        echo "issue 7 GPU targets, 0.5b preset, bf16 plan, $(date -u +%Y-%m-%d)"
        printf '%-34s %12s %12s %9s %8s %8s\n' run "prefill t/s" "decode t/s" "ttft ms" "dec.fl" "pre.fl"
        printf '%s\n' "${trows[@]}"
        echo "torch f32 logits vs ngpt reference: $tcheck"
        echo "profiles (p128 g32, then p2048 g4; top 8 per program):"
        printf '%s\n' "${profiles[@]}"
        echo "(dec.fl: decode floor / measured; pre.fl: prefill FLOP floor at cuBLAS bf16 rate / measured)"
        echo "$failures check(s) failed; $(( $(date +%s) - started )) s"
    } | tee -a "$table"
fi
# --- 7. issue 7's side-by-side table (`compare`): scripts/bench_compare.sh on the 0.5b
# preset: ngpt plan-cpu, tract, onnxruntime CPU, and here ngpt plan-cuda, onnxruntime CUDA
# (where its provider loads) and the two PyTorch rows, with ratios to ngpt's decode rate.
if [[ $parts == *,compare,* ]] && [ -f "$models/half/config.json" ]; then
    if STDOUT="$work/compare.out" run 500 "scripts/bench_compare.sh 0.5b p128 g256" \
        env NGPT="$ngpt" PYTHON=python3 bash "$bundle/bench_compare.sh" "$models/half" 128 256 1; then
        { echo; echo "scripts/bench_compare.sh, 0.5b preset, $(date -u +%Y-%m-%d)"; cat "$work/compare.out"; } |
            tee -a "$table"
    else
        fail "scripts/bench_compare.sh"
        cat "$work/compare.out" >> "$log"
    fi
fi
[ "$failures" -eq 0 ]
