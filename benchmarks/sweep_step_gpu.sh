#!/usr/bin/env bash
# Variants of the GPU train-step benchmark (bench_step.py, ours only) in one short device session: all
# variants compile at once on the host's cores, then each is timed alone on the GPU (bench_step.py
# --queue). On the H200 machine's 16 cores, 9 variants (4 of them unrolled) compiled side by side in
# 129-188 s and were all timed within 449 s; one scanned xlsr_300m variant alone needs ~60 s from process
# start to its first step.
#
#   benchmarks/sweep_step_gpu.sh OUTDIR [VARIANTS]
#
# VARIANTS: a file of lines `label|bench_step.py options|extra XLA_FLAGS` (# comments); without it, the
# variants below. Every run is bfloat16, 15 s rows, 8 steps (1 + 7 timed), with XLA's GPU memory
# allocated on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false: the runs share the device while they wait).
# Writes OUTDIR/LABEL.txt per variant and OUTDIR/summary.txt (one row per variant, then their JSON lines).
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
list=${2:-}
[[ -n "$list" ]] && list=$(cd "$(dirname "$list")" && pwd)/$(basename "$list")
cd "$(dirname "$0")/.."
if [[ -n "$list" ]]; then
  variants=$(grep -v '^\s*#' "$list" | grep -v '^\s*$')
else
  # The presets' remat policy (dots) and no remat, each also without norm_act_remat, scanned and unrolled
  # layers, larger batches, and one profile (bench_step.py runs it with CUDA graphs off, so that each
  # kernel keeps its HLO name).
  variants="dots300|--preset xlsr_300m --batch 8 --remat dots|
dots300_no_nar|--preset xlsr_300m --batch 8 --remat dots --no-norm-act-remat|
none300|--preset xlsr_300m --batch 8|
none300_no_nar|--preset xlsr_300m --batch 8 --no-norm-act-remat|
unrolled300|--preset xlsr_300m --batch 8 --unrolled|
b32_dots300|--preset xlsr_300m --batch 32 --remat dots|
b32_unrolled300|--preset xlsr_300m --batch 32 --unrolled|
dots1b|--preset xlsr_1b --batch 8 --remat dots|
b16_dots1b|--preset xlsr_1b --batch 16 --remat dots|
prof_dots300|--preset xlsr_300m --batch 8 --remat dots --profile-top 40|"
fi
queue=$(mktemp -d)
n=$(grep -c . <<< "$variants")
echo "$n variants, compiling together, then timed one at a time" >&2
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
labels=()
while IFS='|' read -r label opts xla; do
  labels+=("$label")
  flags=$(echo "${XLA_FLAGS:-} $xla" | xargs)  # XLA reads a non-empty value that is not a flag as a file
  # shellcheck disable=SC2086  # opts is a list of options
  env ${flags:+XLA_FLAGS="$flags"} python3 benchmarks/bench_step.py $opts --dtype bfloat16 --seconds "${SECONDS_PER_ROW:-15}" \
    --steps "${STEPS:-8}" --rounds 1 --frameworks ours --queue "$queue" --queue-size "$n" --label "$label" \
    > "$out/$label.txt" 2>&1 &
done <<< "$variants"
wait
rm -rf "$queue"
python3 - "$out" "${labels[@]}" <<'PY' | tee "$out/summary.txt"
import json, os, sys
rows = []
for label in sys.argv[2:]:
    path = os.path.join(sys.argv[1], f"{label}.txt")
    lines = [line for line in open(path) if line.startswith('{"bench"')]
    if not lines:
        print(f"{label:<20} failed: {open(path).read()[-300:]!r}")
        continue
    record = json.loads(lines[-1])
    ours = record["results"].get("ours")
    if not ours:
        print(f"{label:<20} failed: {record['failed']}")
        continue
    rows.append(record)
    print(f"{label:<20} step {ours['step_s_median']:.4f} s ({ours['step_s_min']:.4f}-{ours['step_s_max']:.4f})  "
          f"MFU {ours['mfu']:.1%}  device peak {ours['device_peak_gib']:.2f} GiB  compile {ours['compile_s']:.0f} s"
          if ours.get("mfu") is not None else f"{label:<20} step {ours['step_s_median']:.4f} s")
for record in rows:
    print(json.dumps(record))
PY
