"""Titans' memory at the paper's chunk-parallel semantics without per-token weights.

In an anchor batch of C tokens (the paper's chunk b) every gradient is taken at the batch-start memory M⁰ (and
momentum S⁰). For a linear layer the gradient of token s is rank one, G_s = x_s δ_sᵀ (x_s the layer's input, δ_s =
∂ℓ_s/∂z_s at its output, both from one forward and backward pass of M⁰ on the batch's keys). Momentum and decay are
linear in the G_s, so

    W_t = A_t W⁰ + B_t S⁰ − Σ_{s≤t} C_ts θ_s G_s,      S_t = E_t S⁰ − Σ_{s≤t} D_ts θ_s G_s

with A, B, C, D, E products and sums of α and η (`coefficients`, a scan over the batch on [C]-vectors whose entries
stay in [0, 1]-products, so nothing overflows). A read of token t through layer l never forms W_t:

    h W_t = A_t (h W⁰) + B_t (h S⁰) − ((h Xᵀ) ⊙ C ⊙ θ) Δ          (the dual form; X, Δ stacked over the batch)

and the next batch's state is the t = C row. A per-token gradient clip scales θ_s (‖G_s‖² = Σ_l ‖x_s‖²‖δ_s‖²).
A per-channel forgetting gate (α [..., d]) makes A, B, C per channel: they scale the first layer's rows and the
last layer's columns (`memory.decay_axis`), and the dual form's scores carry the channel.

Anchor batches run one after another; `chunk_size` tokens of them at a time form one step of a `lax.scan` whose
body is rematerialised in the backward pass, so the backward keeps one state per chunk. The anchor batches inside a
chunk are unrolled: on the H100 (B2 T4096, 8 heads × 128, 2-layer memory ×4, forward+backward) chunk 64 of anchor
16 took 124 ms as an inner loop and 71 ms unrolled, the time of chunk 16 (72 ms) with a quarter of the kept states;
compile time grows with the unroll. (Saving each batch's intermediates instead measured 1.9× slower and 3.3× the
memory: the scan's stacked residuals cost more than recomputing the batch.)
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging

from longctx.ops.chunking import pad_to_multiple, resets
from longctx.ops.titans import memory


def coefficients(eta, alpha, valid, reset):
  """eta, alpha, valid, reset [..., C] -> (A [.., C], B [.., C], C [.., C, C] (t, s), E [..], D [.., C] (s)): the
  weights of the base memory, S⁰ and each θ_s G_s in W_t, and of S⁰ and θ_s G_s in the batch's last momentum.
  Invalid (padding) tokens leave everything as it was; at a reset (a document starts) the base becomes the reset
  memory and everything before is forgotten."""
  c = eta.shape[-1]
  lead = eta.shape[:-1]
  eye = jnp.eye(c, dtype=eta.dtype)

  def step(carry, xs):
    sc, mc, sb, mb, ma = carry
    et, al, ok, r, e_t = xs
    sc, mc = jnp.where(r[..., None], 0.0, sc), jnp.where(r[..., None], 0.0, mc)
    sb, mb, ma = jnp.where(r, 0.0, sb), jnp.where(r, 0.0, mb), jnp.where(r, 1.0, ma)
    keep = lambda new, old: jnp.where(ok[..., None] if new.ndim > ok.ndim else ok, new, old)
    sc = keep(et[..., None] * sc + e_t, sc)
    mc = keep((1 - al)[..., None] * mc + sc, mc)
    sb = keep(et * sb, sb)
    mb = keep((1 - al) * mb + sb, mb)
    ma = keep((1 - al) * ma, ma)
    return (sc, mc, sb, mb, ma), (mc, mb, ma)

  zeros = jnp.zeros(lead + (c,), eta.dtype)
  init = (zeros, zeros, jnp.ones(lead, eta.dtype), jnp.zeros(lead, eta.dtype), jnp.ones(lead, eta.dtype))
  last = lambda x: jnp.moveaxis(x, -1, 0)
  units = jnp.broadcast_to(eye, lead + (c, c))
  (sc, _, sb, _, _), (mc, mb, ma) = jax.lax.scan(
      step, init, (last(eta), last(alpha), last(valid), last(reset), jnp.moveaxis(units, -2, 0)))
  first = lambda x: jnp.moveaxis(x, 0, len(lead))
  return first(ma), first(mb), first(mc), sb, sc


def _keys_pass(spec, weights, k, v, delta):
  """Layer inputs X_l [B, H, C, d_in] and output deltas Δ_l [B, H, C, d_out] of M⁰ on the batch's keys (the
  objective's gradient: any Miras attentional bias keeps each token's gradient rank one per layer)."""
  act = memory.ACTIVATIONS[spec.activation]

  def forward(perturb):
    h, inputs = k, []
    for i, w in enumerate(weights):
      inputs.append(h)
      z = jnp.einsum('bhci,bhio->bhco', h, w) + perturb[i]
      h = act(z) if i < len(weights) - 1 else z
    out = memory.finish(spec, k, h)
    return jnp.sum(memory.objective(spec, out, v, delta)), inputs

  zeros = [jnp.zeros(k.shape[:-1] + (w.shape[-1],), jnp.float32) for w in weights]
  deltas, inputs = jax.grad(forward, has_aux=True)(zeros)
  return inputs, deltas


def _per_token(c, axis):
  """A coefficient [B, H, C] or per channel [B, H, d, C] as a factor on [B, H, C, d] activations."""
  return c[..., None] if axis is None else jnp.swapaxes(c, -1, -2)


def _read(h, base, s0, x, d, A, B, Cm, theta, axis):
  """h [B, H, C, d_in] through layer W_t of each token t (module docstring); `base(h)` is h through the batch's base
  memory. Per-channel coefficients scale the rows (axis −1: the inputs) or the columns (axis −2: the outputs)."""
  th = theta[..., None, :]
  if axis == -1:
    scores = jnp.einsum('bhti,bhsi,bhits->bhts', h, x, Cm) * th
    return (base(h * _per_token(A, axis)) + jnp.einsum('bhci,bhio->bhco', h * _per_token(B, axis), s0)
            - jnp.einsum('bhts,bhso->bhto', scores, d))
  z = _per_token(A, axis) * base(h) + _per_token(B, axis) * jnp.einsum('bhci,bhio->bhco', h, s0)
  scores = jnp.einsum('bhti,bhsi->bhts', h, x) * th
  if axis is None:
    return z - jnp.einsum('bhts,bhso->bhto', scores * Cm, d)
  return z - jnp.einsum('bhts,bhots,bhso->bhto', scores, Cm, d)


def _end(w0, s0, x, d, A, B, Cm, theta, axis):
  """The layer's weights after the batch's last token."""
  last = Cm[..., -1, :] * theta if axis is None else Cm[..., -1, :] * theta[..., None, :]
  spec = {None: 'bhsi,bhs,bhso->bhio', -1: 'bhsi,bhis,bhso->bhio', -2: 'bhsi,bhos,bhso->bhio'}[axis]
  return memory.scale(w0, A[..., -1], axis) + memory.scale(s0, B[..., -1], axis) - jnp.einsum(spec, x, last, d)


def _batch(spec, axes, reset_weights, state, xs):
  """One anchor batch. With `reset_weights`, a document starting inside it takes its gradients and base memory
  from them (`after` marks its tokens); without, no document starts after the batch's first token."""
  q, k, v, delta, theta, A, B, Cm, E, D, after = xs
  W0, S0 = state['weights'], state['momentum']
  X, Delta = _keys_pass(spec, W0, k, v, delta)
  if reset_weights is not None:
    X_new, Delta_new = _keys_pass(spec, reset_weights, k, v, delta)
    pick = lambda old, new: [jnp.where(after[..., None], b, a) for a, b in zip(old, new)]
    X, Delta = pick(X, X_new), pick(Delta, Delta_new)

  def base(i):
    def through(h):
      out = jnp.einsum('bhci,bhio->bhco', h, W0[i])
      if reset_weights is None:
        return out
      return jnp.where(after[..., None], jnp.einsum('bhci,bhio->bhco', h, reset_weights[i]), out)
    return through

  sq = sum(jnp.sum(jnp.square(x), -1) * jnp.sum(jnp.square(d), -1) for x, d in zip(X, Delta))
  theta = theta * memory.clip_scale(spec, sq)                              # [B, H, C]
  act = memory.ACTIVATIONS[spec.activation]
  h = q
  for i, (s0, x, d) in enumerate(zip(S0, X, Delta)):
    z = _read(h, base(i), s0, x, d, A, B, Cm, theta, axes[i])
    h = act(z) if i < len(W0) - 1 else z
  o = memory.finish(spec, q, h)
  end_base = W0 if reset_weights is None else [
      jnp.where(after[..., -1, None, None], wr, w0) for w0, wr in zip(W0, reset_weights)]
  weights = [memory.retain(spec, _end(w0, s0, x, d, A, B, Cm, theta, axes[i]), w0, A[..., -1], axes[i])
             for i, (w0, s0, x, d) in enumerate(zip(end_base, S0, X, Delta))]
  outer = lambda x, c, d: jnp.einsum('bhsi,bhs,bhso->bhio', x, c, d)
  momentum = [E[..., None, None] * s0 - outer(x, D * theta, d) for s0, x, d in zip(S0, X, Delta)]
  return {'weights': weights, 'momentum': momentum}, o


