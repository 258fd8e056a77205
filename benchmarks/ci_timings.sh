#!/usr/bin/env bash
# Times the two costs that dominate `make test` apart from the tests themselves, today's path
# beside the earlier one in the same run, and prints BENCHMARKS.md rows:
#   1. installing the test environment (`make setup-dev setup-tflite`) with pip and with uv,
#      each in a fresh clone (wheel caches as the machine has them);
#   2. one smoke `launch.py train` process as the tests start it (8 fake devices, XLA's
#      optimisations off), at BEFORE_REV without a compilation cache (how tests ran it then) and
#      at this checkout with the shared cache (warmed by a first run).
# Usage: bash benchmarks/ci_timings.sh [BEFORE_REV]   (default fdeb79f)
set -euo pipefail
before=${1:-fdeb79f}
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=$(mktemp -d /tmp/shufflenet_jax_ci.XXXX)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
     "AVX-512: $(grep -q avx512 /proc/cpuinfo && echo yes || echo no); $(date -u +%F)"

seconds() { local start=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $start" | bc; }

for installer in pip uv; do
  git clone -q "$src" "$dir/$installer"
  t=$(cd "$dir/$installer" && seconds make setup-dev setup-tflite INSTALLER=$installer)
  printf '| install, INSTALLER=%s | %.0f s |\n' "$installer" "$t"
done

git clone -q "$src" "$dir/before" && git -C "$dir/before" checkout -q "$before"
ln -s "$dir/uv/.venv" "$dir/before/.venv"
python=$dir/uv/.venv/bin/python
(cd "$dir/uv" && $python -c "from pathlib import Path; from tests import fake_data; \
fake_data.write_fashion_mnist(Path('$dir/idx'))")
smoke() {  # $1: checkout, $2: workdir name; the rest: extra environment
  local repo=$1 name=$2; shift 2
  (cd "$repo" && env JAX_DISABLE_MOST_OPTIMIZATIONS=1 JAX_PLATFORMS=cpu \
     XLA_FLAGS=--xla_force_host_platform_device_count=8 "$@" \
     "$python" launch.py train --config=configs/default.py:smoke,scale=0.25 \
     --config.data_dir="$dir/idx" --config.tfds_data_dir="$dir/tfds" --config.batch_size=16 \
     --config.eval_batch_size=16 --config.total_steps=6 --config.checkpoint_every_steps=3 \
     --config.log_every_steps=3 --workdir="$dir/$name")
}
smoke "$dir/before" warm_tfds >/dev/null 2>&1  # prepares the array_record files once
t=$(seconds smoke "$dir/before" before)
printf '| smoke launch.py train process at %s, no compilation cache | %.1f s |\n' "$before" "$t"
cache=(JAX_COMPILATION_CACHE_DIR="$dir/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.1)
smoke "$dir/uv" warm "${cache[@]}" >/dev/null 2>&1
t=$(seconds smoke "$dir/uv" after "${cache[@]}")
printf '| smoke launch.py train process at %s, shared cache (warm) | %.1f s |\n' \
       "$(git -C "$src" rev-parse --short HEAD)" "$t"
