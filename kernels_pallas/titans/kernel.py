"""A Pallas kernel for Titans' memory (`longctx.ops.titans.chunk`): the whole sequence of anchor batches in one
launch, forward and backward, for the paper's memory — a 2-layer MLP M(x) = x + LN(W₂ σ(W₁ x)) with the ℓ2
attentional bias, decay retention, a per-head forgetting gate and the per-token gradient clip.

One program per (batch·head) walks the batches in order. Its memory (W₁ [D, H], W₂ [H, D] and their momenta, fp32)
is too large for registers or shared memory (1 MB at D 128, H 512), so it lives in the program's own slice of the
state outputs, which stay in L2 between batches, and every pass over it streams column blocks of W₁ with the
matching row blocks of W₂ (`block` hidden units at a time). Per batch of C tokens (notation of
`longctx.ops.titans.chunk`; A, B, C, D, E are computed outside from η, α):

  keys      z₁ = k W₁, h₁ = σ(z₁), z₂ = h₁ W₂ (pass 1); e = k + LN(z₂) − v, δ₂ = LN'(z₂)ᵀ 2e;
            δ₁ = (δ₂ W₂ᵀ) ⊙ σ'(z₁) (pass 2); θ̃ = θ · clip(‖k‖²‖δ₁‖² + ‖h₁‖²‖δ₂‖²)
  reads     r₁ = A (q W₁) + B (q S₁) − ((q kᵀ) ⊙ Γ) δ₁, h_q = σ(r₁), r₂ = A (h_q W₂) + B (h_q S₂) − ((h_q h₁ᵀ) ⊙ Γ) δ₂,
            o = q + LN(r₂)  with Γ = C ⊙ θ̃ (pass 3, which also writes the next state:
            W ← A_C W + B_C S − Xᵀ diag(Γ_C) Δ,  S ← E S − Xᵀ diag(D θ̃) Δ  per layer, X, Δ = (k, δ₁), (h₁, δ₂))

The backward pass (`custom_vjp`) reruns the forward storing the state entering each batch, then walks the batches
in reverse carrying the gradient of the state leaving each one: it recomputes the batch (passes 1–3, keeping z₁, δ₁
and r₁ per token in a scratch output), then takes the reads' and the state update's derivatives block by block
(pass B), the derivative through δ₁'s dependence on W₂ and z₁ (pass C), the second derivative of the keys' loss
through the LayerNorm (`jax.vjp` of δ₂(z₂, k, v) inside the kernel), and the keys' forward pass (pass D).

Lowered through Pallas' Triton lowering (refs, `pl.ds`, dots, loops only), and run on CPU in interpret mode for
the tests. The per-batch arithmetic (`_fwd_step`, `_bwd_step`) is shared with the TPU kernel (`tpu`), which keeps
the state in VMEM instead and takes one grid step per batch. Shapes: C, D and `block` powers of two ≥ 16, H a
multiple of `block`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from longctx.ops.titans import memory


class Options(NamedTuple):
  chunk: int
  activation: str = 'gelu'
  grad_clip: float = 0.0
  block: int = 32
  interpret: bool = False
  num_warps: int = 8
  precision: str = 'tf32'
  backend: str = 'gpu'          # gpu: Triton lowering, one program a memory; tpu: Mosaic TPU (`tpu`)


def supported(spec: memory.MemorySpec, chunk: int, per_channel: bool) -> tuple[bool, str]:
  """Whether the kernel computes this memory, and if not, why."""
  pow2 = lambda x: x >= 16 and x & (x - 1) == 0
  for ok, why in [(spec.depth == 2, f'memory depth {spec.depth} (the kernel has the 2-layer memory)'),
                  (spec.objective == 'l2', f'objective {spec.objective} (the kernel has l2)'),
                  (spec.retention == 'l2', f'retention {spec.retention} (the kernel has l2)'),
                  (not per_channel, 'a per-channel forgetting gate (the kernel has per-head gates)'),
                  (pow2(chunk), f'anchor batch {chunk} (a power of two >= 16)'),
                  (pow2(spec.dk) and spec.dk == spec.dv, f'head dim {spec.dk} (a power of two >= 16)'),
                  (spec.expansion * spec.dk % 16 == 0, 'a hidden width that is a multiple of 16')]:
    if not ok:
      return False, why
  return True, ''


def _dot(x, y, precision, trans_x=False, trans_y=False):
  dims = (((0 if trans_x else 1,), (1 if trans_y else 0,)), ((), ()))
  prec = jax.lax.Precision.HIGHEST if precision == 'ieee' else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(x, y, dims, precision=(prec, prec), preferred_element_type=jnp.float32)


def _derivatives(name):
  """σ, σ' and σ'' of the activation, elementwise."""
  act = memory.ACTIVATIONS[name]
  first = lambda z: jax.jvp(act, (z,), (jnp.ones_like(z),))[1]
  second = lambda z: jax.jvp(first, (z,), (jnp.ones_like(z),))[1]
  return act, first, second


