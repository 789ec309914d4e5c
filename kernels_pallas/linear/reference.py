"""The chunk state pass of chunked linear attention, as plain jax: the reference the kernels must equal.

Every chunked linear-attention family ends in the same sequential pass over chunks (SPEC.md, "chunkwise-parallel
form"). With the per-chunk operands that need no state already computed in parallel (for chunk n of C tokens):
    q̃  [C, Dk]  queries scaled and decayed from the chunk start       k̃  [C, Dk]  keys decayed to the chunk end
    u  [C, Dv]  values (the delta rule: T V, its UT-transformed values) w  [C, Dk]  the delta rule's T (γ ⊙ K); absent
    p  [C, C]   masked intra-chunk scores                              a  [Dk]     per-key-row decay of the state
the pass over chunks with state S [Dk, Dv] is
    U = u − w S          (U = u without w)
    O = q̃ S + p U
    S ← a ⊙ S + k̃ᵀ U     (a scales the rows of S: a scalar decay repeats one value, a per-channel decay does not)
Layout: heads folded into the batch, time whole: q̃, k̃, w [BH, T, Dk], u [BH, T, Dv], p [BH, T, C] (chunk n's rows
n·C … n·C + C − 1), a [BH, Dk, N], S [BH, Dk, Dv] fp32, T = N·C.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def chunks(x, chunk: int):
  """[BH, N·C, ...] -> [N, BH, C, ...]: chunk-major, for a scan."""
  return jnp.moveaxis(x.reshape((x.shape[0], x.shape[1] // chunk, chunk) + x.shape[2:]), 1, 0)


def state_pass(q, k, u, p, a, h0, w=None, *, chunk: int):
  """Returns (O [BH, T, Dv] fp32, final S [BH, Dk, Dv] fp32)."""
  f32 = lambda x: x.astype(jnp.float32)
  dot = lambda spec, x, y: jnp.einsum(spec, f32(x), f32(y))

  @jax.checkpoint
  def body(state, xs):
    q_n, k_n, u_n, p_n, a_n, w_n = xs
    U = u_n if w_n is None else u_n - dot('bcd,bde->bce', w_n, state)
    o = dot('bcd,bde->bce', q_n, state) + dot('bij,bje->bie', p_n, U)
    return a_n[..., None] * state + dot('bcd,bce->bde', k_n, U), o

  xs = (chunks(q, chunk), chunks(k, chunk), f32(chunks(u, chunk)), chunks(p, chunk),
        jnp.moveaxis(f32(a), -1, 0), None if w is None else chunks(w, chunk))
  state, o = jax.lax.scan(body, f32(h0), xs)
  return jnp.moveaxis(o, 0, 1).reshape(u.shape[:2] + (u.shape[-1],)), state
