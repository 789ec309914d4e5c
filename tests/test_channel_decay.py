"""Per-channel decay (GLA, HGRN2, HGRN): the parallel forms equal the token-by-token recurrences (SPEC.md tolerances)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.ops.channel_decay import (chunk_channel_decay, naive_channel_decay, naive_vector_decay,
                                       scan_vector_decay, step, vector_step)
from tests.helpers.linear import (assert_chunked_matches_naive, assert_decoding_continues_the_chunked_state,
                                  assert_extreme_gates_stay_finite, inputs, rel)

NAMES = ('q', 'k', 'v', 'g')


def chunked(chunk_size=64, sub_chunk=16):
  return lambda *a, **kw: chunk_channel_decay(*a, chunk_size=chunk_size, sub_chunk=sub_chunk, **kw)


@pytest.mark.parametrize('t,dk,dv', [(63, 64, 64), (500, 100, 100), (1000, 64, 32)])
def test_chunked_matches_recurrence_odd_lengths_and_head_dims(t, dk, dv):
  x = inputs(t, 1, t, 2, dk, dv, strength=1.0, channel_gates=True)
  assert_chunked_matches_naive(naive_channel_decay, chunked(), x, NAMES)


@pytest.mark.parametrize('strength', [0.01, 1.0, 10.0])
def test_chunked_matches_recurrence_across_gate_strengths_with_zeroed_gates(strength):
  x = inputs(int(strength * 100) + 7, 2, 130, 2, 32, 24, strength=strength, zero_gates=0.3, channel_gates=True)
  assert_chunked_matches_naive(naive_channel_decay, chunked(), x, NAMES)


def test_state_restarts_at_document_boundaries_with_uneven_sub_chunks():
  x = inputs(2, 2, 150, 2, 16, 16, strength=0.5, segments=True, channel_gates=True)
  assert_chunked_matches_naive(naive_channel_decay, chunked(chunk_size=40, sub_chunk=16), x, NAMES)


@pytest.mark.parametrize('g_value', [-1e-7, -30.0, -1e4])
def test_no_nan_with_gates_near_zero_or_very_negative(g_value):
  assert_extreme_gates_stay_finite(naive_channel_decay, chunked(32, 8), NAMES, g_value, channel_gates=True)


def test_decoding_from_the_chunked_state_continues_the_sequence():
  assert_decoding_continues_the_chunked_state(chunk_channel_decay, step, NAMES, channel_gates=True)


def _vector_inputs(seed, t, strength, segments=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  g = -strength * jax.nn.softplus(jax.random.normal(ks[1], (2, t, 48)))
  g = jnp.where(jax.random.uniform(ks[4], g.shape) < 0.2, 0.0, g)
  seg = jnp.sort(jax.random.randint(ks[3], (2, t), 1, 5), axis=1) if segments else None
  return jax.random.normal(ks[0], (2, t, 48)), g, jax.random.normal(ks[2], (2, 48)), seg


@pytest.mark.parametrize('t,strength,segments', [(63, 0.01, False), (500, 1.0, True), (1000, 10.0, False)])
def test_vector_scan_matches_recurrence_forward_and_backward(t, strength, segments):
  x, g, h0, seg = _vector_inputs(t, t, strength, segments)
  w = jax.random.normal(jax.random.PRNGKey(1), x.shape)

  def run(fn):
    def loss(x, g, h0):
      h, last = fn(x, g, initial_state=h0, segment_ids=seg)
      return jnp.sum(h * w) + jnp.sum(last * jnp.cos(h0)), (h, last)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, g, h0)

  (grads, (h, last)), (grads_ref, (h_ref, last_ref)) = run(scan_vector_decay), run(naive_vector_decay)
  assert rel(h, h_ref) < 0.005 and rel(last, last_ref) < 0.005
  for a, b, tol in zip(grads, grads_ref, (0.008, 0.02, 0.008)):
    assert np.isfinite(np.asarray(a)).all() and rel(a, b) < tol


def test_vector_step_continues_the_scan():
  x, g, h0, _ = _vector_inputs(5, 40, 1.0)
  full, _ = scan_vector_decay(x, g, initial_state=h0)
  _, state = scan_vector_decay(x[:, :30], g[:, :30], initial_state=h0)
  outs = []
  for t in range(30, 40):
    state, o = vector_step(state, x[:, t], g[:, t])
    outs.append(o)
  assert rel(jnp.stack(outs, 1), full[:, 30:]) < 1e-5
