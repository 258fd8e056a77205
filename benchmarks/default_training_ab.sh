#!/usr/bin/env bash
# Same-machine A/B of the default training at several revisions: one epoch of configs/default.py
# on Fashion-MNIST per run, runs interleaved (REV1 REV2 ... then again) so that drift of a shared
# VM hits every revision alike; prints one BENCHMARKS.md row per run (train img/s: the mean of
# the logged windows after the compile window; wall: the whole launch.py process).
# Usage: REPEAT=2 bash benchmarks/default_training_ab.sh REV [REV ...]   (this checkout's .venv)
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
python=$repo/.venv/bin/python
data=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
dir=$(mktemp -d /tmp/shufflenet_jax_ab.XXXX)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
     "AVX-512: $(grep -q avx512 /proc/cpuinfo && echo yes || echo no); $(date -u +%F)"
for rev in "$@"; do git -C "$repo" worktree add -q --detach "$dir/$rev" "$rev"; done
for round in $(seq "${REPEAT:-2}"); do
  for rev in "$@"; do
    work=$dir/w_${rev}_$round
    start=$(date +%s.%N)
    (cd "$dir/$rev" && "$python" launch.py train --config=configs/default.py:epochs=1 \
       --config.data_dir="$data" --config.tfds_data_dir="$dir/tfds_$rev" --workdir="$work" \
       > "$work.log" 2>&1)
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    "$python" - "$work/metrics.jsonl" "$rev" "$round" "$wall" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rates = [l["img_per_sec"] for l in lines if "img_per_sec" in l][1:]  # after the compile window
top1 = [l["eval/top1"] for l in lines if "eval/top1" in l][-1]
print(f"| {sys.argv[2]} | run {sys.argv[3]} | {float(sys.argv[4]):.0f} s | "
      f"{sum(rates) / len(rates):.0f} img/s | top-1 {top1:.4f} |")
PY
  done
done
for rev in "$@"; do git -C "$repo" worktree remove --force "$dir/$rev"; done