def _anchor(spec, axes, reset_weights, state, xs):
  """An anchor batch: a document starting at its first token restarts the state before it; with reset weights the
  batch also takes the second keys pass for a document starting later in it. (Choosing that pass at run time with
  `lax.cond` measured slower on the H100 than always taking it: the predicate goes to the host every batch.)"""
  *xs, start = xs
  if reset_weights is None:
    return _batch(spec, axes, None, state, xs)
  s = start[..., None, None]
  state = {'weights': [jnp.where(s, wr, w) for wr, w in zip(reset_weights, state['weights'])],
           'momentum': [jnp.where(s, 0.0, m) for m in state['momentum']]}
  return _batch(spec, axes, reset_weights, state, xs)


KERNELS = ('auto', 'pallas', 'jax', 'pallas_interpret')
_logged: set[tuple] = set()


def choose(requested: str, spec, anchor: int, per_channel: bool, platform: str) -> str:
  """'pallas', 'pallas_interpret' or 'jax' for this memory (kernels_pallas.titans: a GPU and a TPU kernel, taken only
  when asked for); a forced kernel that cannot apply raises, saying why. The choice is logged once per shape."""
  from kernels_pallas.titans import supported
  if requested not in KERNELS:
    raise ValueError(f'model.titans.kernel = {requested!r}: expected one of {", ".join(KERNELS)}')
  ok, why = supported(spec, anchor, per_channel)
  if requested in ('pallas', 'pallas_interpret') and not ok:
    raise ValueError(f'model.titans.kernel = {requested}: {why}')
  if requested == 'pallas' and platform not in ('gpu', 'tpu'):
    raise ValueError(f'model.titans.kernel = pallas needs a GPU or TPU (platform {platform}); pallas_interpret runs '
                     'the kernel on any platform, slowly')
  # auto takes the jax form: the GPU kernel measured slower on the H100 at every batch size tried
  # (benchmarks/titans-*); the TPU kernel has not been timed on a TPU.
  choice = requested if requested != 'auto' else 'jax'
  key = (choice, requested, platform, spec, anchor, per_channel)
  if key not in _logged:
    _logged.add(key)
    logging.info('titans memory: %s (requested %s; platform %s, anchor batch %d%s)', choice, requested, platform,
                 anchor, f'; kernel refused: {why}' if not ok else '')
  return choice


