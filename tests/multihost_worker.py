"""One process of a CPU multi-host job (run by tests/test_multihost.py, never by pytest itself).

  python tests/multihost_worker.py MODE PROCESS_ID NUM_PROCESSES PORT DEVICES OUT_DIR DATA TFDS

MODE steps: three train steps on fixed global batches (each process feeds its slice).
MODE train: train_and_evaluate on the fake Fashion-MNIST in DATA, workdir OUT_DIR/run.
"""

import json
import os
import sys

mode, process_id, num_processes, port, devices, out_dir, data_dir, tfds_dir = sys.argv[1:9]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from shufflenet_jax import optim, parallel, train  # noqa: E402

if int(num_processes) > 1:
  parallel.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id),
                                  heartbeat_timeout_seconds=10)

config = common.load_config("configs/default.py:smoke,scale=0.25")
config.data_dir, config.tfds_data_dir = data_dir, tfds_dir
config.batch_size = config.eval_batch_size = 16
config.total_steps, config.eval_every_steps = int(os.environ.get("STEPS", "6")), 3
config.checkpoint_every_steps, config.log_every_steps = 3, 1
assert jax.device_count() == 4, jax.devices()
result = {"process_index": jax.process_index(), "process_count": jax.process_count()}

if mode == "steps":
  mesh = parallel.make_mesh()
  tx, _ = optim.make_optimizer(config, 10)
  graphdef, state = train.create_train_state(config, mesh, tx)
  step = train.make_train_step(graphdef, tx, config, mesh)
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
  result["loss"] = float(metrics["loss"])
else:
  result.update(train.train_and_evaluate(config, os.path.join(out_dir, "run")))

with open(os.path.join(out_dir, f"result_{mode}_{num_processes}_{process_id}.json"), "w") as f:
  json.dump(result, f)
print("worker done", flush=True)
