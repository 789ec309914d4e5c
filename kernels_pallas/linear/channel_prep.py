"""Pallas kernels for what the per-channel decay form (GLA, HGRN2) computes before its state pass, all chunks at
once, and the gradient of it.

For one chunk of C tokens of one (batch, head), with G the log-gates' cumulative sums within the chunk, one per key
channel (G ≤ 0 and falling), and the document masks of `prep`:
    P_ij = s Σ_d q_id k_jd e^{G_id − G_jd}   (j ≤ i, one document; 0 elsewhere)
    q̃ = s e^{G} ⊙ Q (where the incoming state reaches i),   k̃ = e^{G_C − G} ⊙ K (where i's update reaches the end)
and V copied heads-first: the operands of `reference.state_pass` with a per-channel state decay e^{G_C} (the caller
forms that one from the gates' sums). P is no plain matmul; it is built in sub-chunks of 16 tokens as in GLA:
  * a query sub-chunk a against an earlier key sub-chunk b: both factors relative to G at a's start, r_a, so that
    P_ab = s (Q_a ⊙ e^{G_a − r_a}) (K_b ⊙ e^{r_a − G_b})ᵀ is a matmul with every exponent ≤ 0;
  * a sub-chunk against itself: relative to its start, (Q_a ⊙ e^{L_a}) (K_a ⊙ e^{−L_a})ᵀ with L_a = G_a − r_a, a
    matmul too where the gates fall by at most MODERATE within every sub-chunk of the chunk (e^{−L} stays below
    e^{MODERATE}; measured gates of trained GLA layers stay far inside); otherwise column by column, e^{G_i − G_j}
    element by element for j ≤ i (a branch per chunk, taken for extreme gates only: the loop is several times
    slower in the Triton lowering).
The gradient kernel uses that q ⊙ ∂/∂q − k ⊙ ∂/∂k of these terms is their gradient with respect to G (each enters
through e^{G_i − G_j} with q_i and k_j), so dG = Q ⊙ dQ − K ⊙ dK, plus Σ_i k̃_i ⊙ dk̃_i at the chunk's end, and the
gates' gradient is its reversed cumulative sum.

One program per (batch·head, chunk); Q, K, V and the gates are read in the tokens' layout [B, T, H, ·] and the
cumulative sums are taken in the program, so nothing heads-first or fp32 is written for the inputs. Portable Pallas
(refs, static slices, dots, loops) through the Triton lowering on GPU; the tests run it on CPU in interpret mode
against longctx.ops.channel_decay.chunk. Shapes: C a power of two from 16 to 128, head dims powers of two ≥ 16.
Launch defaults from the H100 (B4 T8192 H16 D128 bf16, chunk 64, 2026-11-24): `prepare` 1.23 ms at 4 warps (2.23 at
2, 1.34 at 8), `gradients` 2.89 ms at 16 (3.08 at 8, 4.52 at 4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.linear.prep import check_sizes, launch
from kernels_pallas.linear.steps import dot

SUB = 16
MODERATE = 40.0   # the largest fall of a log-gate within one sub-chunk that the diagonal blocks take as a matmul


def _rows(a):
  return pl.ds(a * SUB, SUB)


class _Chunk:
  """The gates of one chunk in sub-chunks of 16 rows: the sums within each sub-chunk L_a (G − r_a, short sums,
  so differences of them stay exact), the reference r_a (G before sub-chunk a), G at the chunk's end and the
  document masks. G itself is formed where needed, not kept (the program holds these values in registers)."""

  def __init__(self, g_ref, count_ref):
    c, dk = g_ref.shape
    self.n = c // SUB
    self.g_ref, self.count_ref = g_ref, count_ref
    self.ref, self.L = [], []
    r = jnp.zeros((1, dk), jnp.float32)
    fall = jnp.float32(0.0)   # the largest fall of a gate within one sub-chunk (−L at its last row), any channel
    for a in range(self.n):
      g = g_ref[_rows(a), :].astype(jnp.float32)
      self.ref.append(r)
      self.L.append(jnp.cumsum(g, axis=0))
      total = jnp.sum(g, axis=0, keepdims=True)
      fall = jnp.maximum(fall, -jnp.min(total))
      r = r + total
    self.end_G = r
    self.moderate = fall <= MODERATE
    self.last = None if count_ref is None else jnp.max(count_ref[...])
    self.row = jax.lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    self.col = jax.lax.broadcasted_iota(jnp.int32, (1, SUB), 1)
    self.causal = jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1) <= jax.lax.broadcasted_iota(
        jnp.int32, (SUB, SUB), 0)

  def same(self, a, b, x):
    """x [16, 16] zeroed where rows of sub-chunk a and columns of sub-chunk b lie in different documents."""
    if self.count_ref is None:
      return x
    return jnp.where(self.count_ref[_rows(a)][:, None] == self.count_ref[_rows(b)][None, :], x, 0.0)

  def start(self, a):
    """q̃'s factor for the rows of sub-chunk a (without the scale): e^{G} where the incoming state reaches them."""
    gamma = jnp.exp(self.ref[a] + self.L[a])
    return gamma if self.count_ref is None else jnp.where(self.count_ref[_rows(a)][:, None] == 0, gamma, 0.0)

  def end(self, a):
    """k̃'s factor for the rows of sub-chunk a: e^{G_C − G} where their updates reach the chunk's last state."""
    end = jnp.exp((self.end_G - self.ref[a]) - self.L[a])
    return end if self.count_ref is None else jnp.where(self.count_ref[_rows(a)][:, None] == self.last, end, 0.0)

  def carried(self, a, b):
    """e^{r_a − G_b} [16, Dk]: the decay from the rows of an earlier sub-chunk b to the start of sub-chunk a."""
    return jnp.exp((self.ref[a] - self.ref[b]) - self.L[b])

  def rows(self, a, body, init):
    """Runs body(j, L_j [1, Dk], carry) -> carry over the rows j of sub-chunk a, L_j summed along the way."""
    def step(j, state):
      L_j, carry = state
      L_j = L_j + self.g_ref[pl.ds(a * SUB + j, 1), :].astype(jnp.float32)
      return L_j, body(j, L_j, carry)
    return jax.lax.fori_loop(0, SUB, step, (jnp.zeros_like(self.ref[a]), init))[1]


