"""One chunk of the state pass, forward and reverse, on loaded blocks: the arithmetic every kernel variant shares
(the GPU kernel loops over chunks inside a program, the TPU kernel takes one chunk per grid step). Each direction
is two halves, so that a kernel can store a chunk's results before it computes the next state: in the Triton
lowering, computing the next state before storing O and U measured 1.9× slower on the H100 (forward 3.45 against
1.77 ms, forward+backward 8.66 against 5.81 ms, delta rule at BH 64, T 8192, D 128)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot(x, y, precision='tf32', trans_x=False, trans_y=False):
  """fp32-accumulated x·y with either operand transposed. `precision`: ieee asks for full fp32 products, bf16 rounds
  both operands to bf16 (exact products, the tensor cores' fastest fp32-accumulating form: what bf16 models run
  at), anything else the platform's default for fp32 (TF32 on a Hopper GPU)."""
  dims = (((0 if trans_x else 1,), (1 if trans_y else 0,)), ((), ()))
  prec = jax.lax.Precision.HIGHEST if precision == 'ieee' else jax.lax.Precision.DEFAULT
  operand = jnp.bfloat16 if precision == 'bf16' else jnp.float32
  return jax.lax.dot_general(x.astype(operand), y.astype(operand), dims, precision=(prec, prec),
                             preferred_element_type=jnp.float32)


def corrected(S, u, w, precision):
  """U = u − w S [C, BV]: the chunk's values corrected by the state entering it (the delta rule; u itself without w)."""
  U = u.astype(jnp.float32)
  return U if w is None else U - dot(w, S, precision)


def output(S, q, u, p, w, precision):
  """S [Dk, BV] entering the chunk; q, w [C, Dk], u [C, BV], p [C, C]. Returns (O, U): the chunk's output and its
  corrected values."""
  U = corrected(S, u, w, precision)
  return dot(q, S, precision) + dot(p, U, precision), U


def advance(S, k, U, a, precision):
  """The state leaving the chunk, from S entering it, k [C, Dk], U [C, BV] and a [Dk, 1]."""
  return a.astype(jnp.float32) * S + dot(k, U, precision, trans_x=True)


def value_grad(dS, k, p, do, precision):
  """dU [C, BV] from dS [Dk, BV] of the state leaving the chunk and its output's gradient dO [C, BV]."""
  return dot(p, do, precision, trans_x=True) + dot(k, dS, precision)


def retreat(dS, q, a, do, w, dU, precision):
  """dS of the state entering the chunk."""
  dS = a.astype(jnp.float32) * dS + dot(q, do, precision, trans_x=True)
  if w is not None:
    dS = dS - dot(w, dU, precision, trans_x=True)
  return dS


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
