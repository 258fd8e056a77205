import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflenet_jax.models.layers import channel_shuffle, channel_unshuffle, shuffle_permutation


@pytest.mark.parametrize("groups,channels", [(2, 8), (3, 12), (4, 8), (8, 24), (3, 240)])
def test_shuffle_is_the_papers_permutation(groups, channels):
  x = jnp.arange(channels, dtype=jnp.float32)
  y = np.asarray(channel_shuffle(x[None], groups)[0]).astype(int)
  n = channels // groups
  # Output i = (j, g) flattened from the (n, g) transpose of input (g, j): input index g*n + j.
  expected = [(i % groups) * n + i // groups for i in range(channels)]
  assert list(y) == expected == shuffle_permutation(channels, groups)
  assert sorted(y) == list(range(channels))  # a permutation: nothing lost, nothing repeated


def test_each_output_group_takes_one_channel_from_every_input_group():
  groups, channels = 3, 12
  y = np.asarray(channel_shuffle(jnp.arange(channels)[None], groups)[0])
  n = channels // groups
  for out_group in range(groups):
    members = y[out_group * n:(out_group + 1) * n]
    assert set(members // n) == set(range(groups))  # the point of the shuffle (paper Fig. 1c)


@pytest.mark.parametrize("shape", [(1, 1, 1, 12), (2, 5, 7, 12), (3, 4, 4, 24)])
@pytest.mark.parametrize("groups", [2, 3, 4])
def test_inverse_and_any_nhwc_shape(shape, groups):
  x = jax.random.normal(jax.random.key(0), shape)
  y = channel_shuffle(x, groups)
  assert y.shape == x.shape
  np.testing.assert_array_equal(channel_unshuffle(y, groups), x)
  np.testing.assert_array_equal(channel_shuffle(channel_unshuffle(x, groups), groups), x)
  # The same permutation at every pixel and batch element.
  perm = shuffle_permutation(shape[-1], groups)
  np.testing.assert_array_equal(y, x[..., perm])


def test_groups_one_is_identity_and_jit_and_grad():
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 6))
  np.testing.assert_array_equal(channel_shuffle(x, 1), x)
  jitted = jax.jit(channel_shuffle, static_argnums=1)
  np.testing.assert_array_equal(jitted(x, 3), channel_shuffle(x, 3))
  weights = jnp.arange(6, dtype=jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(channel_shuffle(x, 3) * weights))(x)
  # d/dx of sum(x[perm] * w) puts w[i] on channel perm[i]: the inverse permutation of w.
  expected = np.asarray(channel_unshuffle(jnp.broadcast_to(weights, x.shape), 3))
  np.testing.assert_array_equal(grad, expected)


def test_indivisible_channels_name_the_values():
  with pytest.raises(ValueError, match="10 channels are not divisible by groups=3"):
    channel_shuffle(jnp.zeros((1, 10)), 3)
