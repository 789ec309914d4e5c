"""Titans' memory at the paper's chunk-parallel semantics without per-token weights.

In a chunk of C tokens every gradient is taken at the chunk-start memory M⁰ (and momentum S⁰). For a linear layer
the gradient of token s is rank one, G_s = x_s δ_sᵀ (x_s the layer's input, δ_s = ∂ℓ_s/∂z_s at its output, both
from one forward and backward pass of M⁰ on the chunk's keys). Momentum and decay are linear in the G_s, so

    W_t = A_t W⁰ + B_t S⁰ − Σ_{s≤t} C_ts θ_s G_s,      S_t = E_t S⁰ − Σ_{s≤t} D_ts θ_s G_s

with A, B, C, D, E products and sums of α and η (`coefficients`, a scan over the chunk on [C]-vectors whose entries
stay in [0, 1]-products, so nothing overflows). A read of token t through layer l never forms W_t:

    h W_t = A_t (h W⁰) + B_t (h S⁰) − ((h Xᵀ) ⊙ C ⊙ θ) Δ          (the dual form; X, Δ stacked over the chunk)

and the next chunk's state is the t = C row. A per-token gradient clip scales θ_s (‖G_s‖² = Σ_l ‖x_s‖²‖δ_s‖²).
Chunks run one after another in a `lax.scan` whose body is rematerialised in the backward pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longctx.ops.chunking import pad_to_multiple, resets
from longctx.ops.titans import memory


def coefficients(eta, alpha, valid, reset):
  """eta, alpha, valid, reset [..., C] -> (A [.., C], B [.., C], C [.., C, C] (t, s), E [..], D [.., C] (s)): the
  weights of the base memory, S⁰ and each θ_s G_s in W_t, and of S⁰ and θ_s G_s in the chunk's last momentum.
  Invalid (padding) tokens leave everything as it was; at a reset (a document starts) the base becomes the reset
  memory and everything before is forgotten."""
  c = eta.shape[-1]
  lead = eta.shape[:-1]
  eye = jnp.eye(c, dtype=eta.dtype)

  def step(carry, xs):
    sc, mc, sb, mb, ma = carry
    et, al, ok, r, e_t = xs
    sc, mc = jnp.where(r[..., None], 0.0, sc), jnp.where(r[..., None], 0.0, mc)
    sb, mb, ma = jnp.where(r, 0.0, sb), jnp.where(r, 0.0, mb), jnp.where(r, 1.0, ma)
    keep = lambda new, old: jnp.where(ok[..., None] if new.ndim > ok.ndim else ok, new, old)
    sc = keep(et[..., None] * sc + e_t, sc)
    mc = keep((1 - al)[..., None] * mc + sc, mc)
    sb = keep(et * sb, sb)
    mb = keep((1 - al) * mb + sb, mb)
    ma = keep((1 - al) * ma, ma)
    return (sc, mc, sb, mb, ma), (mc, mb, ma)

  zeros = jnp.zeros(lead + (c,), eta.dtype)
  init = (zeros, zeros, jnp.ones(lead, eta.dtype), jnp.zeros(lead, eta.dtype), jnp.ones(lead, eta.dtype))
  last = lambda x: jnp.moveaxis(x, -1, 0)
  units = jnp.broadcast_to(eye, lead + (c, c))
  (sc, _, sb, _, _), (mc, mb, ma) = jax.lax.scan(
      step, init, (last(eta), last(alpha), last(valid), last(reset), jnp.moveaxis(units, -2, 0)))
  first = lambda x: jnp.moveaxis(x, 0, len(lead))
  return first(ma), first(mb), first(mc), sb, sc


def _keys_pass(spec, weights, k, v, delta):
  """Layer inputs X_l [B, H, C, d_in] and output deltas Δ_l [B, H, C, d_out] of M⁰ on the chunk's keys (the
  objective's gradient: any Miras attentional bias keeps each token's gradient rank one per layer)."""
  act = memory.ACTIVATIONS[spec.activation]

  def forward(perturb):
    h, inputs = k, []
    for i, w in enumerate(weights):
      inputs.append(h)
      z = jnp.einsum('bhci,bhio->bhco', h, w) + perturb[i]
      h = act(z) if i < len(weights) - 1 else z
    out = memory.finish(spec, k, h)
    return jnp.sum(memory.objective(spec, out, v, delta)), inputs

  zeros = [jnp.zeros(k.shape[:-1] + (w.shape[-1],), jnp.float32) for w in weights]
  deltas, inputs = jax.grad(forward, has_aux=True)(zeros)
  return inputs, deltas


def _chunk(spec, reset_weights, state, xs):
  q, k, v, delta, theta, A, B, Cm, E, D, from_start = xs   # [B, H, C, ...]; Cm [B, H, C, C]; E [B, H]; D [B, H, C]
  W0, S0 = state['weights'], state['momentum']
  X, Delta = _keys_pass(spec, W0, k, v, delta)
  if reset_weights is not None:
    # Tokens of a document that began inside this chunk learn from the memory before that document.
    X_new, Delta_new = _keys_pass(spec, reset_weights, k, v, delta)
    pick = lambda old, new: [jnp.where(from_start[..., None], a, b) for a, b in zip(old, new)]
    X, Delta = pick(X, X_new), pick(Delta, Delta_new)

  def base(h, i):
    """h through layer i of the chunk's base memory: W⁰ until a document starts, the reset memory after."""
    out = jnp.einsum('bhci,bhio->bhco', h, W0[i])
    if reset_weights is None:
      return out
    return jnp.where(from_start[..., None], out, jnp.einsum('bhci,bhio->bhco', h, reset_weights[i]))

  sq = sum(jnp.sum(jnp.square(x), -1) * jnp.sum(jnp.square(d), -1) for x, d in zip(X, Delta))
  theta = theta * memory.clip_scale(spec, sq)                              # [B, H, C]
  coef = Cm * theta[..., None, :]                                          # C_ts θ_s
  act = memory.ACTIVATIONS[spec.activation]
  h = q
  for i, (s0, x, d) in enumerate(zip(S0, X, Delta)):
    z = (A[..., None] * base(h, i) + B[..., None] * jnp.einsum('bhci,bhio->bhco', h, s0)
         - jnp.einsum('bhts,bhso->bhto', jnp.einsum('bhti,bhsi->bhts', h, x) * coef, d))
    h = act(z) if i < len(W0) - 1 else z
  o = memory.finish(spec, q, h)
  outer = lambda x, c, d: jnp.einsum('bhsi,bhs,bhso->bhio', x, c, d)
  end_base = W0 if reset_weights is None else [
      jnp.where(from_start[..., -1, None, None], w0, wr) for w0, wr in zip(W0, reset_weights)]
  weights = [memory.retain(spec, A[..., -1, None, None] * w0 + B[..., -1, None, None] * s0
                           - outer(x, coef[..., -1, :], d)) for w0, s0, x, d in zip(end_base, S0, X, Delta)]
  momentum = [E[..., None, None] * s0 - outer(x, D * theta, d) for s0, x, d in zip(S0, X, Delta)]
  return {'weights': weights, 'momentum': momentum}, o