def _kernel(*refs, scale, segments, precision):
  q_ref, k_ref, v_ref, g_ref = refs[:4]
  count_ref = refs[4] if segments else None
  qt_ref, kt_ref, u_ref, p_ref = refs[4 + segments:]
  f32 = jnp.float32
  ch = _Chunk(g_ref, count_ref)
  for a in range(ch.n):
    qa = q_ref[_rows(a), :].astype(f32)
    q_hat = qa * jnp.exp(ch.L[a])
    for b in range(ch.n):
      if b < a:
        k_hat = k_ref[_rows(b), :].astype(f32) * ch.carried(a, b)
        p_ref[_rows(a), _rows(b)] = ch.same(a, b, scale * dot(q_hat, k_hat, precision, trans_y=True)).astype(
            p_ref.dtype)
      elif b > a:
        p_ref[_rows(a), _rows(b)] = jnp.zeros((SUB, SUB), p_ref.dtype)

    def as_matmul(a=a, qa=qa, q_hat=q_hat):
      k_hat = k_ref[_rows(a), :].astype(f32) * jnp.exp(-ch.L[a])
      return jnp.where(ch.causal, dot(q_hat, k_hat, precision, trans_y=True), 0.0)

    def by_column(a=a, qa=qa):
      def column(j, L_j, block):   # column j: Σ_d q_id k_jd e^{G_id − G_jd} for rows i ≥ j
        k_j = k_ref[pl.ds(a * SUB + j, 1), :].astype(f32)
        decay = jnp.exp(jnp.where(ch.row >= j, ch.L[a] - L_j, -jnp.inf))
        col = jnp.sum(qa * k_j * decay, axis=1, keepdims=True)
        return block + jnp.where(ch.col == j, col, 0.0)
      return ch.rows(a, column, jnp.zeros((SUB, SUB), f32))

    block = jax.lax.cond(ch.moderate, as_matmul, by_column)
    p_ref[_rows(a), _rows(a)] = ch.same(a, a, scale * block).astype(p_ref.dtype)
    qt_ref[_rows(a), :] = (scale * ch.start(a) * qa).astype(qt_ref.dtype)
    kt_ref[_rows(a), :] = (ch.end(a) * k_ref[_rows(a), :].astype(f32)).astype(kt_ref.dtype)
  u_ref[...] = v_ref[...].astype(u_ref.dtype)