def _kernel_pass(spec, choice, xs, state, platform):
  """The whole pass through kernels_pallas.titans on [N, B, H, C, ...] operands (no document starts): the TPU kernel
  on a TPU, the GPU kernel elsewhere (in interpret mode off the GPU)."""
  from kernels_pallas.titans import Options, memory_pass
  qs, ks, vs, th, A, B, Cm, E, D = xs
  n, b, h, c = th.shape
  rows = lambda x: jnp.moveaxis(x, 0, 2).reshape((b * h, n * c) + x.shape[4:])
  col = lambda x: rows(x)[..., None]
  heads = lambda w: w.reshape((b * h,) + w.shape[2:])
  hidden = state['weights'][0].shape[-1]
  opts = Options(chunk=c, activation=spec.activation, grad_clip=spec.grad_clip, block=math.gcd(32, hidden),
                 interpret=choice == 'pallas_interpret',
                 backend='tpu' if platform == 'tpu' and choice == 'pallas' else 'gpu')
  o, weights, momentum = memory_pass(
      rows(qs), rows(ks), rows(vs), col(th), col(A), col(B), rows(Cm), col(D),
      col(jnp.broadcast_to(E[..., None], th.shape)), [heads(w) for w in state['weights']],
      [heads(m) for m in state['momentum']], opts)
  back = lambda w: w.reshape((b, h) + w.shape[1:])
  o = jnp.moveaxis(o.reshape(b, h, n, c, -1), 2, 0)
  return {'weights': [back(w) for w in weights], 'momentum': [back(m) for m in momentum]}, o


