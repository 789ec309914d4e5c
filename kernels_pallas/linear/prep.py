"""Pallas kernels for everything a chunked linear-attention form computes before its state pass, all chunks at once:
the (gated) delta rule and scalar decay (RetNet, Lightning, Mamba2).

For one chunk of C tokens of one (batch, head), with G the log-gates' cumulative sums within the chunk and the
document masks (two positions interact only within one document; the incoming state reaches position i only
before the chunk's first document start; position j's update reaches the chunk's end only after its last):
    Γ_ij = e^{G_i − G_j} (j ≤ i, one document),   γ_i = e^{G_i} (where the incoming state reaches i, else 0)
    p = scale · (Q Kᵀ) ⊙ Γ,   q̃ = scale · γ ⊙ Q,   k̃ = e^{G_C − G} ⊙ K (0 where the update does not reach the end)
and for the delta rule, with β,
    A = strictLower(diag(β) (Γ ⊙ K Kᵀ)),   X = (I + A)⁻¹,   w = X (βγ ⊙ K),   ũ = X (β ⊙ V)
(scalar decay passes V itself as ũ and has no w). These are the operands of `reference.state_pass`
(longctx.ops.delta_rule.chunk and longctx.ops.scalar_decay.chunk have the same in plain jax, the references these
kernels must equal).

One program per (batch·head, chunk). It reads Q, K and V in their [B, T, H, D] layout, so no heads-first fp32 copy
of the inputs is made; builds the delta rule's A and X in 16×16 blocks (`inverse.block_inverse`: doubling inside the
diagonal blocks, block forward substitution below them) without leaving the chip; and writes the operands
heads-first [B·H, T, ·] in the input dtype, which the state pass reads directly. bf16 inputs multiply in bf16 with
fp32 accumulation (`steps.dot` precision bf16) except inside the inverse, which stays in fp32 (TF32 products on
the GPU, full fp32 under precision ieee).

Portable Pallas (refs, static slices, dots), lowered through the Triton lowering on GPU; the tests run it on CPU in
interpret mode. `gradients` is the vector-Jacobian product, one program per chunk as well, for the delta rule from X
stored by the forward pass (`store_inverse`), so the backward pass neither inverts again nor goes through the jax
form. Delta-rule launch defaults from the H100 (B4 T8192 H16 D128 bf16, chunk 64, 2026-11-24): `prepare` 0.94 ms at
4 warps (1.04 at 2, 1.51 at 8; with a row loop for the diagonal inverses it was 1.09 at 2, 1.30 at 4);
`gradients` 2.43 ms at 4 + 8 warps (2.62 at 8 + 8, 2.86 at 4 + 4, 3.85 at 4 + 16, 14.9 at 2 + 8; 3.02 as one kernel
at 8 warps): together its two kernels hold more [C, C] and [C, D] fp32 values than one program's registers, and
fewer warps spill them. Shapes: C a power of two from 16 to 128, head dims powers of two ≥ 16 (callers pad), T a
multiple of C. Scalar decay, same shape: `prepare` 0.54 ms at 4 warps (0.65 at 2, 0.57 at 8), `gradients` 1.19 ms
at 8 (1.49 at 4, 3.20 at 2); `scripts/bench.py --suite prep` measures both.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.linear.inverse import BLOCK, MAX_CHUNK, block_inverse, block_rows, store_blocks
from kernels_pallas.linear.steps import dot


def supported(chunk: int, dk: int, dv: int) -> tuple[bool, str]:
  """Whether the kernel takes these sizes, and if not, why."""
  if chunk & (chunk - 1) or not BLOCK <= chunk <= MAX_CHUNK:
    return False, f'chunk size {chunk} is not a power of two between {BLOCK} and {MAX_CHUNK}'
  for name, d in (('key head dim', dk), ('value head dim', dv)):
    if d < 16 or d & (d - 1):
      return False, f'{name} {d} is not a power of two ≥ 16'
  return True, ''


def _fp32(precision):
  """The precision of the products that stay in fp32 whatever the inputs (the inverse and the gradients through
  it): full fp32 products under ieee, the platform's default (TF32) otherwise."""
  return 'ieee' if precision == 'ieee' else 'tf32'