def _rowsum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _keys_delta(z2, k, v):
  """δ₂ = ∂‖k + LN(z₂) − v‖²/∂z₂ for [C, D] rows."""
  y, back = jax.vjp(memory.layer_norm, z2)
  return back(2 * (k + y - v))[0]


def _pick(x, index, axis):
  """x's entry `index` along `axis` (size kept 1), without dynamic slicing."""
  i = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  return jnp.sum(jnp.where(i == index, x, 0.0), axis=axis, keepdims=True)


class _Batch(NamedTuple):
  """What the three forward passes leave for the reads' derivatives."""
  z2: jax.Array      # [C, D] the keys' second pre-activation
  dz2: jax.Array     # [C, D] δ₂
  hsq: jax.Array     # [C, 1] ‖h₁‖²
  n1: jax.Array      # [C, 1] ‖δ₁‖²
  ksq: jax.Array     # [C, 1] ‖k‖²
  n2: jax.Array      # [C, 1] ‖δ₂‖²
  scale: jax.Array   # [C, 1] the clip factor
  d_scale: jax.Array # [C, 1] its derivative in the squared gradient norm
  thc: jax.Array     # [C, 1] θ̃
  coef: jax.Array    # [C, C] Γ
  p1: jax.Array      # [C, C] q kᵀ
  cl: jax.Array      # [C, 1] Γ's last row, per token s
  dl: jax.Array      # [C, 1] D θ̃


def _clip(opts, sq):
  """(factor, d factor / d sq) bringing a squared gradient norm within the clip."""
  if not opts.grad_clip:
    return jnp.ones_like(sq), jnp.zeros_like(sq)
  over = sq > opts.grad_clip ** 2
  safe = jnp.where(over, sq, 1.0)
  r = jax.lax.rsqrt(safe)
  return jnp.where(over, opts.grad_clip * r, 1.0), jnp.where(over, -0.5 * opts.grad_clip * r / safe, 0.0)


def _keys(opts, n_blocks, W1, W2, k, v, Z1, DZ1):
  """Passes 1 and 2 on the state in W1, W2 (refs of [D, H] / [H, D] views): z₁ and δ₁ go to the scratch refs."""
  act, d_act, _ = _derivatives(opts.activation)
  bl = opts.block
  c, d = k.shape

  def p1(j, carry):
    z2, hsq = carry
    js = pl.ds(j * bl, bl)
    z1 = _dot(k, W1(slice(None), js), opts.precision)
    Z1[:, js] = z1
    h1 = act(z1)
    return z2 + _dot(h1, W2(js, slice(None)), opts.precision), hsq + _rowsum(h1 * h1)

  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  z2, hsq = jax.lax.fori_loop(0, n_blocks, p1, (zeros(c, d), zeros(c, 1)))
  dz2 = _keys_delta(z2, k, v)

  def p2(j, n1):
    js = pl.ds(j * bl, bl)
    dz1 = _dot(dz2, W2(js, slice(None)), opts.precision, trans_y=True) * d_act(Z1[:, js])
    DZ1[:, js] = dz1
    return n1 + _rowsum(dz1 * dz1)

  n1 = jax.lax.fori_loop(0, n_blocks, p2, zeros(c, 1))
  return z2, dz2, hsq, n1


