"""The memory MLP: its shape, its forward pass on one set of weights, and its per-token loss."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ACTIVATIONS = {'gelu': jax.nn.gelu, 'silu': jax.nn.silu, 'relu': jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """depth 1: a linear memory M(x) = x W (read as Mᵀq). depth ≥ 2: an MLP with hidden width expansion·d_k and a
  residual around a parameter-free LayerNorm, M(x) = x + LN(W_L σ(… σ(W_1 x))) (needs d_v = d_k).
  `grad_clip` bounds each token's inner-gradient norm (0: no bound)."""
  dk: int
  dv: int
  depth: int = 2
  expansion: int = 4
  activation: str = 'gelu'
  grad_clip: float = 0.0

  def layer_shapes(self) -> list[tuple[int, int]]:
    if self.depth == 1:
      return [(self.dk, self.dv)]
    hidden = self.expansion * self.dk
    return [(self.dk, hidden)] + [(hidden, hidden)] * (self.depth - 2) + [(hidden, self.dv)]

  @property
  def residual(self) -> bool:
    return self.depth > 1


def layer_norm(x, eps=1e-5):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def finish(spec: MemorySpec, x, out):
  """The residual and norm after the last layer."""
  return x + layer_norm(out) if spec.residual else out


def apply(spec: MemorySpec, weights, x, perturb=None):
  """M(x) for x [..., d_k] with weights [..., d_in, d_out] (one leading shape). `perturb` adds to each layer's
  pre-activation (zeros: their gradients are the per-token deltas)."""
  act = ACTIVATIONS[spec.activation]
  h = x
  for i, w in enumerate(weights):
    z = jnp.einsum('...i,...io->...o', h, w)
    if perturb is not None:
      z = z + perturb[i]
    h = act(z) if i < len(weights) - 1 else z
  return finish(spec, x, h)


def loss(spec: MemorySpec, weights, k, v, perturb=None):
  """ℓ = ‖M(k) − v‖² per token: [...]."""
  return jnp.sum(jnp.square(apply(spec, weights, k, perturb) - v), axis=-1)


def init_state(spec: MemorySpec, initial_weights, batch: int):
  """The state at the start of a document: the learned initial weights ([H, d_in, d_out] each) for every row,
  zero momentum."""
  weights = [jnp.broadcast_to(w.astype(jnp.float32), (batch,) + w.shape) for w in initial_weights]
  return {'weights': weights, 'momentum': [jnp.zeros_like(w) for w in weights]}


def clip_scale(spec: MemorySpec, sq_norm):
  """Factor that brings a gradient of squared norm `sq_norm` within spec.grad_clip."""
  if not spec.grad_clip:
    return jnp.ones_like(sq_norm)
  return jnp.minimum(1.0, spec.grad_clip * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-30)))
