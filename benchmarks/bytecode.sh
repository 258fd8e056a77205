#!/usr/bin/env bash
# What the venv's .pyc files save per process: one smoke `launch.py train` (as the tests start it:
# 8 fake devices, XLA's optimisations off, shared compilation cache warmed by a first run) and one
# refused bad value, each with PYTHONDONTWRITEBYTECODE=1 (set on this project's machines), once
# reading the .pyc files `make setup` writes and once from source (PYTHONPYCACHEPREFIX pointing
# at an empty directory makes Python ignore them), alternated, two of each.
# Usage: bash benchmarks/bytecode.sh   (from the repository root, after `make setup-dev`)
set -euo pipefail
dir=$(mktemp -d /tmp/shufflenet_jax_pyc.XXXX)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
     "AVX-512: $(grep -q avx512 /proc/cpuinfo && echo yes || echo no); $(date -u +%F)"
.venv/bin/python -c "from pathlib import Path; from tests import fake_data; \
fake_data.write_fashion_mnist(Path('$dir/idx'))"
export PYTHONDONTWRITEBYTECODE=1 JAX_DISABLE_MOST_OPTIMIZATIONS=1 JAX_PLATFORMS=cpu \
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_COMPILATION_CACHE_DIR="$dir/jax_cache" \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.1
smoke=(launch.py train --config=configs/default.py:smoke,scale=0.25 --config.data_dir="$dir/idx"
       --config.tfds_data_dir="$dir/tfds" --config.batch_size=16 --config.eval_batch_size=16
       --config.total_steps=6 --config.checkpoint_every_steps=3 --config.log_every_steps=3)
seconds() { local start=$(date +%s.%N); "$@" >/dev/null 2>&1 || true; echo "$(date +%s.%N) - $start" | bc; }
.venv/bin/python "${smoke[@]}" --workdir="$dir/warm" >/dev/null 2>&1  # data + compilation cache
for i in 1 2; do
  for mode in pyc source; do
    prefix=(); [ $mode = source ] && prefix=(env PYTHONPYCACHEPREFIX="$dir/empty_$i")
    t=$(seconds "${prefix[@]}" .venv/bin/python "${smoke[@]}" --workdir="$dir/$mode$i")
    b=$(seconds "${prefix[@]}" .venv/bin/python "${smoke[@]}" --workdir="$dir/bad$mode$i" \
          --config.total_steps=-1)
    printf '| %s (try %d) | smoke train %.1f s | refused bad value %.1f s |\n' "$mode" $i "$t" "$b"
  done
done