def _coefficients(opts, z2, dz2, q, k, th, Cm, Dm, hsq, n1):
  """The clip and the dual form's coefficients of a batch, as a _Batch."""
  ksq, n2 = _rowsum(k * k), _rowsum(dz2 * dz2)
  scale, d_scale = _clip(opts, ksq * n1 + hsq * n2)
  thc = th * scale
  coef = Cm * jnp.transpose(thc)
  cl = jnp.transpose(_pick(coef, coef.shape[0] - 1, 0))
  return _Batch(z2, dz2, hsq, n1, ksq, n2, scale, d_scale, thc, coef, _dot(q, k, opts.precision, trans_y=True), cl,
                Dm * thc)


def _batch(opts, n_blocks, W1, W2, S1, S2, q, k, v, th, A, B, Cm, Dm, E, Z1, DZ1, R1=None, update=None,
           keep=None):
  """One batch forward on the state views W1, W2, S1, S2. `update` (setters of W₁, W₂, S₁, S₂ blocks) writes the
  next state, `keep` (the same) a copy of the entering one; R1 keeps r₁. Returns (o, r₂, h_q h₁ᵀ, _Batch)."""
  act, _, _ = _derivatives(opts.activation)
  bl = opts.block
  c, d = q.shape
  z2, dz2, hsq, n1 = _keys(opts, n_blocks, W1, W2, k, v, Z1, DZ1)
  bt = _coefficients(opts, z2, dz2, q, k, th, Cm, Dm, hsq, n1)
  coef, cl, dl = bt.coef, bt.cl, bt.dl
  m1 = bt.p1 * coef
  last = lambda x: jnp.sum(_pick(x, c - 1, 0))
  a_c, b_c, e = last(A), last(B), jnp.sum(_pick(E, 0, 0))

  def p3(j, carry):
    r2, p2 = carry
    js, all_ = pl.ds(j * bl, bl), slice(None)
    w1, s1, w2, s2 = W1(all_, js), S1(all_, js), W2(js, all_), S2(js, all_)
    h1, dz1 = act(Z1[:, js]), DZ1[:, js]
    r1 = A * _dot(q, w1, opts.precision) + B * _dot(q, s1, opts.precision) - _dot(m1, dz1, opts.precision)
    if R1 is not None:
      R1[:, js] = r1
    hq = act(r1)
    r2 = r2 + A * _dot(hq, w2, opts.precision) + B * _dot(hq, s2, opts.precision)
    p2 = p2 + _dot(hq, h1, opts.precision, trans_y=True)
    if keep is not None:
      for put, val in zip(keep, (w1, w2, s1, s2)):
        put(js, val)
    if update is not None:
      set_w1, set_w2, set_s1, set_s2 = update
      set_w1(js, a_c * w1 + b_c * s1 - _dot(k, cl * dz1, opts.precision, trans_x=True))
      set_s1(js, e * s1 - _dot(k, dl * dz1, opts.precision, trans_x=True))
      set_w2(js, a_c * w2 + b_c * s2 - _dot(h1, cl * dz2, opts.precision, trans_x=True))
      set_s2(js, e * s2 - _dot(h1, dl * dz2, opts.precision, trans_x=True))
    return r2, p2

  r2, p2 = jax.lax.fori_loop(0, n_blocks, p3, (jnp.zeros((c, d), jnp.float32), jnp.zeros((c, c), jnp.float32)))
  r2 = r2 - _dot(p2 * coef, dz2, opts.precision)
  o = q + memory.layer_norm(r2)
  return o, r2, p2, bt


def _views(ref, offset=None, size=None):
  """A [D, H] / [H, D] state read as view(rows, cols), optionally at a row offset (a state stored in a [N·D, H]
  ref)."""
  if offset is None:
    return lambda r, c: ref[r, c]
  return lambda r, c: ref[pl.ds(offset, size) if isinstance(r, slice) else pl.ds(offset + r.start, r.size), c]


