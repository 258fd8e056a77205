"""A model's forward pass as one compiled program: an eager nnx call dispatches (and compiles)
every layer's ops one by one, seconds per call on a 2-core CPU."""

from flax import nnx


def forward(model: nnx.Module, x, *, train: bool = False):
  """model(x, train=train), jitted; BN statistics updated in train mode, as the eager call."""
  return nnx.jit(lambda m, x: m(x, train=train))(model, x)
