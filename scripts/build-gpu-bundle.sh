#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has CUDA 13 but no Rust
# toolchain, and collects it, stripped and gzipped, into one folder (default
# target/gpu-bundle, well under 64 MiB):
#
#   bin/ngpt.gz         the CLI, release profile
#   bin/cuda-tests.gz   runtime/tests/cuda.rs  } test profile: debug assertions are on, so
#   bin/it-tests.gz     tests/it (plan_parity) } the CUDA executor runs in check mode
#   fixtures/nv-tiny/   the fixture plan_parity reads, and manifest_dir: the path the test
#                       binary has compiled in for it (gpu-check.sh recreates it there)
#   snapshots/          tract's records (tests/it/snapshots/it__tract_snapshots__*.snap),
#                       which tract_snapshots::plan_cuda checks the GPU against
#   gpu-check.sh, torch_ngpt.py, bench_compare.sh and ort_bench.py (the side-by-side
#   table), BUNDLE.txt (commit, date, sizes)
#
# The test binaries are found the way cargo reports them:
#   cargo test --no-run -p ngpt-runtime --test cuda --message-format=json
# (the compiler-artifact line whose target is `cuda` names its "executable").
#
# Plans are not carried: gpu-check.sh makes them there with the bundled CLI (ngpt init, then
# ngpt compile --dtype f32|bf16|int8|int4), so the CLI must know the weight-only int8/int4
# plans (issue 23; checked below).
#
# Usage: scripts/build-gpu-bundle.sh [OUT_DIR]
# Then, on the GPU machine: bash OUT_DIR/gpu-check.sh OUT_DIR
# (NGPT_GPU_PARTS=tests,quant adds issue 23's rows: the 0.5b int8/int4 plans' decode and
# decode_persistent's int4 gemv entries against bf16.)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-target/gpu-bundle}
case "$out" in /*) ;; *) out="$root/$out" ;; esac

if [ "$(uname -m)" != x86_64 ]; then
    echo "error: the GPU machine is x86-64; build the bundle on an x86-64 Linux machine" >&2
    exit 1
fi

# The executable of test target $2 of package $1.
test_binary() {
    cargo test --no-run -p "$1" --test "$2" --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == name and "test" in m["target"]["kind"]:
        print(m["executable"])
' "$2" | tail -1
}

echo "building the release CLI ..." >&2
cargo build --release -p ngpt --bin ngpt
echo "building the test binaries (test profile) ..." >&2
cuda_tests=$(test_binary ngpt-runtime cuda)
it_tests=$(test_binary ngpt it)
# gpu-check.sh compiles int8 and int4 plans with this CLI.
if ! target/release/ngpt compile --help 2>/dev/null | grep -q int4; then
    echo "error: target/release/ngpt compile does not offer --dtype int4 (gpu-check.sh makes int8/int4 plans)" >&2
    exit 1
fi
for b in "$cuda_tests" "$it_tests"; do
    if [ -z "$b" ] || [ ! -x "$b" ]; then
        echo "error: a test binary was not built (run the cargo test --no-run commands above to see why)" >&2
        exit 1
    fi
done

rm -rf "$out"
mkdir -p "$out/bin" "$out/fixtures"
pack() { # source, name
    strip -o "$out/bin/$2" "$1"
    gzip -9 "$out/bin/$2"
}
pack target/release/ngpt ngpt
pack "$cuda_tests" cuda-tests
pack "$it_tests" it-tests
cp -r tests/fixtures/nv-tiny "$out/fixtures/"
mkdir -p "$out/snapshots"
cp tests/it/snapshots/it__tract_snapshots__*.snap "$out/snapshots/"
echo "$root" > "$out/manifest_dir"
cp scripts/gpu-check.sh scripts/torch_ngpt.py scripts/bench_compare.sh scripts/ort_bench.py "$out/"
{
    echo "ngpt GPU bundle"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm), $(ldd --version 2>/dev/null | head -1)"
    echo "rustc: $(rustc --version)"
    (cd "$out" && find . -type f ! -name BUNDLE.txt -exec ls -l {} + | awk '{print $5, $9}')
} > "$out/BUNDLE.txt"

size=$(du -sb "$out" | cut -f1)
echo "bundle: $out, $((size / 1024 / 1024)) MiB" >&2
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: the bundle exceeds 60 MiB; the device tool carries at most 64 MiB with the working tree" >&2
    exit 1
fi
