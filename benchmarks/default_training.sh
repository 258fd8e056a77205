#!/usr/bin/env bash
# Times what a newcomer runs: a fresh clone, then `make train` (venv, requirements, data, the
# default config), and prints a BENCHMARKS.md row with wall time, train img/s and test top-1.
# Usage: bash benchmarks/default_training.sh [REPO_URL_OR_PATH]   (default: this checkout)
set -euo pipefail
src=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
dir=$(mktemp -d /tmp/shufflenet_jax_bench.XXXX)
git clone -q "$src" "$dir/repo"
cd "$dir/repo"
start=$(date +%s)
make train 2>&1 | tee "$dir/train.log" | grep -E "^(Training|Done|Resuming)|error" || true
end=$(date +%s)
python3 - "$dir/repo/workdirs/default/metrics.jsonl" "$((end - start))" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
evals = [l for l in lines if "eval/top1" in l]
rates = [l["img_per_sec"] for l in lines if "img_per_sec" in l][1:]  # skip the compile window
print(f"| make train (fresh clone, default config) | {int(sys.argv[2])} s wall | "
      f"{sum(rates) / max(1, len(rates)):.0f} img/s train | test top-1 {evals[-1]['eval/top1']:.4f} "
      f"({int(evals[-1]['eval/num_examples'])} images) |")
PY
