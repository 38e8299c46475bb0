#!/usr/bin/env bash
# The train-step benchmark (bench_step.py) on one GPU: xlsr_300m and xlsr_1b in bfloat16, ours against
# Hugging Face's PyTorch Wav2Vec2ForPreTraining, with device memory and MFU; first, cuDNN attention's
# numbers against XLA's (check_attention_gpu.py).
#
#   benchmarks/bench_step_gpu.sh [OUTDIR]     (env: BATCH=8 SECONDS_PER_ROW=15 STEPS=8 PRESETS="xlsr_300m xlsr_1b"
#                                              REMAT=dots, the presets' policy; PyTorch runs without checkpointing)
#
# Writes OUTDIR/bench_step_<preset>.txt (the table) and .jsonl (its JSON line) per preset as it goes, so
# a run cut short keeps what finished. Needs JAX with a GPU backend, torch with CUDA, transformers>=5.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/check_attention_gpu.py 2>&1 | tee "$out/check_attention.txt"
for preset in ${PRESETS:-xlsr_300m xlsr_1b}; do
  python3 benchmarks/bench_step.py --preset "$preset" --dtype bfloat16 --batch "${BATCH:-8}" --remat "${REMAT:-dots}" \
    --seconds "${SECONDS_PER_ROW:-15}" --steps "${STEPS:-8}" --rounds 1 2>&1 | tee "$out/bench_step_$preset.txt"
  grep '^{"bench"' "$out/bench_step_$preset.txt" > "$out/bench_step_$preset.jsonl"
done