def lmm(spec, q, k, v, theta, eta, alpha, state, chunk_size: int = 16, *, segment_ids=None, reset_weights=None,
        delta=None):
  """q, k [B, T, H, dk], v [B, T, H, dv], theta, eta, alpha (and Huber's `delta`) [B, T, H]; state as
  `memory.init_state`. The retention map (spec.retention) applies to the weights at each chunk's end.
  Where segment_ids [B, T] start a new document the memory restarts from `reset_weights` (default: the state's
  weights; per layer [B, H, d_in, d_out]) with zero momentum; inside a chunk that document's gradients are taken at
  that memory. Returns (o [B, T, H, dv] in v's dtype, final state fp32). Any T: the last chunk is padded with tokens
  that change nothing."""
  b, t, h = q.shape[:3]
  if segment_ids is not None and reset_weights is None:
    reset_weights = state['weights']
  if reset_weights is not None:
    reset_weights = [w.astype(jnp.float32) for w in reset_weights]
  c = min(chunk_size, t)
  valid = pad_to_multiple(jnp.ones((b, t, h), bool), c, value=False)
  n = valid.shape[1] // c
  # [B, T, H, ...] -> [N, B, H, C, ...]
  chunked = lambda x: jnp.moveaxis(pad_to_multiple(x, c).reshape((b, n, c, h) + x.shape[3:]), (1, 2), (0, 3))
  f32 = lambda x: chunked(x.astype(jnp.float32))
  qs, ks, vs, ds, th, et, al = (f32(x) for x in (q, k, v, memory.thresholds(delta, theta), theta, eta, alpha))
  ok = chunked(valid)
  reset = chunked(jnp.broadcast_to(pad_to_multiple(resets(segment_ids, t, b), c)[..., None], valid.shape))
  A, B, Cm, E, D = coefficients(et, al, ok, reset)
  from_start = jnp.cumsum(reset.astype(jnp.int32), axis=-1) == 0
  th = jnp.where(ok, th, 0.0)
  body = jax.checkpoint(functools.partial(_chunk, spec, reset_weights))
  state = jax.tree.map(lambda x: x.astype(jnp.float32), state)
  state, o = jax.lax.scan(body, state, (qs, ks, vs, ds, th, A, B, Cm, E, D, from_start))
  o = jnp.moveaxis(o, (0, 3), (1, 2)).reshape(b, n * c, h, -1)[:, :t]
  return o.astype(v.dtype), state