def _setter(ref, cols: bool, offset=None, size=None):
  """put(block, value) writing a column block (cols) or a row block of a state, optionally at a row offset."""
  def put(js, val):
    if cols:
      ref[slice(None) if offset is None else pl.ds(offset, size), js] = val
    else:
      ref[js if offset is None else pl.ds(offset + js.start, js.size), :] = val
  return put


def _copy(dsts, srcs, n_blocks, block):
  """Copies the (W₁-shaped, W₂-shaped, W₁-shaped, W₂-shaped) state refs block by block."""
  def body(j, _):
    js = pl.ds(j * block, block)
    for i, (dst, src) in enumerate(zip(dsts, srcs)):
      if i % 2 == 0:
        dst[:, js] = src[:, js]
      else:
        dst[js, :] = src[js, :]
    return 0
  jax.lax.fori_loop(0, n_blocks, body, 0)


def _fwd_step(opts, n_blocks, ins, state, scratch, keep=None):
  """One batch: o [C, D] from the [C, ·] operands `ins`, the state refs (W₁, W₂, S₁, S₂) moved to the batch's end,
  the entering state copied through `keep` (setters) when given."""
  W1, W2, S1, S2 = state
  o, *_ = _batch(opts, n_blocks, _views(W1), _views(W2), _views(S1), _views(S2), *ins, *scratch,
                 update=(_setter(W1, True), _setter(W2, False), _setter(S1, True), _setter(S2, False)), keep=keep)
  return o


def _fwd_kernel(q_ref, k_ref, v_ref, th_ref, a_ref, b_ref, cm_ref, dm_ref, e_ref, w1_in, w2_in, s1_in, s2_in,
                *outs, opts, n_chunks, store):
  o_ref, W1, W2, S1, S2 = outs[:5]
  rest = list(outs[5:])
  stored = [rest.pop(0) for _ in range(4)] if store else None
  d, h = w1_in.shape
  n_blocks = h // opts.block
  c = opts.chunk
  _copy((W1, W2, S1, S2), (w1_in, w2_in, s1_in, s2_in), n_blocks, opts.block)

  def body(n, _):
    rows = pl.ds(n * c, c)
    ins = [ref[rows, :].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref, th_ref, a_ref, b_ref, cm_ref, dm_ref,
                                                        e_ref)]
    keep = None
    if store:
      keep = [_setter(ref, i % 2 == 0, n * size, size) for i, (ref, size) in enumerate(zip(stored, (d, h, d, h)))]
    o_ref[rows, :] = _fwd_step(opts, n_blocks, ins, (W1, W2, S1, S2), rest, keep).astype(o_ref.dtype)
    return 0

  jax.lax.fori_loop(0, n_chunks, body, 0)


