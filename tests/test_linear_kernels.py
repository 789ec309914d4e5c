"""The Pallas chunk state pass (kernels_pallas.linear), run in interpret mode: against its jax reference on raw
operands, and inside each chunked family against the token-by-token recurrence (SPEC.md tolerances)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.linear import reference_state_pass, state_pass, supported
from longctx.ops import state_pass as dispatch
from longctx.ops.channel_decay import chunk_channel_decay
from longctx.ops.channel_decay.naive import channel_decay as naive_channel_decay
from longctx.ops.delta_rule import chunk_delta_rule, naive_delta_rule
from longctx.ops.scalar_decay import chunk_scalar_decay, naive_scalar_decay

from tests.helpers.linear import (GATE_TOL, OUT_TOL, QKV_TOL, STATE_TOL, assert_chunked_matches_naive, inputs,
                                  outputs_and_grads, rel)


def operands(seed, bh, n, c, dk, dv, delta):
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  t = n * c
  x = dict(q=jax.random.normal(ks[0], (bh, t, dk)), k=0.3 * jax.random.normal(ks[1], (bh, t, dk)),
           u=jax.random.normal(ks[2], (bh, t, dv)), p=jnp.tril(jax.random.normal(ks[3], (bh, n, c, c))).reshape(bh, t, c),
           a=jax.random.uniform(ks[4], (bh, dk, n), minval=0.3, maxval=1.0),
           h0=jax.random.normal(ks[5], (bh, dk, dv)))
  if delta:
    x['w'] = 0.1 * jax.random.normal(ks[6], (bh, t, dk))
  cot = (jax.random.normal(ks[7], (bh, t, dv)), jax.random.normal(ks[8], (bh, dk, dv)))
  return x, cot


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.parametrize('delta,heads', [(False, 0), (True, 0), (True, 3)])
def test_kernel_equals_reference_forward_and_backward(delta, heads, backend):
  # Three chunks; on the GPU kernel two value blocks. With heads, O (and its gradient) in the tokens' layout.
  x, cot = operands(int(delta) + heads, bh=6, n=3, c=16, dk=32, dv=64, delta=delta)
  names = tuple(x)
  tokens = lambda o: jnp.swapaxes(o.reshape(6 // heads, heads, 48, 64), 1, 2) if heads else o
  kern = lambda *a: state_pass(*a, chunk=16, block_v=32, interpret=True, backend=backend, heads=heads)
  ref = lambda *a: (lambda o, s: (tokens(o), s))(*reference_state_pass(*a, chunk=16))
  cot = (tokens(cot[0]), cot[1])

  def run(fn):
    loss = lambda *a: sum(jnp.sum(o * c) for o, c in zip(fn(*a), cot))
    return fn(*x.values()), jax.grad(loss, argnums=tuple(range(len(names))))(*x.values())

  (o, s), grads = run(kern)
  (o_ref, s_ref), grads_ref = run(ref)
  assert o.shape == o_ref.shape
  for arr in (o, s, *grads):
    assert np.isfinite(np.asarray(arr)).all()
  assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert rel(g, g_ref) < 1e-5, name


def chunked_with_kernel(form, **kw):
  return lambda *a, **k: form(*a, kernel='pallas_interpret', **kw, **k)


def test_delta_rule_through_the_kernel_matches_the_recurrence():
  # Head dim 24 is padded to 32 inside; documents and a nonzero initial state.
  x = inputs(11, 1, 75, 2, 24, 16, strength=1.0, zero_gates=0.3, segments=True)
  assert_chunked_matches_naive(naive_delta_rule, chunked_with_kernel(chunk_delta_rule, chunk_size=16), x,
                               ('q', 'k', 'v', 'beta', 'g'))


def test_scalar_decay_through_the_kernel_matches_the_recurrence():
  x = inputs(12, 2, 50, 2, 16, 20, strength=0.5, segments=True)
  assert_chunked_matches_naive(naive_scalar_decay, chunked_with_kernel(chunk_scalar_decay, chunk_size=16), x,
                               ('q', 'k', 'v', 'g'))


def test_channel_decay_through_the_kernel_matches_the_recurrence():
  x = inputs(13, 1, 40, 2, 16, 16, strength=0.3, channel_gates=True)
  assert_chunked_matches_naive(naive_channel_decay,
                               chunked_with_kernel(chunk_channel_decay, chunk_size=16, sub_chunk=8), x,
                               ('q', 'k', 'v', 'g'))


def test_dispatch_choices_and_refusals():
  choose = functools.partial(dispatch.choose, chunk=64, dk=128, dv=128)
  assert choose('auto', platform='gpu') == 'pallas'
  assert choose('auto', platform='cpu') == 'jax'
  assert choose('auto', platform='tpu') == 'pallas'
  assert choose('jax', platform='gpu') == 'jax'
  assert dispatch.choose('auto', platform='gpu', chunk=48, dk=128, dv=128) == 'jax'   # not a power of two
  assert dispatch.choose('auto', platform='gpu', chunk=64, dk=100, dv=100) == 'pallas'  # padded to 128
  with pytest.raises(ValueError, match='needs a GPU or TPU'):
    choose('pallas', platform='cpu')
  with pytest.raises(ValueError, match='chunk size 48'):
    dispatch.choose('pallas_interpret', platform='cpu', chunk=48, dk=64, dv=64)
  with pytest.raises(ValueError, match='model.linear.kernel'):
    choose('triton', platform='gpu')
  assert supported(64, 128, 128) == (True, '')
  assert not supported(8, 128, 128)[0]


@pytest.mark.parametrize('c,scale', [(48, 0.3), (64, 1.0)])
def test_unit_lower_inverse_kernel_equals_the_inverse_and_keeps_the_gradient(c, scale):
  # Entries on and above the diagonal are not zero (they must be ignored); scale 1 with all-equal entries is the
  # delta rule on a repeated key (β = 1), whose inverse is small while the powers of A are not.
  from kernels_pallas.linear.inverse import unit_lower_inverse as kernel_inverse
  from longctx.ops import triangular
  rng = np.random.default_rng(c)
  a = rng.normal(size=(2, 3, c, c)).astype(np.float32) * scale
  if scale == 1.0:
    a[1] = 1.0
  exact = np.linalg.inv(np.eye(c) + np.tril(a.astype(np.float64), -1))
  out = np.asarray(kernel_inverse(jnp.asarray(a), interpret=True))
  assert np.isfinite(out).all()
  assert rel(out, exact) < 1e-5
  w = jnp.asarray(rng.normal(size=a.shape).astype(np.float32))
  grad = lambda kernel: jax.grad(lambda x: jnp.sum(triangular.unit_lower_inverse(x, kernel) * w))(jnp.asarray(a))
  assert rel(grad('pallas_interpret'), grad('jax')) < 1e-5


def test_unit_lower_inverse_dispatch():
  from longctx.ops import triangular
  assert triangular.choose('auto', 64, 'gpu') == 'pallas'
  assert triangular.choose('pallas', 64, 'tpu') == 'jax'        # the TPU state pass has no inverse kernel
  assert triangular.choose('auto', 64, 'cpu') == 'jax'
  assert triangular.choose('auto', 40, 'gpu') == 'jax'          # not a multiple of 16
  assert triangular.choose('pallas_interpret', 32, 'cpu') == 'pallas_interpret'
  assert triangular.choose('jax', 64, 'gpu') == 'jax'
  with pytest.raises(ValueError, match='unit_lower_inverse kernel .triton.'):
    triangular.unit_lower_inverse(jnp.zeros((16, 16)), 'triton')


@pytest.mark.parametrize('family,segments,dk,dv,strength', [
    ('delta_rule', False, 64, 32, 1.0), ('delta_rule', True, 16, 128, 10.0),
    ('scalar_decay', False, 32, 64, 1.0), ('scalar_decay', True, 128, 16, 10.0),
    ('channel_decay', False, 32, 16, 1.0), ('channel_decay', True, 24, 32, 10.0)])
def test_prep_kernels_equal_the_jax_operands_forward_and_backward(family, segments, dk, dv, strength):
  # The prep kernel and its gradient kernels against the jax form, on odd lengths padded to whole chunks (and an
  # odd key head dim, padded to a power of two), documents, random zeroed gates and strong ones; gradients reach g
  # through the cumulative sum and the padding.
  from longctx.ops import kernel_operands
  from longctx.ops.channel_decay import chunk as cd
  from longctx.ops.delta_rule import chunk as dr
  from longctx.ops.scalar_decay import chunk as sd
  delta = family == 'delta_rule'
  c = 32 if family != 'channel_decay' else 64
  x = inputs(21 + segments + 2 * delta, 2, 77, 3, dk, dv, strength=strength, zero_gates=0.3, segments=segments,
             channel_gates=family == 'channel_decay')
  names = ('q', 'k', 'v') + (('beta',) if delta else ()) + ('g',)
  operand_names = ('q', 'k', 'u', 'p') + (('w',) if delta else ())
  pk = dispatch.padded(dk)
  dims = (pk, pk, dv, c, pk)[:len(operand_names)]
  t = -(-77 // c) * c
  cot = [jax.random.normal(jax.random.PRNGKey(i), (6, t, d)) for i, d in enumerate(dims)]

  def run(form):
    def f(*a):
      beta = a[3] if delta else None
      args = kernel_operands.prep_inputs(a[0], a[1], a[2], beta, a[-1], x['segment_ids'], c)
      return form(*args, kernel_operands.Options(c, 0.3, 'ieee', True))
    out, vjp = jax.vjp(f, *(x[n] for n in names))
    return out, vjp(tuple(y.astype(o.dtype) for y, o in zip(cot, out)))

  reference = {'delta_rule': dr, 'scalar_decay': sd, 'channel_decay': cd}[family]._jax_operands
  (got, dgot), (want, dwant) = run(kernel_operands.operands), run(reference)
  assert len(got) == len(operand_names)
  # Per-channel decay: strength 1 keeps every sub-chunk's gate fall under channel_prep.MODERATE (diagonal blocks as
  # matmuls), strength 10 does not (element by element). The kernel forms the gates' gradient as Q ⊙ dQ − K ⊙ dK,
  # a difference of larger terms: fp32 rounding there reaches ~1e-5.
  tol = lambda name: 5e-5 if family == 'channel_decay' and name == 'dg' else 1e-5
  for name, a, b in zip(operand_names + tuple('d' + n for n in names), got + dgot, want + dwant):
    assert np.isfinite(np.asarray(a)).all(), name
    assert rel(a, b) < tol(name), name


def bf16_case(family):
  """(naive form, chunked form through the kernels, inputs, differentiated inputs) of one family."""
  if family == 'delta_rule':
    return (naive_delta_rule, chunked_with_kernel(chunk_delta_rule, chunk_size=32),
            inputs(31, 2, 150, 2, 64, 64, strength=1.0, zero_gates=0.2, segments=True), ('q', 'k', 'v', 'beta', 'g'))
  if family == 'scalar_decay':
    return (naive_scalar_decay, chunked_with_kernel(chunk_scalar_decay, chunk_size=32),
            inputs(32, 2, 150, 2, 32, 32, strength=0.5, zero_gates=0.2, segments=True), ('q', 'k', 'v', 'g'))
  return (naive_channel_decay, chunked_with_kernel(chunk_channel_decay, chunk_size=32, sub_chunk=16),
          inputs(33, 1, 150, 2, 32, 32, strength=0.3, channel_gates=True), ('q', 'k', 'v', 'g'))


@pytest.mark.parametrize('family', ['delta_rule', 'scalar_decay', 'channel_decay'])
def test_bf16_through_the_kernels_matches_the_recurrence(family):
  # bf16 inputs: the kernels multiply in bf16 (fp32 accumulation, fp32 state), the operands between them and what
  # the backward sweeps keep are bf16; still within SPEC.md's tolerances of the fp32 recurrence on the same inputs.
  naive, chunked, x, names = bf16_case(family)
  low = ('q', 'k', 'v', 'beta')
  bf = {n: (x[n].astype(jnp.bfloat16) if n in low else x[n]) for n in x}
  exact = {n: (bf[n].astype(jnp.float32) if n in low else x[n]) for n in x}
  o_ref, s_ref, g_ref = outputs_and_grads(naive, exact, names)
  o, s, g = outputs_and_grads(chunked, bf, names)
  assert o.dtype == jnp.bfloat16
  assert rel(o, o_ref) < OUT_TOL and rel(s, s_ref) < STATE_TOL
  for name, a, b in zip(names + ('initial_state',), g, g_ref):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel(a, b) < (GATE_TOL if name in ('beta', 'g') else QKV_TOL), name


def test_prep_kernel_sizes():
  from kernels_pallas.linear import prep
  assert prep.supported(64, 128, 128) == (True, '')
  assert 'chunk size 256' in prep.supported(256, 128, 128)[1]     # the state pass takes it; the prep does not
  assert 'value head dim 96' in prep.supported(64, 128, 96)[1]
  with pytest.raises(ValueError, match='not a multiple of the chunk'):
    prep.prepare(*(jnp.ones((1, 40, 1, 16)),) * 3, jnp.ones((1, 40)), jnp.ones((1, 40)), chunk=16, scale=1.0,
                 interpret=True)
