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
  `grad_clip` bounds each token's inner-gradient norm (0: no bound).

  Miras ("It's All Connected", Behrouz et al. 2025) axes: `objective`, the attentional bias on e = M(k) − v per
  channel — 'l2' e² (Titans), 'lp' |e|_ε^p with the smooth |e|_ε = √(e² + ε²) (so its sign is e/|e|_ε; Moneta, p = 3),
  'huber' e² within a per-token δ and 2δ|e| − δ² beyond it (Yaad); and `retention`, a map applied to the weights as
  they pass a chunk boundary, on top of the (1 − α) decay (reads inside the chunk see the weights before it) — 'l2'
  none, 'lq' W / ‖W‖_q^{q−2} per weight matrix (Moneta, q = 4), 'elastic_net' soft-thresholding by `l1` (the ℓ1
  half of an elastic net whose ℓ2 half is the decay), 'kl' Memora's mirror step W ← Softmax((1 − α) log W⁰ − η∇ℓ)
  over each row (the weights stay on the simplex; the memory starts from the row softmax of its parameters). The
  kl step is taken once per chunk on the chunk's summed update: with W_lin = A W⁰ + B S⁰ − Σ C θ G the chunk's
  linear result, W ← Softmax(W_lin + A (log W⁰ − W⁰)) = Softmax(A log W⁰ + B S⁰ − Σ C θ G); with chunk 1 and no
  momentum that is Memora's recurrence exactly."""
  dk: int
  dv: int
  depth: int = 2
  expansion: int = 4
  activation: str = 'gelu'
  grad_clip: float = 0.0
  objective: str = 'l2'
  p: float = 3.0
  smooth: float = 1e-3
  retention: str = 'l2'
  q: float = 4.0
  l1: float = 0.0

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


OBJECTIVES = ('l2', 'lp', 'huber')
RETENTIONS = ('l2', 'lq', 'elastic_net', 'kl')


def objective(spec: MemorySpec, out, v, delta=None):
  """The attentional bias Σ_channels f(M(k) − v) per token (see MemorySpec); `delta` [...] is Huber's threshold."""
  e = out - v
  if spec.objective == 'lp':
    per = jnp.power(jnp.square(e) + spec.smooth ** 2, spec.p / 2)
  elif spec.objective == 'huber':
    d = delta[..., None]
    per = jnp.where(jnp.abs(e) <= d, jnp.square(e), 2 * d * jnp.abs(e) - jnp.square(d))
  else:
    per = jnp.square(e)
  return jnp.sum(per, axis=-1)


def thresholds(delta, theta):
  """Huber's per-token δ, ones where none is given (the other objectives ignore it)."""
  return jnp.ones_like(theta) if delta is None else delta


def loss(spec: MemorySpec, weights, k, v, perturb=None, delta=None):
  """ℓ(M; k, v) per token: [...]."""
  return objective(spec, apply(spec, weights, k, perturb), v, delta)


def retain(spec: MemorySpec, weights, base=None, decay=None, axis=None):
  """The retention map applied at chunk ends, per [..., d_in, d_out] weight matrix; the kl map also takes the
  chunk's base weights W⁰ and their decay factor A (per head [...], or per channel along `axis`, as `scale`)."""
  if spec.retention == 'kl':
    log_base = jnp.log(jnp.maximum(base, 1e-30))
    return jax.nn.softmax(weights + scale(log_base - base, decay, axis), axis=-1)
  if spec.retention == 'lq':
    norm = jnp.sum(jnp.abs(weights) ** spec.q, axis=(-2, -1), keepdims=True) ** (1 / spec.q)
    return weights / jnp.maximum(norm, 1e-6) ** (spec.q - 2)
  if spec.retention == 'elastic_net':
    return jnp.sign(weights) * jnp.maximum(jnp.abs(weights) - spec.l1, 0.0)
  return weights


def decay_axis(layer: int, depth: int, per_channel: bool):
  """Where a per-channel forgetting gate α [..., d] acts on layer `layer`'s [d_in, d_out] weights: the first layer's
  rows (one per key channel, as in GLA) and the last layer's columns (one per value channel); None for a per-head
  gate (a scalar per matrix). Memories deeper than 2 layers take per-head gates only."""
  if not per_channel:
    return None
  if 0 < layer < depth - 1:
    raise ValueError('a per-channel forgetting gate acts on memories of depth 1 or 2')
  return -1 if layer == 0 else -2


def decay_axes(spec: MemorySpec, alpha):
  """`decay_axis` of every layer for a gate alpha [B, T, H] (per head) or [B, T, H, d] (per channel)."""
  return [decay_axis(i, spec.depth, alpha.ndim == 4) for i in range(spec.depth)]


def scale(w, factor, axis):
  """w [..., d_in, d_out] times a per-head factor [...] (axis None) or a per-channel factor [..., d] along rows
  (axis −1: factor[..., :, None]) or columns (axis −2: factor[..., None, :])."""
  if axis is None:
    return factor[..., None, None] * w
  return jnp.expand_dims(factor, axis) * w


def starting_weights(spec: MemorySpec, params):
  """The memory a document starts from, given its learned parameters: themselves, or for the kl retention their
  row softmax (on the simplex)."""
  params = [p.astype(jnp.float32) for p in params]
  return [jax.nn.softmax(p, axis=-1) for p in params] if spec.retention == 'kl' else params


def init_state(spec: MemorySpec, initial_weights, batch: int):
  """The state at the start of a document: the memory `starting_weights` makes of the learned parameters
  ([H, d_in, d_out] each) for every row, zero momentum."""
  weights = [jnp.broadcast_to(w, (batch,) + w.shape) for w in starting_weights(spec, initial_weights)]
  return {'weights': weights, 'momentum': [jnp.zeros_like(w) for w in weights]}


def clip_scale(spec: MemorySpec, sq_norm):
  """Factor that brings a gradient of squared norm `sq_norm` within spec.grad_clip (the inner `where` keeps the
  rsqrt's derivative finite at a zero gradient, such as a padding token's)."""
  if not spec.grad_clip:
    return jnp.ones_like(sq_norm)
  over = sq_norm > spec.grad_clip ** 2
  return jnp.where(over, spec.grad_clip * jax.lax.rsqrt(jnp.where(over, sq_norm, 1.0)), 1.0)