def _bwd_step(opts, n_blocks, ins, do, state, grads, scratch):
  """One batch in reverse: from the state entering it (views W₁, W₂, S₁, S₂), dO and the gradient of the state
  leaving it (refs, turned in place into the gradient of the entering state), the gradients of the batch's operands
  (dq, dk, dv, dθ, dA, dB, dC, dD, dE)."""
  act, d_act, dd_act = _derivatives(opts.activation)
  q, k, v, th, A, B, Cm, Dm, E = ins
  W1, W2, S1, S2 = state
  dW1, dW2, dS1, dS2 = grads
  Z1, DZ1, R1, DDZ1, DH1 = scratch
  c, d = q.shape
  bl, prec = opts.block, opts.precision
  dot = functools.partial(_dot, precision=prec)
  all_ = slice(None)
  o, r2, p2, bt = _batch(opts, n_blocks, W1, W2, S1, S2, q, k, v, th, A, B, Cm, Dm, E, Z1, DZ1, R1=R1)
  del o
  last = lambda x: jnp.sum(_pick(x, c - 1, 0))
  a_c, b_c, e = last(A), last(B), jnp.sum(_pick(E, 0, 0))
  m1 = bt.p1 * bt.coef
  # The read's output norm and the second layer's dual term.
  _, ln_back = jax.vjp(memory.layer_norm, r2)
  dr2 = ln_back(do)[0]
  x2 = -dot(dr2, bt.dz2, trans_y=True)
  dcoef = p2 * x2
  dp2 = bt.coef * x2
  ddz2 = -dot(p2 * bt.coef, dr2, trans_x=True)
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)

  def pass_b(j, carry):
    dA, dB, dq, dk, ddz2, x1, dcl, ddl, da_c, db_c, de = carry
    js = pl.ds(j * bl, bl)
    w1, s1, w2, s2 = W1(all_, js), S1(all_, js), W2(js, all_), S2(js, all_)
    z1, dz1, r1 = Z1[:, js], DZ1[:, js], R1[:, js]
    h1, hq = act(z1), act(r1)
    y1, u1, y2, u2 = dW1[:, js], dS1[:, js], dW2[js, :], dS2[js, :]
    # Second layer: the read, then the state update.
    u = dot(dr2, w2, trans_y=True)
    wv = dot(dr2, s2, trans_y=True)
    dA, dB = dA + _rowsum(u * hq), dB + _rowsum(wv * hq)
    dhq = A * u + B * wv + dot(dp2, h1)
    dh1 = dot(dp2, hq, trans_x=True)
    hy, hz = dot(h1, y2), dot(h1, u2)
    ddz2 = ddz2 - bt.cl * hy - bt.dl * hz
    dcl, ddl = dcl - _rowsum(hy * bt.dz2), ddl - _rowsum(hz * bt.dz2)
    dh1 = dh1 - bt.cl * dot(bt.dz2, y2, trans_y=True) - bt.dl * dot(bt.dz2, u2, trans_y=True)
    da_c, db_c, de = da_c + jnp.sum(y2 * w2), db_c + jnp.sum(y2 * s2), de + jnp.sum(u2 * s2)
    dW2[js, :] = dot(hq, A * dr2, trans_x=True) + a_c * y2
    dS2[js, :] = dot(hq, B * dr2, trans_x=True) + b_c * y2 + e * u2
    # First layer.
    dr1 = dhq * d_act(r1)
    dA = dA + _rowsum(dr1 * dot(q, w1))
    dB = dB + _rowsum(dr1 * dot(q, s1))
    dq = dq + dot(A * dr1, w1, trans_y=True) + dot(B * dr1, s1, trans_y=True)
    x1 = x1 - dot(dr1, dz1, trans_y=True)
    ky, kz = dot(k, y1), dot(k, u1)
    ddz1 = -dot(m1, dr1, trans_x=True) - bt.cl * ky - bt.dl * kz
    dcl, ddl = dcl - _rowsum(ky * dz1), ddl - _rowsum(kz * dz1)
    dk = dk - bt.cl * dot(dz1, y1, trans_y=True) - bt.dl * dot(dz1, u1, trans_y=True)
    da_c, db_c, de = da_c + jnp.sum(y1 * w1), db_c + jnp.sum(y1 * s1), de + jnp.sum(u1 * s1)
    dW1[:, js] = dot(q, A * dr1, trans_x=True) + a_c * y1
    dS1[:, js] = dot(q, B * dr1, trans_x=True) + b_c * y1 + e * u1
    DDZ1[:, js] = ddz1
    DH1[:, js] = dh1
    return dA, dB, dq, dk, ddz2, x1, dcl, ddl, da_c, db_c, de

  s0 = jnp.zeros((), jnp.float32)
  dA, dB, dq, dk, ddz2, x1, dcl, ddl, da_c, db_c, de = jax.lax.fori_loop(
      0, n_blocks, pass_b, (zeros(c, 1), zeros(c, 1), do, zeros(c, d), ddz2, zeros(c, c), zeros(c, 1),
                            zeros(c, 1), s0, s0, s0))
  dp1 = bt.coef * x1
  dq = dq + dot(dp1, k)
  dk = dk + dot(dp1, q, trans_x=True)
  dcoef = dcoef + bt.p1 * x1
  # Γ = C ⊙ θ̃ (columns), its last row, and D θ̃.
  thc_row = jnp.transpose(bt.thc)
  dcm = dcoef * thc_row
  is_last = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) == c - 1
  dcm = dcm + jnp.where(is_last, jnp.transpose(dcl) * thc_row, 0.0)
  dthc = jnp.transpose(jnp.sum(dcoef * Cm, axis=0, keepdims=True))
  dthc = dthc + dcl * jnp.transpose(_pick(Cm, c - 1, 0)) + ddl * Dm
  ddm = ddl * bt.thc
  first_row = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
  dA = dA + jnp.where(first_row == c - 1, da_c, 0.0)
  dB = dB + jnp.where(first_row == c - 1, db_c, 0.0)
  # The clip.
  dth = dthc * bt.scale
  dsq = dthc * th * bt.d_scale
  ksq, n2 = bt.ksq, bt.n2
  dk = dk + 2 * k * bt.n1 * dsq
  ddz2 = ddz2 + 2 * bt.dz2 * bt.hsq * dsq

  def pass_c(j, ddz2):
    js = pl.ds(j * bl, bl)
    ddz1 = DDZ1[:, js] + 2 * DZ1[:, js] * ksq * dsq
    DDZ1[:, js] = ddz1
    return ddz2 + dot(ddz1 * d_act(Z1[:, js]), W2(js, all_))

  ddz2 = jax.lax.fori_loop(0, n_blocks, pass_c, ddz2)
  _, keys_back = jax.vjp(_keys_delta, bt.z2, k, v)
  dz2pre, dk_keys, dv = keys_back(ddz2)
  dk = dk + dk_keys

  def pass_d(j, dk):
    js = pl.ds(j * bl, bl)
    w1, w2 = W1(all_, js), W2(js, all_)
    z1 = Z1[:, js]
    h1, ddz1 = act(z1), DDZ1[:, js]
    t = ddz1 * d_act(z1)
    dz1pre = ddz1 * dot(bt.dz2, w2, trans_y=True) * dd_act(z1)
    dh1 = DH1[:, js] + 2 * h1 * n2 * dsq + dot(dz2pre, w2, trans_y=True)
    dz1 = dh1 * d_act(z1) + dz1pre
    dW2[js, :] = dW2[js, :] + dot(t, bt.dz2, trans_x=True) + dot(h1, dz2pre, trans_x=True)
    dW1[:, js] = dW1[:, js] + dot(k, dz1, trans_x=True)
    return dk + dot(dz1, w1, trans_y=True)

  dk = jax.lax.fori_loop(0, n_blocks, pass_d, dk)
  return dq, dk, dv, dth, dA, dB, dcm, ddm, jnp.where(first_row == 0, de, 0.0)


