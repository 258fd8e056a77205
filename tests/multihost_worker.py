"""One process of a CPU multi-host job that feeds fixed global batches (tests/test_multihost.py).

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES OUT_DIR

Three train steps on the same global batches whatever the process count (each process feeds its
slice), so 2 processes x 2 devices and 1 process x 4 devices must end with the same parameters.
`launch.py train` cannot show that: each process reads its own shard of the data, so the global
batches of a run depend on the process count. Everything else is tested through launch.py.
"""

import os
import sys

process_id, num_processes, port, devices, out_dir = sys.argv[1:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from shufflenet_jax import config_files, optim, parallel, train  # noqa: E402

if int(num_processes) > 1:
  parallel.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id),
                                  heartbeat_timeout_seconds=10)

config = config_files.load_config("configs/default.py:smoke,scale=0.25")
assert jax.device_count() == 4, jax.devices()
mesh = parallel.make_mesh()
tx, _ = optim.make_optimizer(config, 10)
graphdef, state = train.create_train_state(config, mesh, tx)
step = parallel.CompiledTogether(train.make_train_step(graphdef, tx, config, mesh), "train")
rng = np.random.default_rng(0)
per_process = 16 // jax.process_count()
lo = jax.process_index() * per_process
for _ in range(3):
  images = rng.normal(size=(16, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  local = {"image": images[lo:lo + per_process], "label": labels[lo:lo + per_process]}
  state, metrics = step(state, parallel.global_batch(local, mesh))
params = jax.device_get(state["params"])
np.savez(os.path.join(out_dir, f"params_{num_processes}_{process_id}.npz"),
         *[np.asarray(x) for x in jax.tree.leaves(params)])
print("worker done", flush=True)
