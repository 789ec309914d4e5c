"""Sampling from a language model: one prefill over the prompt, then one token per step through each layer's cache
(KV cache for attention, recurrent state for linear layers), all steps one compiled function.

    tokens = sample(model, prompt, max_new_tokens=200, temperature=0.8, top_k=50, seed=0)

temperature 0 is greedy decoding. Rows of `prompt` are sampled independently (same length; left-aligned).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def choose(logits, key, temperature: float, top_k: int, top_p: float):
  """Next tokens [B] from logits [B, V]."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if 0.0 < top_p < 1.0:
    order = jnp.sort(logits, axis=-1)[:, ::-1]
    mass = jnp.cumsum(jax.nn.softmax(order, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus (the first one always is).
    cutoff = jnp.take_along_axis(order, jnp.sum(mass < top_p, axis=-1, keepdims=True), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample(model, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           seed: int = 0, eos_id: int | None = None):
  """prompt [B, P] int -> new tokens [B, max_new_tokens] (after an `eos_id`, a row repeats it)."""
  prompt = jnp.asarray(prompt, jnp.int32)
  b, p = prompt.shape
  if max_new_tokens < 1:
    return np.zeros((b, 0), np.int32)
  graph, state = nnx.split(model)
  eos = -1 if eos_id is None else eos_id

  @jax.jit
  def generate(state, prompt, key):
    model = nnx.merge(graph, state)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits, caches = model.decode(prompt, positions, model.init_cache(b, p + max_new_tokens))
    key, sub = jax.random.split(key)
    first = choose(logits[:, -1], sub, temperature, top_k, top_p)

    def body(carry, i):
      token, caches, done, key = carry
      key, sub = jax.random.split(key)
      logits, caches = model.decode(token[:, None], jnp.full((b, 1), p + i, jnp.int32), caches)
      nxt = choose(logits[:, -1], sub, temperature, top_k, top_p)
      done = done | (token == eos)
      nxt = jnp.where(done, eos, nxt)
      return (nxt, caches, done, key), token

    init = (first, caches, jnp.zeros((b,), bool), key)
    (last, *_), tokens = jax.lax.scan(body, init, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([jnp.moveaxis(tokens, 0, 1), last[:, None]], axis=1)

  return np.asarray(generate(state, prompt, jax.random.PRNGKey(seed)))