def _bwd_kernel(q_ref, k_ref, v_ref, th_ref, a_ref, b_ref, cm_ref, dm_ref, e_ref, w1s, w2s, s1s, s2s, do_ref,
                dw1_in, dw2_in, ds1_in, ds2_in,
                dq_ref, dk_ref, dv_ref, dth_ref, da_ref, db_ref, dcm_ref, ddm_ref, de_ref, dW1, dW2, dS1, dS2,
                *scratch, opts, n_chunks):
  d, h = dw1_in.shape
  n_blocks = h // opts.block
  c = opts.chunk
  _copy((dW1, dW2, dS1, dS2), (dw1_in, dw2_in, ds1_in, ds2_in), n_blocks, opts.block)

  def body(i, _):
    n = n_chunks - 1 - i
    rows = pl.ds(n * c, c)
    ins = [ref[rows, :].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref, th_ref, a_ref, b_ref, cm_ref, dm_ref,
                                                        e_ref)]
    state = (_views(w1s, n * d, d), _views(w2s, n * h, h), _views(s1s, n * d, d), _views(s2s, n * h, h))
    out = _bwd_step(opts, n_blocks, ins, do_ref[rows, :].astype(jnp.float32), state, (dW1, dW2, dS1, dS2), scratch)
    for ref, val in zip((dq_ref, dk_ref, dv_ref, dth_ref, da_ref, db_ref, dcm_ref, ddm_ref, de_ref), out):
      ref[rows, :] = val.astype(ref.dtype)
    return 0

  jax.lax.fori_loop(0, n_chunks, body, 0)


