"""A model's forward pass as one compiled program: an eager nnx call dispatches (and compiles)
every layer's ops one by one, seconds per call on a 2-core CPU. And XLA's optimisations switched
for a block of code."""

import contextlib

import jax
from flax import nnx


@contextlib.contextmanager
def xla_optimisations(enabled: bool):
  """Programs compiled inside compile with (or without most of) XLA's optimisations."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", not enabled)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def forward(model: nnx.Module, x, *, train: bool = False):
  """model(x, train=train), jitted; BN statistics updated in train mode, as the eager call."""
  return nnx.jit(lambda m, x: m(x, train=train))(model, x)
