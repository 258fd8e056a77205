"""Every test sees 8 fake CPU devices (set before JAX starts) and no network.

Programs compile without most of XLA's optimisations (JAX_DISABLE_MOST_OPTIMIZATIONS, inherited
by the launch.py processes tests start): a test of training logic, checkpoints or the command
line does not need fast code, and compiling is most of its time. Tests marked `numerics` compare
fast paths with the truth and run the optimised code users run.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiled programs are cached across tests, the launch.py processes they start (which inherit
# these variables) and test runs on the same machine (CI reruns included).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.expanduser("~/.cache/shufflenet_jax/jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pytest  # noqa: E402

from tests import fake_data, jitted  # noqa: E402


@pytest.fixture(autouse=True)
def _optimised_code_for_numerics(request):
  """`numerics` tests compile with XLA's optimisations, as training does."""
  if request.node.get_closest_marker("numerics") is None:
    yield
    return
  with jitted.xla_optimisations(True):
    yield


@pytest.fixture
def absl_flags_parsed():
  """grain's worker processes read absl flags, which launch.py parses (absl's app.run)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
  return fake_data.write_fashion_mnist(tmp_path_factory.mktemp("fashion_idx"))


@pytest.fixture
def tiny_config(fashion_dir, tmp_path):
  """The default config, smoke-sized, on a generated Fashion-MNIST (96 train, 37 test)."""
  from configs import common
  config = common.load_config("configs/default.py:smoke,scale=0.25")
  config.data_dir = str(fashion_dir)
  config.tfds_data_dir = str(tmp_path / "tfds")
  config.batch_size = 16
  config.eval_batch_size = 16
  config.total_steps = 6
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 6
  config.log_every_steps = 3
  config.warmup_steps = 0
  return config

