"""Chunked gated delta rule equals the token-by-token recurrence (SPEC.md tolerances, relative RMS error)."""
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.ops.delta_rule import chunk_delta_rule, naive_delta_rule, step

from tests.helpers.linear import (assert_chunked_matches_naive, assert_decoding_continues_the_chunked_state,
                                  assert_extreme_gates_stay_finite, inputs, rel)

NAMES = ('q', 'k', 'v', 'beta', 'g')


def check(x, chunk_size=64):
  chunked = lambda *a, **kw: chunk_delta_rule(*a, chunk_size=chunk_size, **kw)
  assert_chunked_matches_naive(naive_delta_rule, chunked, x, NAMES)


@pytest.mark.parametrize('t,dk,dv', [(63, 64, 64), (500, 100, 100), (1000, 64, 32)])
def test_chunked_matches_recurrence_odd_lengths_and_head_dims(t, dk, dv):
  check(inputs(t, 1, t, 2, dk, dv, strength=1.0))


@pytest.mark.parametrize('strength', [0.01, 0.1, 1.0, 10.0])
def test_chunked_matches_recurrence_across_gate_strengths(strength):
  check(inputs(int(strength * 100), 2, 130, 2, 32, 24, strength=strength, zero_gates=0.3))


def test_deltanet_is_the_ungated_case():
  x = inputs(1, 1, 77, 2, 16, 16, strength=0.0)
  assert float(jnp.abs(x['g']).max()) == 0.0
  check(x, chunk_size=16)


@pytest.mark.parametrize('kernel', ['jax', 'pallas_interpret'])
def test_no_gate_is_the_zero_gate(kernel):
  # g=None (DeltaNet) takes its own path (zero cumulative gates, no cumulative sum of zeros): same outputs and
  # gradients as zero gates, on documents and an odd length.
  import jax
  x = inputs(4, 1, 45, 2, 16, 24, strength=0.0, segments=True)

  def run(g):
    def loss(q, k, v, beta):
      o, s = chunk_delta_rule(q, k, v, beta, g, initial_state=x['initial_state'], segment_ids=x['segment_ids'],
                              chunk_size=16, kernel=kernel)
      return jnp.sum(o * x['cotangent']) + jnp.sum(s), o
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x['q'], x['k'], x['v'], x['beta'])

  (grads, o), (grads_ref, o_ref) = run(None), run(x['g'])
  assert rel(o, o_ref) < 1e-6
  for a, b in zip(grads, grads_ref):
    assert np.isfinite(np.asarray(a)).all() and rel(a, b) < 1e-6


def test_state_restarts_at_document_boundaries():
  x = inputs(2, 2, 150, 2, 16, 16, strength=0.5, segments=True)
  check(x, chunk_size=32)
  # The second document of each row is computed as if it were a sequence of its own, from a zero state.
  seg = np.asarray(x['segment_ids'][0])
  start = int(np.argmax(seg != seg[0]))
  stop = int(np.searchsorted(seg, seg[start], side='right'))
  whole, _ = chunk_delta_rule(x['q'], x['k'], x['v'], x['beta'], x['g'], initial_state=x['initial_state'],
                              segment_ids=x['segment_ids'], chunk_size=32)
  alone, _ = naive_delta_rule(*(x[n][:1, start:stop] for n in ('q', 'k', 'v', 'beta', 'g')))
  assert rel(whole[0, start:stop], alone[0]) < 1e-5


@pytest.mark.parametrize('g_value', [-1e-7, -30.0, -1e4])
def test_no_nan_with_gates_near_zero_or_very_negative(g_value):
  chunked = lambda *a, **kw: chunk_delta_rule(*a, chunk_size=32, **kw)
  assert_extreme_gates_stay_finite(naive_delta_rule, chunked, NAMES, g_value)


def test_decoding_from_the_chunked_state_continues_the_sequence():
  assert_decoding_continues_the_chunked_state(chunk_delta_rule, step, NAMES)


def test_bf16_inputs_keep_fp32_states():
  x = inputs(5, 1, 64, 2, 32, 32, strength=1.0)
  o, s = chunk_delta_rule(*(x[n].astype(jnp.bfloat16) for n in ('q', 'k', 'v', 'beta', 'g')), chunk_size=32)
  ref, ref_s = naive_delta_rule(x['q'], x['k'], x['v'], x['beta'], x['g'])
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert rel(np.asarray(o, np.float32), ref) < 3e-2 and rel(s, ref_s) < 3e-2


@pytest.mark.parametrize('c', [37, 64])   # the row loop; 16-blocks joined by matmuls
def test_unit_lower_inverse_and_its_gradient(c):
  import jax
  from longctx.ops.triangular import unit_lower_inverse
  a = np.tril(np.random.default_rng(c).normal(size=(3, c, c)) * 0.3, -1)
  w = np.random.default_rng(1).normal(size=(3, c, c))
  inv = np.linalg.inv(np.eye(c) + a)
  np.testing.assert_allclose(unit_lower_inverse(jnp.asarray(a)), inv, rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(unit_lower_inverse(x) * w))(jnp.asarray(a))
  expected = np.tril(-np.swapaxes(inv, -1, -2) @ w @ np.swapaxes(inv, -1, -2), -1)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)