def lmm(spec, q, k, v, theta, eta, alpha, state, chunk_size: int = 16, *, anchor: int = 0, segment_ids=None,
        reset_weights=None, delta=None, kernel: str = 'jax'):
  """q, k [B, T, H, dk], v [B, T, H, dv], theta, eta (and Huber's `delta`) [B, T, H], alpha [B, T, H] or per
  channel [B, T, H, dk]; state as `memory.init_state`. Gradients are anchored every `anchor` tokens (0: chunk_size;
  it divides chunk_size), and the backward pass keeps one state per chunk_size tokens. The retention map
  (spec.retention) applies to the weights at each anchor batch's end. Where segment_ids [B, T] start a new
  document the memory restarts from `reset_weights` (default: the state's weights; per layer [B, H, d_in, d_out])
  with zero momentum; inside a batch that document's gradients are taken at that memory. `kernel` (`choose`) may
  send the pass to kernels_pallas.titans, which takes sequences without document starts (a batch with one runs
  here). Returns (o [B, T, H, dv] in v's dtype, final state fp32). Any T: the last batch is padded with tokens
  that change nothing."""
  b, t, h = q.shape[:3]
  anchor = anchor or chunk_size
  if chunk_size % anchor:
    raise ValueError(f'the anchor batch ({anchor}) must divide the chunk ({chunk_size})')
  per_channel = alpha.ndim == 4
  axes = memory.decay_axes(spec, alpha)
  if segment_ids is None:
    reset_weights = None                      # no document starts: nothing restarts
  elif reset_weights is None:
    reset_weights = state['weights']
  if reset_weights is not None:
    reset_weights = [w.astype(jnp.float32) for w in reset_weights]
  c = min(anchor, t)
  group = max(1, min(chunk_size // anchor, -(-t // c)))
  valid = pad_to_multiple(jnp.ones((b, t, h), bool), c * group, value=False)
  n = valid.shape[1] // c
  # [B, T, H, ...] -> [N, B, H, C, ...]
  chunked = lambda x: jnp.moveaxis(pad_to_multiple(x, c * group).reshape((b, n, c, h) + x.shape[3:]), (1, 2), (0, 3))
  f32 = lambda x: chunked(x.astype(jnp.float32))
  qs, ks, vs, ds, th, et = (f32(x) for x in (q, k, v, memory.thresholds(delta, theta), theta, eta))
  ok = chunked(valid)
  reset = chunked(jnp.broadcast_to(pad_to_multiple(resets(segment_ids, t, b), c * group)[..., None], valid.shape))
  if per_channel:
    al = jnp.swapaxes(f32(alpha), -1, -2)                                     # [N, B, H, d, C]
    wide = lambda x: jnp.broadcast_to(x[..., None, :], al.shape)
    A, B, Cm, E, D = coefficients(wide(et), al, wide(ok), wide(reset))
    E, D = E[..., 0], D[..., 0, :]
  else:
    A, B, Cm, E, D = coefficients(et, f32(alpha), ok, reset)
  th = jnp.where(ok, th, 0.0)
  state = jax.tree.map(lambda x: x.astype(jnp.float32), state)

  def scan_path():
    start = reset[..., 0]
    after = jnp.cumsum(reset.at[..., 0].set(False).astype(jnp.int32), axis=-1) > 0
    xs = (qs, ks, vs, ds, th, A, B, Cm, E, D, after, start)
    xs = jax.tree.map(lambda x: x.reshape((n // group, group) + x.shape[1:]), xs)
    one = functools.partial(_anchor, spec, axes, reset_weights)
    body = jax.checkpoint(lambda state, xs: jax.lax.scan(one, state, xs, unroll=True))
    final, o = jax.lax.scan(body, state, xs)
    return final, o.reshape((n,) + o.shape[2:])

  platform = jax.default_backend()
  choice = choose(kernel, spec, c, per_channel, platform)
  if choice == 'jax':
    state, o = scan_path()
  else:
    fast = lambda: _kernel_pass(spec, choice, (qs, ks, vs, th, A, B, Cm, E, D), state, platform)
    state, o = fast() if segment_ids is None else jax.lax.cond(jnp.any(reset), scan_path, fast)
  o = jnp.moveaxis(o, (0, 3), (1, 2)).reshape(b, n * c, h, -1)[:, :t]
  return o.astype(v.dtype), state
