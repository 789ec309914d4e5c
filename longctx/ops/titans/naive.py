"""References for the Titans memory, with per-token weights materialised, fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.ops.chunking import resets
from longctx.ops.titans import memory


def _per_token(spec, fn):
  """vmap over batch and heads of a function of one head's weights and vectors."""
  return jax.vmap(jax.vmap(fn))


def _clipped_grad(spec, weights, k, v, delta):
  """∇ℓ at `weights` for one head and token, clipped to spec.grad_clip."""
  grads = jax.grad(lambda w: memory.loss(spec, w, k, v, delta=delta))(weights)
  scale = memory.clip_scale(spec, sum(jnp.sum(jnp.square(g)) for g in grads))
  return [g * scale for g in grads]


def _restarted(weights, reset, reset_weights):
  """The weights, with the initial ones on rows where a document starts."""
  return [jnp.where(reset[:, None, None, None], w0, w) for w0, w in zip(reset_weights, weights)]


def _restart(state, reset, reset_weights):
  """Rows where a document starts get the initial weights and no momentum."""
  if reset_weights is None:
    return state
  return {'weights': _restarted(state['weights'], reset, reset_weights),
          'momentum': [jnp.where(reset[:, None, None, None], 0.0, m) for m in state['momentum']]}


def lmm(spec, q, k, v, theta, eta, alpha, state, *, segment_ids=None, reset_weights=None, delta=None):
  """Token by token: each gradient at the memory the previous token left; the retention map applies as the memory
  passes to the next token (the read of a token sees the weights before it, as the last read of a chunk does).
  q, k [B, T, H, dk], v [B, T, H, dv], gates (and Huber's `delta`) [B, T, H]; alpha may be per channel
  [B, T, H, dk] (`memory.decay_axis`). Where segment_ids start a new
  document the memory restarts from `reset_weights` (default: the state's weights) with zero momentum. Returns
  (o [B, T, H, dv], final state)."""
  grad = _per_token(spec, lambda w, k, v, d: _clipped_grad(spec, w, k, v, d))
  read = _per_token(spec, lambda w, q: memory.apply(spec, w, q))
  axes = memory.decay_axes(spec, alpha)
  b, t = q.shape[:2]
  reset = resets(segment_ids, t, b)
  if segment_ids is not None and reset_weights is None:
    reset_weights = state['weights']

  def body(state, xs):
    q_t, k_t, v_t, th, et, al, d_t, r = xs
    state = _restart(state, r, reset_weights)
    g = grad(state['weights'], k_t, v_t, d_t)
    b = lambda x, w: x[..., None, None]
    mom = [b(et, s) * s - b(th, s) * gi for s, gi in zip(state['momentum'], g)]
    weights = [memory.scale(w, 1 - al, ax) + s for w, s, ax in zip(state['weights'], mom, axes)]
    kept = [memory.retain(spec, w, w0, 1 - al, ax) for w, w0, ax in zip(weights, state['weights'], axes)]
    return {'weights': kept, 'momentum': mom}, read(weights, q_t)

  f32 = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  xs = tuple(f32(x) for x in (q, k, v, theta, eta, alpha, memory.thresholds(delta, theta)))
  xs += (jnp.moveaxis(reset, 1, 0),)
  state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1), state


def chunked_lmm(spec, q, k, v, theta, eta, alpha, state, chunk_size: int, *, segment_ids=None,
                reset_weights=None, delta=None):
  """The paper's chunk-parallel semantics with per-token weights: in each chunk every gradient is taken at the
  memory the previous chunk left; momentum and decay then run token by token. A document that starts inside a
  chunk takes its gradients at `reset_weights` (the memory before it) and starts with zero momentum. T must be a
  multiple of chunk_size. The retention map applies at each chunk's end."""
  axes = memory.decay_axes(spec, alpha)
  b, t = q.shape[:2]
  reset = resets(segment_ids, t, b)
  if segment_ids is not None and reset_weights is None:
    reset_weights = state['weights']
  grad = jax.vmap(_per_token(spec, lambda w, k, v, d: _clipped_grad(spec, w, k, v, d)), in_axes=(None, 0, 0, 0))
  read = _per_token(spec, lambda w, q: memory.apply(spec, w, q))
  n = t // chunk_size
  chunked = lambda x: jnp.moveaxis(x.astype(jnp.float32).reshape((b, n, chunk_size) + x.shape[2:]), (1, 2), (0, 1))

  def chunk(state, xs):
    qc, kc, vc, th, et, al, dc, rc = xs                          # [C, B, H, ...]
    g = grad(state['weights'], kc, vc, dc)                         # per layer [C, B, H, i, o], all at the chunk start
    if reset_weights is not None:
      # Tokens of a document that began inside this chunk: gradients at the memory before that document.
      g_new = grad(reset_weights, kc, vc, dc)
      began = (jnp.cumsum(rc, axis=0) > 0)[..., None, None, None]
      g = [jnp.where(began, a, b) for a, b in zip(g_new, g)]

    def token(carry, ys):
      carry, base, decay = carry                 # the chunk's base memory and its decay so far (kl retention)
      q_t, g_t, th_t, et_t, al_t, r_t = ys
      carry = _restart(carry, r_t, reset_weights)
      if reset_weights is not None:
        base = _restarted(base, r_t, reset_weights)
        decay = jnp.where(r_t.reshape(r_t.shape + (1,) * (decay.ndim - r_t.ndim)), 1.0, decay)
      e = lambda x: x[..., None, None]
      mom = [e(et_t) * s - e(th_t) * gi for s, gi in zip(carry['momentum'], g_t)]
      weights = [memory.scale(w, 1 - al_t, ax) + s for w, s, ax in zip(carry['weights'], mom, axes)]
      return ({'weights': weights, 'momentum': mom}, base, decay * (1 - al_t)), read(weights, q_t)

    ones = jnp.ones(al.shape[1:], jnp.float32)
    (state, base, decay), o = jax.lax.scan(token, (state, state['weights'], ones), (qc, g, th, et, al, rc))
    kept = [memory.retain(spec, w, w0, decay, ax) for w, w0, ax in zip(state['weights'], base, axes)]
    return {**state, 'weights': kept}, o

  xs = tuple(chunked(x) for x in (q, k, v, theta, eta, alpha, memory.thresholds(delta, theta)))
  reset_chunks = jnp.moveaxis(reset.reshape(b, n, chunk_size), (1, 2), (0, 1))
  state, o = jax.lax.scan(chunk, state, xs + (reset_chunks,))
  return jnp.moveaxis(o, (0, 1), (1, 2)).reshape((b, t) + o.shape[3:]), state
