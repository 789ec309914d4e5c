"""Next-token cross-entropy fused with the output projection.

    logits = x · W            (fp32 accumulation)
    logz   = logsumexp(logits)
    nll    = logz − logits[target]

`reference` is the plain composition (autodiff does the backward). `fused` has its own backward that forms
d logits = softmax · (d nll + d logz) − onehot(target) · d nll in one elementwise pass and emits it in x's dtype,
so the [tokens × vocab] fp32 array is read once in the backward and both backward matmuls run at the 16-bit rate.
`chunked` never holds more than one chunk's logits: the tokens go in `num_chunks` strided groups (positions
s, s + N, s + 2N, ...; a sequence sharded over devices stays sharded in every group), forward and backward each
loop over them, and the backward recomputes each group's logits.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _logits(x, w):
  return jnp.einsum('btd,dv->btv', x, w, preferred_element_type=jnp.float32)


def reference(x, w, targets):
  """(nll, logz), each [B, T] fp32, for x [B, T, d], w [d, V], integer targets [B, T]."""
  logits = _logits(x, w)
  logz = jax.nn.logsumexp(logits, axis=-1)
  return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], logz


@jax.custom_vjp
def fused(x, w, targets):
  return reference(x, w, targets)


def _fused_fwd(x, w, targets):
  logits = _logits(x, w)
  logz = jax.nn.logsumexp(logits, axis=-1)
  nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (nll, logz), (x, w, targets, logits, logz)


def _fused_bwd(res, cotangents):
  x, w, targets, logits, logz = res
  d_nll, d_logz = cotangents
  probs = jnp.exp(logits - logz[..., None])
  onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
  d_logits = (probs * (d_nll + d_logz)[..., None] - jnp.where(onehot, d_nll[..., None], 0.0)).astype(x.dtype)
  dx = jnp.einsum('btv,dv->btd', d_logits, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum('btv,btd->dv', d_logits, x, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw, None


fused.defvjp(_fused_fwd, _fused_bwd)


def _strided(x, n):
  """[B, T, ...] -> [N, B, T/N, ...]: group s holds positions s, s + N, s + 2N, ..."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, t // n, n) + x.shape[2:]), 2, 0)


def _unstrided(x):
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 2).reshape((b, c * n) + x.shape[3:])


def chunked(x, w, targets, num_chunks: int):
  """(nll, logz) as `reference`, with at most [B, T/num_chunks, V] logits alive at a time (module docstring)."""
  if x.shape[1] % num_chunks:
    raise ValueError(f'sequence length {x.shape[1]} does not divide into {num_chunks} loss chunks')
  return _chunked(x, w, targets, num_chunks)


def _chunked_fwd(x, w, targets, n):
  def one(_, xs):
    xi, ti = xs
    logits = _logits(xi, w)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return None, (logz - jnp.take_along_axis(logits, ti[..., None], axis=-1)[..., 0], logz)

  _, (nll, logz) = jax.lax.scan(one, None, (_strided(x, n), _strided(targets, n)))
  return (_unstrided(nll), _unstrided(logz)), (x, w, targets, logz)


def _chunked_bwd(n, res, cotangents):
  x, w, targets, logz = res          # logz already in groups [N, B, T/N]
  d_nll, d_logz = cotangents
  wx = w.astype(x.dtype)

  def one(dw, xs):
    xi, ti, lzi, dni, dzi = xs
    probs = jnp.exp(_logits(xi, w) - lzi[..., None])
    onehot = jnp.arange(w.shape[-1]) == ti[..., None]
    d_logits = (probs * (dni + dzi)[..., None] - jnp.where(onehot, dni[..., None], 0.0)).astype(x.dtype)
    dxi = jnp.einsum('btv,dv->btd', d_logits, wx, preferred_element_type=jnp.float32).astype(x.dtype)
    return dw + jnp.einsum('btv,btd->dv', d_logits, xi, preferred_element_type=jnp.float32), dxi

  groups = (_strided(x, n), _strided(targets, n), logz, _strided(d_nll, n), _strided(d_logz, n))
  dw, dx = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), groups)
  return _unstrided(dx), dw.astype(w.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(x, w, targets, n):
  return _chunked_fwd(x, w, targets, n)[0]


def _chunked_fwd_rule(x, w, targets, n):
  return _chunked_fwd(x, w, targets, n)


_chunked.defvjp(_chunked_fwd_rule, _chunked_bwd)
