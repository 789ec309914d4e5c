"""Next-token cross-entropy fused with the output projection.

    logits = x · W            (fp32 accumulation)
    logz   = logsumexp(logits)
    nll    = logz − logits[target]

`reference` is the plain composition (autodiff does the backward). `fused` has its own backward that forms
d logits = softmax · (d nll + d logz) − onehot(target) · d nll in one elementwise pass and emits it in x's dtype,
so the [tokens × vocab] fp32 array is read once in the backward and both backward matmuls run at the 16-bit rate.
"""
from __future__ import annotations

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
