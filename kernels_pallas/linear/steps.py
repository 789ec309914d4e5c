"""One chunk of the state pass, forward and reverse, on loaded blocks: the arithmetic every kernel variant shares
(the GPU kernel loops over chunks inside a program, the TPU kernel takes one chunk per grid step)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot(x, y, precision='tf32', trans_x=False, trans_y=False):
  """fp32-accumulated x·y with either operand transposed; `precision` ieee asks for full fp32 products, anything
  else for the platform's default (TF32 on a Hopper GPU)."""
  dims = (((0 if trans_x else 1,), (1 if trans_y else 0,)), ((), ()))
  prec = jax.lax.Precision.HIGHEST if precision == 'ieee' else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(x.astype(jnp.float32), y.astype(jnp.float32), dims, precision=(prec, prec),
                             preferred_element_type=jnp.float32)


def forward(S, q, k, u, p, a, w, precision):
  """S [Dk, BV] entering the chunk; q, k, w [C, Dk], u [C, BV], p [C, C], a [Dk, 1]. Returns (O, U, S leaving)."""
  U = u.astype(jnp.float32)
  if w is not None:
    U = U - dot(w, S, precision)
  o = dot(q, S, precision) + dot(p, U, precision)
  return o, U, a.astype(jnp.float32) * S + dot(k, U, precision, trans_x=True)


def reverse(dS, q, k, p, a, do, w, precision):
  """dS [Dk, BV] of the state leaving the chunk. Returns (dU, dS of the state entering it)."""
  do = do.astype(jnp.float32)
  dU = dot(p, do, precision, trans_x=True) + dot(k, dS, precision)
  dS = a.astype(jnp.float32) * dS + dot(q, do, precision, trans_x=True)
  if w is not None:
    dS = dS - dot(w, dU, precision, trans_x=True)
  return dU, dS


def forward_refs(refs, delta, store_states):
  """Splits a forward kernel's refs: (q, k, u, p, a, h0, w | None, (o, final S), (states | None, U | None))."""
  q, k, u, p, a, h0 = refs[:6]
  rest = list(refs[6:])
  w = rest.pop(0) if delta else None
  outs = (rest.pop(0), rest.pop(0))
  h = rest.pop(0) if store_states else None
  U = rest.pop(0) if store_states and delta else None
  return q, k, u, p, a, h0, w, outs, (h, U)


def reverse_refs(refs, delta):
  """Splits a reverse kernel's refs: (q, k, p, a, dO, dS final, w | None, (dS per chunk, dU, dS initial))."""
  q, k, p, a, do, dhT = refs[:6]
  rest = list(refs[6:])
  w = rest.pop(0) if delta else None
  return q, k, p, a, do, dhT, w, tuple(rest[:3])