def _grad_kernel(*refs, scale, segments, precision):
  """dQ, dK, dV and the gates' gradient of one chunk from the cotangents of (q̃, k̃, v, P):
      dQ_i = s Σ_j dP_ij K_j ⊙ e^{G_i − G_j} + s e^{G_i} ⊙ dq̃_i,
      dK_j = s Σ_i dP_ij Q_i ⊙ e^{G_i − G_j} + e^{G_C − G_j} ⊙ dk̃_j
      dG = Q ⊙ dQ − K ⊙ dK (+ Σ k̃ ⊙ dk̃ at the last row),   dg_j = Σ_{i ≥ j} dG_i,
  the sums over j ≤ i in one document. Sub-chunks from the last: each one's dQ and dK are complete when it is
  reached (a block between two sub-chunks is formed once for each side), so only the running sum of dG is
  carried; the diagonal blocks as in the forward (matmuls for moderate gates; else column by column for dQ and
  row by row for dK)."""
  q_ref, k_ref, g_ref = refs[:3]
  count_ref = refs[3] if segments else None
  dqt_ref, dkt_ref, dp_ref, du_ref, dq_ref, dk_ref, dv_ref, dg_ref = refs[3 + segments:]
  f32 = jnp.float32
  exact = 'ieee' if precision == 'ieee' else 'tf32'
  ch = _Chunk(g_ref, count_ref)
  n = ch.n
  load = lambda ref, a: ref[_rows(a), :].astype(f32)
  inner = lambda a: jnp.exp(ch.L[a])                       # e^{G − r_a}, rows of sub-chunk a
  dA = lambda a, b: ch.same(a, b, scale * dp_ref[_rows(a), _rows(b)].astype(f32))
  later = jnp.zeros_like(ch.end_G)                           # Σ k̃ ⊙ dk̃: G_C sums every gate of the chunk
  for a in range(n):
    later += jnp.sum(ch.end(a) * load(dkt_ref, a) * load(k_ref, a), axis=0, keepdims=True)
  for a in reversed(range(n)):
    qa, ka = load(q_ref, a), load(k_ref, a)
    dq_hat = jnp.zeros_like(qa)
    for b in range(a):
      dq_hat += dot(dA(a, b), load(k_ref, b) * ch.carried(a, b), exact)
    dk = jnp.zeros_like(ka)
    for b in range(a + 1, n):
      dk += dot(dA(b, a), load(q_ref, b) * inner(b), exact, trans_x=True) * ch.carried(b, a)

    dA_aa = jnp.where(ch.causal, dA(a, a), 0.0)

    def as_matmul(a=a, qa=qa, ka=ka, dA_aa=dA_aa):
      inner_a = jnp.exp(ch.L[a])
      outer_a = jnp.exp(-ch.L[a])
      return (dot(dA_aa, ka * outer_a, exact) * inner_a,
              dot(dA_aa, qa * inner_a, exact, trans_x=True) * outer_a)

    def by_element(a=a, dA_aa=dA_aa):
      def by_column(j, L_j, dq):   # dQ_i += dA_ij K_j ⊙ e^{G_i − G_j}, i ≥ j
        dA_j = jnp.sum(jnp.where(ch.col == j, dA_aa, 0.0), axis=1, keepdims=True)     # [16, 1]
        decay = jnp.exp(jnp.where(ch.row >= j, ch.L[a] - L_j, -jnp.inf))
        return dq + dA_j * k_ref[pl.ds(a * SUB + j, 1), :].astype(f32) * decay

      def by_row(i, L_i, dk):      # dK_j += dA_ij Q_i ⊙ e^{G_i − G_j}, j ≤ i
        dA_i = jnp.sum(jnp.where(ch.row == i, dA_aa, 0.0), axis=0, keepdims=True).reshape(SUB, 1)      # [16, 1]
        decay = jnp.exp(jnp.where(ch.row <= i, L_i - ch.L[a], -jnp.inf))
        return dk + dA_i * q_ref[pl.ds(a * SUB + i, 1), :].astype(f32) * decay

      zeros = jnp.zeros((SUB, ch.end_G.shape[-1]), f32)
      return ch.rows(a, by_column, zeros), ch.rows(a, by_row, zeros)

    dq_diag, dk_diag = jax.lax.cond(ch.moderate, as_matmul, by_element)
    dq = dq_hat * inner(a) + dq_diag + scale * ch.start(a) * load(dqt_ref, a)
    dk = dk + dk_diag + ch.end(a) * load(dkt_ref, a)
    dq_ref[_rows(a), :] = dq.astype(dq_ref.dtype)
    dk_ref[_rows(a), :] = dk.astype(dk_ref.dtype)
    dG = qa * dq - ka * dk
    total = jnp.sum(dG, axis=0, keepdims=True)
    dg_ref[_rows(a), :] = (later + total - jnp.cumsum(dG, axis=0) + dG).astype(dg_ref.dtype)
    later += total
  dv_ref[...] = du_ref[...].astype(dv_ref.dtype)


