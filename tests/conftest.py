"""Every test sees 8 fake CPU devices (set before JAX starts) and no network."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compiled programs are cached across test runs on the same machine (CI reruns included).
jax.config.update("jax_compilation_cache_dir",
                  os.path.expanduser("~/.cache/shufflenet_jax/jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