def _compiler_params(opts):
  return None if opts.interpret else pltriton.CompilerParams(num_warps=opts.num_warps, num_stages=1)


def _whole(shape):
  return pl.BlockSpec((None,) + shape, lambda i: (i,) + (0,) * len(shape))


def _call(kernel, opts, bh, inputs, out_shapes, name):
  f32 = lambda shape: jax.ShapeDtypeStruct((bh,) + shape, jnp.float32)
  return pl.pallas_call(kernel, grid=(bh,), in_specs=[_whole(x.shape[1:]) for x in inputs],
                        out_specs=[_whole(s) for s in out_shapes], out_shape=[f32(s) for s in out_shapes],
                        interpret=opts.interpret, compiler_params=_compiler_params(opts), name=name)(*inputs)


def _forward(opts, args, store):
  if opts.backend == 'tpu':
    from kernels_pallas.titans import tpu
    return tpu.forward(opts, args, store)
  q, k, v, th, A, B, Cm, Dm, E, W1, W2, S1, S2 = args
  bh, t, d = q.shape
  h = W1.shape[-1]
  n = t // opts.chunk
  shapes = [(t, d), (d, h), (h, d), (d, h), (h, d)]
  if store:
    shapes += [(n * d, h), (n * h, d), (n * d, h), (n * h, d)]
  shapes += [(opts.chunk, h)] * 2
  kernel = functools.partial(_fwd_kernel, opts=opts, n_chunks=n, store=store)
  return _call(kernel, opts, bh, args, shapes, 'titans_memory_fwd')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _memory(opts, *args):
  return tuple(_forward(opts, args, store=False)[:5])


def _memory_fwd(opts, *args):
  return _memory(opts, *args), args


def _memory_bwd(opts, args, grads):
  q, k, v, th, A, B, Cm, Dm, E, W1, W2, S1, S2 = args
  do, dW1, dW2, dS1, dS2 = grads
  bh, t, d = q.shape
  h = W1.shape[-1]
  stored = _forward(opts, args, store=True)[5:9]
  if opts.backend == 'tpu':
    from kernels_pallas.titans import tpu
    out = tpu.backward(opts, args, stored, do, (dW1, dW2, dS1, dS2))
    return tuple(g.astype(x.dtype) for g, x in zip(out, args))
  kernel = functools.partial(_bwd_kernel, opts=opts, n_chunks=t // opts.chunk)
  shapes = [(t, d)] * 3 + [(t, 1)] * 3 + [(t, opts.chunk), (t, 1), (t, 1), (d, h), (h, d), (d, h), (h, d)]
  shapes += [(opts.chunk, h)] * 5
  inputs = (q, k, v, th, A, B, Cm, Dm, E, *stored, do, dW1, dW2, dS1, dS2)
  out = _call(kernel, opts, bh, inputs, shapes, 'titans_memory_bwd')
  return tuple(g.astype(x.dtype) for g, x in zip(out[:13], args))


_memory.defvjp(_memory_fwd, _memory_bwd)


def memory_pass(q, k, v, theta, A, B, Cm, D, E, weights, momentum, opts: Options):
  """q, k, v [BH, T, Dh] fp32 (T a multiple of opts.chunk); theta, A, B, D, E [BH, T, 1] (E repeated over each
  batch's tokens); Cm [BH, T, C] (row t of its batch's C matrix); weights, momentum: (W₁ [BH, Dh, H], W₂ [BH, H,
  Dh]) entering. Returns (o [BH, T, Dh], (W₁, W₂), (S₁, S₂) leaving)."""
  o, W1, W2, S1, S2 = _memory(opts, q, k, v, theta, A, B, Cm, D, E, weights[0], weights[1], momentum[0],
                              momentum[1])
  return o, (W1, W2), (S1, S2)