class _Gates:
  """The gates of one chunk read from G (and the reset counts): Γ blocks and the per-position factors."""

  def __init__(self, G_ref, count_ref):
    self.G_ref, self.count_ref = G_ref, count_ref
    c = G_ref.shape[0]
    self.whole = pl.ds(0, c)
    G = G_ref[...].astype(jnp.float32)
    self.is_last = jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
    self.g_end = jnp.sum(jnp.where(self.is_last, G, 0.0))
    self.last = None if count_ref is None else jnp.max(count_ref[...])

  def G(self, sl):
    return self.G_ref[sl].astype(jnp.float32)

  def start(self, sl):
    """γ: e^G where the incoming state reaches the position, else 0."""
    g = jnp.exp(self.G(sl))
    return g if self.count_ref is None else jnp.where(self.count_ref[sl] == 0, g, 0.0)

  def end(self, sl):
    """e^{G_C − G} where the position's update reaches the chunk's last state, else 0."""
    e = jnp.exp(self.g_end - self.G(sl))
    return e if self.count_ref is None else jnp.where(self.count_ref[sl] == self.last, e, 0.0)

  def decay(self, sl_i, sl_j, diagonal):
    """Γ on the block of rows sl_i and columns sl_j, zero where j > i (a diagonal block) or where i and j lie in
    different documents."""
    gi, gj = self.G(sl_i), self.G(sl_j)
    shape = (gi.shape[0], gj.shape[0])
    mask = None
    if diagonal:
      mask = jax.lax.broadcasted_iota(jnp.int32, shape, 1) <= jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    if self.count_ref is not None:
      same = self.count_ref[sl_i][:, None] == self.count_ref[sl_j][None, :]
      mask = same if mask is None else mask & same
    diff = gi[:, None] - gj[None, :]
    if mask is None:
      return jnp.exp(diff)
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _kernel(*refs, scale, segments, delta, precision, store_inverse):
  refs = iter(refs)
  q_ref, k_ref, v_ref = next(refs), next(refs), next(refs)
  beta_ref = next(refs) if delta else None
  G_ref = next(refs)
  count_ref = next(refs) if segments else None
  qt_ref, kt_ref, u_ref, p_ref = next(refs), next(refs), next(refs), next(refs)
  w_ref = next(refs) if delta else None
  x_ref = next(refs) if store_inverse else None
  c = G_ref.shape[0]
  f32 = jnp.float32
  gates = _Gates(G_ref, count_ref)
  whole = gates.whole
  q = q_ref[...]
  k = k_ref[...]
  p_ref[...] = (scale * dot(q, k, precision, trans_y=True) * gates.decay(whole, whole, True)).astype(p_ref.dtype)
  qt_ref[...] = ((scale * gates.start(whole))[:, None] * q.astype(f32)).astype(qt_ref.dtype)
  kt_ref[...] = (gates.end(whole)[:, None] * k.astype(f32)).astype(kt_ref.dtype)
  if not delta:
    u_ref[...] = v_ref[...].astype(u_ref.dtype)
    return

  def a_block(i, j):
    kk = dot(k_ref[block_rows(i), :], k_ref[block_rows(j), :], precision, trans_y=True)
    return beta_ref[block_rows(i)].astype(f32)[:, None] * gates.decay(block_rows(i), block_rows(j), i == j) * kk

  nb = c // BLOCK
  x = block_inverse(a_block, nb, _fp32(precision))
  beta = [beta_ref[block_rows(j)].astype(f32) for j in range(nb)]
  keys = [((beta[j] * gates.start(block_rows(j)))[:, None] * k_ref[block_rows(j), :].astype(f32)) for j in range(nb)]
  values = [beta[j][:, None] * v_ref[block_rows(j), :].astype(f32) for j in range(nb)]
  for i in range(nb):
    w_ref[block_rows(i), :] = sum(dot(x[i, j], keys[j], precision) for j in range(i + 1)).astype(w_ref.dtype)
    u_ref[block_rows(i), :] = sum(dot(x[i, j], values[j], precision) for j in range(i + 1)).astype(u_ref.dtype)
    if x_ref is not None:
      store_blocks(x_ref, x, nb, i)


