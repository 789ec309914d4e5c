"""Reference: scalar-decay linear attention one token at a time, in fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.ops.chunking import resets


def step(state, q, k, v, g, scale):
  """state [B, H, Dk, Dv]; q, k [B, H, Dk]; v [B, H, Dv]; g [B, H].  S ← α S + k vᵀ;  o = Sᵀ (scale q)."""
  state = state * jnp.exp(g)[..., None, None] + jnp.einsum('bhk,bhv->bhkv', k, v)
  return state, jnp.einsum('bhkv,bhk->bhv', state, q * scale)


def scalar_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  state = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else f32(initial_state)
  reset = resets(segment_ids, t, b)

  def body(state, xs):
    q_t, k_t, v_t, g_t, reset_t = xs
    state = jnp.where(reset_t[:, None, None, None], 0.0, state)
    return step(state, q_t, k_t, v_t, g_t, scale)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = tuple(time_major(f32(x)) for x in (q, k, v, g)) + (time_major(reset),)
  state, o = jax.lax.scan(body, state, xs)
  return time_major(o).astype(v.dtype), state
