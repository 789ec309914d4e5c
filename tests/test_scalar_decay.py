"""Chunked scalar-decay linear attention equals the token-by-token recurrence (SPEC.md tolerances)."""
import pytest

from longctx.ops.scalar_decay import chunk_scalar_decay, naive_scalar_decay, step
from tests.helpers.linear import (assert_chunked_matches_naive, assert_decoding_continues_the_chunked_state,
                                  assert_extreme_gates_stay_finite, inputs)

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
  chunked = lambda *a, **kw: chunk_scalar_decay(*a, chunk_size=32, **kw)
  assert_extreme_gates_stay_finite(naive_scalar_decay, chunked, NAMES, g_value)


def test_decoding_from_the_chunked_state_continues_the_sequence():
  assert_decoding_continues_the_chunked_state(chunk_scalar_decay, step, NAMES)