def _inverse_grad_kernel(*refs, segments, precision):
  """First half of the VJP (see `_grad_kernel`): through the inverse, dV, rowsum(Y ⊙ V) and dA."""
  k_ref, v_ref, beta_ref, G_ref = refs[:4]
  count_ref = refs[4] if segments else None
  x_ref, du_ref, dw_ref, dv_ref, dbeta_ref, dA_ref = refs[4 + segments:]
  f32 = jnp.float32
  exact = _fp32(precision)
  gates = _Gates(G_ref, count_ref)
  c = G_ref.shape[0]
  beta = beta_ref[...].astype(f32)
  gamma = gates.start(gates.whole)
  X = x_ref[...]
  dw, du = dw_ref[...], du_ref[...]
  kf, vf = k_ref[...].astype(f32), v_ref[...].astype(f32)
  dX = dot(dw, (beta * gamma)[:, None] * kf, exact, trans_y=True) + dot(du, beta[:, None] * vf, exact, trans_y=True)
  Y = dot(X, du, exact, trans_x=True)
  dv_ref[...] = (beta[:, None] * Y).astype(dv_ref.dtype)
  dbeta_ref[...] = jnp.sum(Y * vf, axis=1)
  strict = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1) < jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  dA_ref[...] = jnp.where(strict, -dot(dot(X, dX, exact, trans_x=True), X, exact, trans_y=True), 0.0)


def _grad_kernel(*refs, scale, segments, delta, precision):
  """The gradient of one chunk's operands with respect to Q, K, G (and the delta rule's β, given dA and
  rowsum(Y ⊙ V) from `_inverse_grad_kernel`; scalar decay's dV is dũ itself, moved back to the tokens' layout). With
  the forward formulas of the module docstring:
      dX = dw (βγK)ᵀ + dũ (βV)ᵀ,   Z = Xᵀ dw,   Y = Xᵀ dũ,   dA = strictLower(−Xᵀ dX Xᵀ)
      dK = (dA' + dA'ᵀ) K + s (dp ⊙ Γ)ᵀ Q + βγ Z + e dk̃,   dA' = β ⊙ Γ ⊙ dA
      dQ = s (dp ⊙ Γ) K + s γ dq̃,   dV = β Y,   dβ = rowsum(dA ⊙ Γ ⊙ KKᵀ) + γ rowsum(Z ⊙ K) + rowsum(Y ⊙ V)
      dG = rowsum(M) − colsum(M) + γ (s rowsum(dq̃ ⊙ Q) + β rowsum(Z ⊙ K)) − e ⊙ de + [i = C] Σ e ⊙ de,
  with M = Γ ⊙ (β ⊙ dA ⊙ KKᵀ + s dp ⊙ QKᵀ) and de = rowsum(dk̃ ⊙ K); scalar decay drops every term with β, A or w.
  The delta rule's two kernels rather than one: together they hold more [C, C] and [C, D] fp32 values than a
  program's registers."""
  refs = iter(refs)
  q_ref, k_ref = next(refs), next(refs)
  beta_ref = next(refs) if delta else None
  G_ref = next(refs)
  count_ref = next(refs) if segments else None
  if delta:
    x_ref, dA_ref, ydv_ref = next(refs), next(refs), next(refs)
  dqt_ref, dkt_ref, dp_ref = next(refs), next(refs), next(refs)
  dw_ref = next(refs) if delta else None
  du_ref = None if delta else next(refs)
  dq_ref, dk_ref = next(refs), next(refs)
  dbeta_ref = next(refs) if delta else None
  dv_ref = None if delta else next(refs)
  dG_ref = next(refs)
  # Ordered so that few [C, C] and [C, D] values are live at once (they are held in registers).
  f32 = jnp.float32
  exact = _fp32(precision)
  gates = _Gates(G_ref, count_ref)
  whole = gates.whole
  rowsum = lambda a: jnp.sum(a, axis=1)
  gamma = gates.start(whole)
  kf = k_ref[...].astype(f32)
  M = dk = 0.0    # what flows through A and w: none for scalar decay
  if delta:
    beta = beta_ref[...].astype(f32)
    Z = dot(x_ref[...], dw_ref[...], exact, trans_x=True)
    ZK = rowsum(Z * kf)
    dk = (beta * gamma)[:, None] * Z
  # Through A = β Γ K Kᵀ and P = s (Q Kᵀ) Γ.
  Gamma = gates.decay(whole, whole, True)
  k = k_ref[...]
  if delta:
    KK = dot(k, k, precision, trans_y=True)
    dA_gamma = dA_ref[...] * Gamma
    dbeta_ref[...] = ydv_ref[...] + rowsum(dA_gamma * KK) + gamma * ZK
    M = beta[:, None] * dA_gamma * KK
    dKK = beta[:, None] * dA_gamma
    dk = dk + dot(dKK, k, exact) + dot(dKK, k, exact, trans_x=True)
  else:
    dv_ref[...] = du_ref[...].astype(dv_ref.dtype)
  q = q_ref[...]
  dP = dp_ref[...].astype(f32) * Gamma * scale
  M = M + dP * dot(q, k, precision, trans_y=True)
  dk = dk + dot(dP, q, exact, trans_x=True)
  dqt = dqt_ref[...].astype(f32)
  dq_ref[...] = (dot(dP, k, exact) + (scale * gamma)[:, None] * dqt).astype(dq_ref.dtype)
  e = gates.end(whole)
  dkt = dkt_ref[...].astype(f32)
  dk_ref[...] = (dk + e[:, None] * dkt).astype(dk_ref.dtype)
  de = rowsum(dkt * kf) * e
  from_start = scale * rowsum(dqt * q.astype(f32)) + (beta * ZK if delta else 0.0)
  dG = rowsum(M) - jnp.sum(M, axis=0) + gamma * from_start - de
  dG_ref[...] = dG + jnp.where(gates.is_last, jnp.sum(de), 0.0)


