"""Chunked scalar-decay linear attention equals the token-by-token recurrence (SPEC.md tolerances)."""
import jax.numpy as jnp
import pytest

from longctx.ops.scalar_decay import chunk_scalar_decay, naive_scalar_decay, step
from tests.helpers.linear import assert_chunked_matches_naive, inputs, rel

NAMES = ('q', 'k', 'v', 'g')


def check(x, chunk_size=64):
  chunked = lambda *a, **kw: chunk_scalar_decay(*a, chunk_size=chunk_size, **kw)
  assert_chunked_matches_naive(naive_scalar_decay, chunked, x, NAMES)


@pytest.mark.parametrize('t,dk,dv', [(63, 64, 64), (500, 100, 100), (1000, 64, 32)])
def test_chunked_matches_recurrence_odd_lengths_and_head_dims(t, dk, dv):
  check(inputs(t, 1, t, 2, dk, dv, strength=1.0))


@pytest.mark.parametrize('strength', [0.01, 1.0, 10.0])
def test_chunked_matches_recurrence_across_gate_strengths_with_zeroed_gates(strength):
  check(inputs(int(strength * 100) + 7, 2, 130, 2, 32, 24, strength=strength, zero_gates=0.3))


def test_state_restarts_at_document_boundaries():
  check(inputs(2, 2, 150, 2, 16, 16, strength=0.5, segments=True), chunk_size=32)


@pytest.mark.parametrize('g_value', [-1e-7, -30.0, -1e4])
def test_no_nan_with_gates_near_zero_or_very_negative(g_value):
  x = inputs(3, 1, 96, 2, 16, 16, strength=1.0)
  x['g'] = jnp.full_like(x['g'], g_value)
  check(x, chunk_size=32)


def test_decoding_from_the_chunked_state_continues_the_sequence():
  x = inputs(4, 2, 90, 2, 16, 24, strength=1.0)
  full, full_state = chunk_scalar_decay(x['q'], x['k'], x['v'], x['g'], initial_state=x['initial_state'])
  _, state = chunk_scalar_decay(*(x[n][:, :70] for n in NAMES), initial_state=x['initial_state'])
  outs = []
  for t in range(70, 90):
    state, o = step(state, *(x[n][:, t] for n in NAMES), scale=16 ** -0.5)
    outs.append(o)
  assert rel(jnp.stack(outs, axis=1), full[:, 70:]) < 1e-5 and rel(state, full_state) < 1e-5
