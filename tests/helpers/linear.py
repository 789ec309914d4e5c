"""Shared checks for linear-attention families: the chunked form against the naive recurrence, SPEC.md tolerances."""
import jax
import jax.numpy as jnp
import numpy as np

OUT_TOL, STATE_TOL, QKV_TOL, GATE_TOL = 0.005, 0.005, 0.008, 0.02
GATE_ARGS = ('beta', 'g')


def rel(a, b, floor=1e-30):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), floor)


def inputs(seed, b, t, h, dk, dv, strength, zero_gates=0.0, segments=False, channel_gates=False):
  """Fresh random inputs: L2-normalised keys, β in (0, 1), log-gates −strength·softplus(N(0, 1)), some zeroed;
  one gate per head [B, T, H], or per key channel [B, T, H, Dk] with `channel_gates`."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  k = jax.random.normal(ks[1], (b, t, h, dk))
  gate_shape = (b, t, h, dk) if channel_gates else (b, t, h)
  g = -strength * jax.nn.softplus(jax.random.normal(ks[4], gate_shape))
  g = jnp.where(jax.random.uniform(ks[7], gate_shape) < zero_gates, 0.0, g)
  return dict(
      q=jax.random.normal(ks[0], (b, t, h, dk)),
      k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
      v=jax.random.normal(ks[2], (b, t, h, dv)),
      beta=jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h))),
      g=g,
      initial_state=jax.random.normal(ks[5], (b, h, dk, dv)),
      segment_ids=jnp.sort(jax.random.randint(ks[6], (b, t), 1, 6), axis=1) if segments else None,
      cotangent=jax.random.normal(ks[8], (b, t, h, dv)))


def outputs_and_grads(fn, x, names):
  def loss(*args):
    o, s = fn(*args[:-1], initial_state=args[-1], segment_ids=x['segment_ids'])
    return jnp.sum(o * x['cotangent']) + jnp.sum(s * jnp.cos(args[-1])), (o, s)
  args = tuple(x[n] for n in names) + (x['initial_state'],)
  grads, (o, s) = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
  return o, s, grads


def assert_chunked_matches_naive(naive_fn, chunk_fn, x, names):
  """Outputs, final state, and gradients of every input named and of the initial state."""
  o_ref, s_ref, g_ref = outputs_and_grads(naive_fn, x, names)
  o, s, g = outputs_and_grads(chunk_fn, x, names)
  for arr in (o, s, *g):
    assert not np.isnan(np.asarray(arr)).any()
  assert rel(o, o_ref) < OUT_TOL and rel(s, s_ref) < STATE_TOL
  # Under very strong decay a gate's gradient is ~e^g, far below the rounding of everything else: judge gate
  # gradients on the scale of the q gradient.
  floor = 1e-6 * np.linalg.norm(np.asarray(g_ref[0]))
  for name, a, b in zip(names + ('initial_state',), g, g_ref):
    tol, f = (GATE_TOL, floor) if name in GATE_ARGS else (QKV_TOL, 1e-30)
    assert rel(a, b, f) < tol, name


def assert_extreme_gates_stay_finite(naive_fn, chunk_fn, names, g_value, **kw):
  """Log-gates all near 0 or very negative: no NaN, and the chunked form still equals the recurrence."""
  x = inputs(3, 1, 96, 2, 16, 16, strength=1.0, **kw)
  x['g'] = jnp.full_like(x['g'], g_value)
  assert_chunked_matches_naive(naive_fn, chunk_fn, x, names)


def assert_decoding_continues_the_chunked_state(chunk_fn, step_fn, names, **kw):
  """Chunked over the first 70 tokens, then one token at a time, equals chunked over all 90."""
  x = inputs(4, 2, 90, 2, 16, 24, strength=1.0, **kw)
  full, full_state = chunk_fn(*(x[n] for n in names), initial_state=x['initial_state'])
  _, state = chunk_fn(*(x[n][:, :70] for n in names), initial_state=x['initial_state'])
  outs = []
  step_fn = jax.jit(step_fn, static_argnames='scale')
  for t in range(70, 90):
    state, o = step_fn(state, *(x[n][:, t] for n in names), scale=16 ** -0.5)
    outs.append(o)
  assert rel(jnp.stack(outs, axis=1), full[:, 70:]) < 1e-5 and rel(state, full_state) < 1e-5
