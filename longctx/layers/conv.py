"""Short causal depthwise convolution (as in Mamba, DeltaNet, Titans), aware of packed documents and of a cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ShortConv(nnx.Module):
  """y_t = Σ_{i<K} w_i ⊙ x_{t−i}, over tokens of x_t's own document only; the cache holds the last K−1 inputs."""

  def __init__(self, channels: int, size: int, axes, *, rngs: nnx.Rngs):
    self.size = size
    w = jax.random.uniform(rngs.params(), (size, channels), jnp.float32, -1.0, 1.0) * size ** -0.5
    self.kernel = nnx.Param(w, logical_axes=(None,) + tuple(axes))

  def __call__(self, x, segment_ids=None, cache=None, cache_segment_ids=None):
    """x [B, T, C]; cache [B, K−1, C] (the previous inputs, oldest first). Returns (y, new cache).
    With segment_ids, cached inputs count as another document unless `cache_segment_ids` [B, K−1] says whose
    they are."""
    b, t, c = x.shape
    k = self.size
    history = jnp.zeros((b, k - 1, c), x.dtype) if cache is None else cache.astype(x.dtype)
    padded = jnp.concatenate([history, x], axis=1)                        # [B, K−1+T, C]
    w = self.kernel[...].astype(x.dtype)
    y = jnp.zeros_like(x)
    if segment_ids is not None:
      before = (jnp.full((b, k - 1), -1, segment_ids.dtype) if cache_segment_ids is None
                else cache_segment_ids.astype(segment_ids.dtype))
      ids = jnp.concatenate([before, segment_ids], axis=1)
    for i in range(k):
      shifted = padded[:, k - 1 - i: k - 1 - i + t]                      # x_{t−i}
      if segment_ids is not None and i:
        same = segment_ids == ids[:, k - 1 - i: k - 1 - i + t]
        shifted = jnp.where(same[..., None], shifted, 0)
      y = y + shifted * w[i]
    return y, padded[:, -(k - 1):] if k > 1 else history