def _specs(h, chunk, dk, dv, delta, segments):
  """(input specs of `prepare`, and the spec makers: heads-first [B·H, T, d], tokens [B, T, H, d], gates [B·H, T])."""
  tokens = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, n: (i // h, n, i % h, 0))
  gates = pl.BlockSpec((None, chunk), lambda i, n: (i, n))
  inputs = [tokens(dk), tokens(dk), tokens(dv)] + [gates] * (1 + delta)
  if segments:
    inputs.append(pl.BlockSpec((None, chunk), lambda i, n: (i // h, n)))
  heads_first = lambda d: pl.BlockSpec((None, chunk, d), lambda i, n: (i, n, 0))
  return inputs, heads_first, tokens, gates


def check_sizes(q, v, chunk):
  t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
  ok, why = supported(chunk, dk, dv)
  if not ok or t % chunk:
    raise ValueError(f'linear prep kernel: {why or f"length {t} is not a multiple of the chunk {chunk}"}')


def launch(kernel, grid, in_specs, out_specs, out_shape, interpret, num_warps, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1), name=name)


def _inputs(q, k, v, beta, G, count):
  args = [q, k, v] + ([] if beta is None else [beta.astype(jnp.float32)]) + [G.astype(jnp.float32)]
  return args + ([] if count is None else [count.astype(jnp.int32)])


@functools.partial(jax.jit, static_argnames=('chunk', 'scale', 'precision', 'store_inverse', 'interpret',
                                             'num_warps'))
def prepare(q, k, v, beta, G, count=None, *, chunk: int, scale: float, precision: str = 'tf32',
            store_inverse: bool = False, interpret: bool = False, num_warps: int | None = None):
  """q, k [B, T, H, Dk], v [B, T, H, Dv] (one dtype; T a multiple of `chunk`), beta [B·H, T] fp32 for the delta
  rule (None: scalar decay), G [B·H, T] fp32 (the log-gates' cumulative sums within each chunk), count [B, T] int32
  (documents started since the chunk's first position; None: one document). Returns the operands in the order
  `reference.state_pass` takes them, heads-first [B·H, T, ·] in the input dtype: (q̃, k̃, ũ, p, w) for the delta rule,
  (q̃, k̃, v, p) for scalar decay; with `store_inverse` (delta rule) also X [B·H, T, C] fp32 (each chunk's
  (I + A)⁻¹, for `gradients`). `num_warps` None: 4 (the H100's best for both)."""
  check_sizes(q, v, chunk)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  delta = beta is not None
  in_specs, heads_first, _, _ = _specs(h, chunk, dk, dv, delta, count is not None)
  dims = (dk, dk, dv, chunk) + ((dk,) if delta else ())
  out_shape = [jax.ShapeDtypeStruct((b * h, t, d), q.dtype) for d in dims]
  if store_inverse and delta:
    dims += (chunk,)
    out_shape.append(jax.ShapeDtypeStruct((b * h, t, chunk), jnp.float32))
  kernel = functools.partial(_kernel, scale=scale, segments=count is not None, delta=delta, precision=precision,
                             store_inverse=store_inverse and delta)
  num_warps = num_warps or 4
  return launch(kernel, (b * h, t // chunk), in_specs, [heads_first(d) for d in dims], out_shape, interpret,
               num_warps, 'delta_rule_prep' if delta else 'decay_prep')(*_inputs(q, k, v, beta, G, count))


@functools.partial(jax.jit, static_argnames=('chunk', 'scale', 'precision', 'interpret', 'num_warps'))
def gradients(q, k, v, beta, G, count, X, cotangents, *, chunk: int, scale: float, precision: str = 'tf32',
              interpret: bool = False, num_warps: tuple[int, int] = (4, 8)):
  """The vector-Jacobian product of `prepare`: from its inputs, the stored X (None for scalar decay) and the
  cotangents of its operands, returns (dq, dk, dv in the inputs' layout and dtype, dβ (None for scalar decay) and
  dG [B·H, T] fp32). The delta rule runs two kernels (`num_warps` each): the inverse's part, then the rest;
  scalar decay only the second."""
  check_sizes(q, v, chunk)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  delta = beta is not None
  segments = count is not None
  in_specs, heads_first, tokens, gates = _specs(h, chunk, dk, dv, delta, segments)
  grid = (b * h, t // chunk)
  args = _inputs(q, k, v, beta, G, count)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  second = functools.partial(_grad_kernel, scale=scale, segments=segments, delta=delta, precision=precision)
  if not delta:
    dqt, dkt, du, dp = cotangents
    dq, dk_, dv_, dG = launch(
        second, grid, in_specs[:2] + in_specs[3:] + [heads_first(d) for d in (dk, dk, chunk, dv)],
        [tokens(dk), tokens(dk), tokens(dv), gates], [like(q), like(k), like(v), f32(b * h, t)], interpret,
        num_warps[1], 'decay_prep_grad')(args[0], args[1], *args[3:], dqt, dkt, dp, du)
    return dq, dk_, dv_, None, dG
  dqt, dkt, du, dp, dw = cotangents
  first = functools.partial(_inverse_grad_kernel, segments=segments, precision=precision)
  dv_, ydv, dA = launch(
      first, grid, in_specs[1:] + [heads_first(d) for d in (chunk, dv, dk)],
      [tokens(dv), gates, heads_first(chunk)], [like(v), f32(b * h, t), f32(b * h, t, chunk)],
      interpret, num_warps[0], 'delta_rule_prep_grad_inverse')(*args[1:], X, du, dw)
  in_specs = ([in_specs[0], in_specs[1]] + in_specs[3:] + [heads_first(chunk), heads_first(chunk), gates]
              + [heads_first(d) for d in (dk, dk, chunk, dk)])
  dq, dk_, dbeta, dG = launch(second, grid, in_specs, [tokens(dk), tokens(dk), gates, gates],
                             [like(q), like(k), f32(b * h, t), f32(b * h, t)], interpret, num_warps[1],
                             'delta_rule_prep_grad')(args[0], args[1], *args[3:], X, dA, ydv, dqt, dkt, dp, dw)
  return dq, dk_, dv_, dbeta, dG
