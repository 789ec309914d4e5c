"""Reference: per-channel decay recurrences one token at a time, in fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.ops.chunking import resets


def step(state, q, k, v, g, scale):
  """state [B, H, Dk, Dv]; q, k, g [B, H, Dk]; v [B, H, Dv].  S ← Diag(e^g) S + k vᵀ;  o = Sᵀ (scale q)."""
  state = state * jnp.exp(g)[..., None] + jnp.einsum('bhk,bhv->bhkv', k, v)
  return state, jnp.einsum('bhkv,bhk->bhv', state, q * scale)


def vector_step(state, x, g):
  """state, x, g [B, D]:  h ← e^g ⊙ h + x; the output is h."""
  state = jnp.exp(g) * state + x
  return state, state


def _scan(step_fn, state, arrays, segment_ids, out_dtype):
  b, t = arrays[0].shape[:2]
  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  reset = resets(segment_ids, t, b)

  def body(state, xs):
    *inputs, reset_t = xs
    state = jnp.where(reset_t.reshape((b,) + (1,) * (state.ndim - 1)), 0.0, state)
    return step_fn(state, *inputs)

  xs = tuple(time_major(x.astype(jnp.float32)) for x in arrays) + (time_major(reset),)
  state, o = jax.lax.scan(body, state, xs)
  return time_major(o).astype(out_dtype), state


def channel_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None):
  b, _, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  state = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  return _scan(lambda s, *a: step(s, *a, scale), state, (q, k, v, g), segment_ids, v.dtype)


def vector_decay(x, g, *, initial_state=None, segment_ids=None):
  """x, g [B, T, D]; initial_state [B, D]."""
  state = (jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  return _scan(vector_step, state, (x, g), segment_ids, x.dtype)
