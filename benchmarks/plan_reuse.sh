#!/usr/bin/env bash
# Times `launch.py compile` for a TPU topology twice into an empty analysis cache: the first
# compiles (XLA:TPU via libtpu on this CPU), the second reuses the kept memory/cost analyses
# (pod_check.analysis_cache_dir). Prints BENCHMARKS.md rows.
# Usage: bash benchmarks/plan_reuse.sh [CONFIG] [TOPOLOGY]   (this checkout's .venv)
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
config=${1:-configs/default.py:smoke}
topology=${2:-v5e:2x2}
cache=$(mktemp -d /tmp/shufflenet_jax_plan.XXXX)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
     "AVX-512: $(grep -q avx512 /proc/cpuinfo && echo yes || echo no); $(date -u +%F)"
for run in "first (compiles)" "second (reuses)"; do
  start=$(date +%s.%N)
  (cd "$repo" && JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR="$cache" .venv/bin/python \
     launch.py compile --config="$config" --topology="$topology" 2>/dev/null) \
    | grep "^compile time" > "$cache/line"
  printf '| launch.py compile %s %s, %s | %.1f s | %s |\n' "$config" "$topology" "$run" \
    "$(echo "$(date +%s.%N) - $start" | bc)" "$(tr -s ' ' < "$cache/line")"
done
rm -rf "$cache"