def _specs(h, chunk):
  """Spec makers: tokens [B, T, H, d], heads-first [B·H, T, d], reset counts [B, T]."""
  tokens = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, n: (i // h, n, i % h, 0))
  heads_first = lambda d: pl.BlockSpec((None, chunk, d), lambda i, n: (i, n, 0))
  counts = pl.BlockSpec((None, chunk), lambda i, n: (i // h, n))
  return tokens, heads_first, counts


@functools.partial(jax.jit, static_argnames=('chunk', 'scale', 'precision', 'interpret', 'num_warps'))
def prepare(q, k, v, g, count=None, *, chunk: int, scale: float, precision: str = 'tf32', interpret: bool = False,
            num_warps: int = 4):
  """q, k [B, T, H, Dk], v [B, T, H, Dv] (one dtype; T a multiple of `chunk`), g [B, T, H, Dk] (log-gates ≤ 0),
  count [B, T] int32 (documents started since the chunk's first position; None: one document). Returns
  (q̃, k̃, v, P) heads-first [B·H, T, ·] in the input dtype, the operands `reference.state_pass` takes."""
  check_sizes(q, v, chunk)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  tokens, heads_first, counts = _specs(h, chunk)
  in_specs = [tokens(dk), tokens(dk), tokens(dv), tokens(dk)] + ([] if count is None else [counts])
  dims = (dk, dk, dv, chunk)
  kernel = functools.partial(_kernel, scale=scale, segments=count is not None, precision=precision)
  args = [q, k, v, g] + ([] if count is None else [count.astype(jnp.int32)])
  return launch(kernel, (b * h, t // chunk), in_specs, [heads_first(d) for d in dims],
                [jax.ShapeDtypeStruct((b * h, t, d), q.dtype) for d in dims], interpret, num_warps,
                'channel_decay_prep')(*args)


@functools.partial(jax.jit, static_argnames=('chunk', 'scale', 'precision', 'interpret', 'num_warps'))
def gradients(q, k, v, g, count, cotangents, *, chunk: int, scale: float, precision: str = 'tf32',
              interpret: bool = False, num_warps: int = 16):
  """The vector-Jacobian product of `prepare`: from its inputs and the cotangents of (q̃, k̃, v, P), returns
  (dq, dk, dv in the inputs' layout and dtype, dg in g's layout and dtype)."""
  check_sizes(q, v, chunk)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  tokens, heads_first, counts = _specs(h, chunk)
  dqt, dkt, du, dp = cotangents
  in_specs = ([tokens(dk), tokens(dk), tokens(dk)] + ([] if count is None else [counts])
              + [heads_first(d) for d in (dk, dk, chunk, dv)])
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  kernel = functools.partial(_grad_kernel, scale=scale, segments=count is not None, precision=precision)
  args = [q, k, g] + ([] if count is None else [count.astype(jnp.int32)]) + [dqt, dkt, dp, du]
  return launch(kernel, (b * h, t // chunk), in_specs, [tokens(dk), tokens(dk), tokens(dv), tokens(dk)],
                [like(q), like(k), like(v), like(g)], interpret, num_warps, 'channel_decay_prep_grad')(*args)
