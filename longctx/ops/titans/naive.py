"""References for the Titans memory, with per-token weights materialised, fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.ops.titans import memory


def _per_token(spec, fn):
  """vmap over batch and heads of a function of one head's weights and vectors."""
  return jax.vmap(jax.vmap(fn))


def _clipped_grad(spec, weights, k, v):
  """∇ℓ at `weights` for one head and token, clipped to spec.grad_clip."""
  grads = jax.grad(lambda w: memory.loss(spec, w, k, v))(weights)
  scale = memory.clip_scale(spec, sum(jnp.sum(jnp.square(g)) for g in grads))
  return [g * scale for g in grads]


def lmm(spec, q, k, v, theta, eta, alpha, state):
  """Token by token: each gradient at the memory the previous token left. q, k [B, T, H, dk], v [B, T, H, dv],
  gates [B, T, H]. Returns (o [B, T, H, dv], final state)."""
  grad = _per_token(spec, lambda w, k, v: _clipped_grad(spec, w, k, v))
  read = _per_token(spec, lambda w, q: memory.apply(spec, w, q))

  def body(state, xs):
    q_t, k_t, v_t, th, et, al = xs
    g = grad(state['weights'], k_t, v_t)
    b = lambda x, w: x[..., None, None]
    mom = [b(et, s) * s - b(th, s) * gi for s, gi in zip(state['momentum'], g)]
    weights = [(1 - b(al, w)) * w + s for w, s in zip(state['weights'], mom)]
    return {'weights': weights, 'momentum': mom}, read(weights, q_t)

  f32 = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  state, o = jax.lax.scan(body, state, tuple(f32(x) for x in (q, k, v, theta, eta, alpha)))
  return jnp.moveaxis(o, 0, 1), state


def chunked_lmm(spec, q, k, v, theta, eta, alpha, state, chunk_size: int):
  """The paper's chunk-parallel semantics with per-token weights: in each chunk every gradient is taken at the
  memory the previous chunk left; momentum and decay then run token by token. T must be a multiple of chunk_size."""
  b, t = q.shape[:2]
  grad = jax.vmap(_per_token(spec, lambda w, k, v: _clipped_grad(spec, w, k, v)), in_axes=(None, 0, 0))
  read = _per_token(spec, lambda w, q: memory.apply(spec, w, q))
  n = t // chunk_size
  chunked = lambda x: jnp.moveaxis(x.astype(jnp.float32).reshape((b, n, chunk_size) + x.shape[2:]), (1, 2), (0, 1))

  def chunk(state, xs):
    qc, kc, vc, th, et, al = xs                                  # [C, B, H, ...]
    g = grad(state['weights'], kc, vc)                             # per layer [C, B, H, i, o], all at the chunk start

    def token(carry, ys):
      q_t, g_t, th_t, et_t, al_t = ys
      e = lambda x: x[..., None, None]
      mom = [e(et_t) * s - e(th_t) * gi for s, gi in zip(carry['momentum'], g_t)]
      weights = [(1 - e(al_t)) * w + s for w, s in zip(carry['weights'], mom)]
      return {'weights': weights, 'momentum': mom}, read(weights, q_t)

    return jax.lax.scan(token, state, (qc, g, th, et, al))

  state, o = jax.lax.scan(chunk, state, tuple(chunked(x) for x in (q, k, v, theta, eta, alpha)))
  return jnp.moveaxis(o, (0, 1), (1, 2)).reshape((b, t) + o.shape[3:]), state
