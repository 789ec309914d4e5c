"""What the chunked linear-attention forms share: cutting time into chunks, and segment (document) masks.

Packed rows reset a recurrent state where a new document starts. Inside a chunk that is expressed without
touching the gates: two positions interact only when no document starts between them, and the state entering the
chunk reaches a position only when no document starts before it in the chunk.
"""
from __future__ import annotations

import jax.numpy as jnp


def pad_to_multiple(x, multiple: int, axis: int = 1, value=0):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def to_chunks(x, chunk: int):
  """[B, T, ...] -> [B, T/chunk, chunk, ...]."""
  return x.reshape((x.shape[0], x.shape[1] // chunk, chunk) + x.shape[2:])


def resets(segment_ids, length: int, batch: int):
  """[B, T] bool: a new document starts here (never at t = 0, where the initial state applies)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  r = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), r], axis=1)


def reset_counts(segment_ids, chunk: int):
  """[B, T'] int32 (T' = T rounded up to whole chunks): how many documents have started since the first position of
  the chunk (0 up to the chunk's first document start). None without segment ids."""
  if segment_ids is None:
    return None
  b, t = segment_ids.shape
  count = jnp.cumsum(to_chunks(pad_to_multiple(resets(segment_ids, t, b), chunk), chunk).astype(jnp.int32), axis=-1)
  return count.reshape(b, -1)


def count_masks(count):
  """From `reset_counts` laid out [..., C]: (same [..., C, C]: j and i in one document, from_start [..., C]: the
  incoming state reaches i, to_end [..., C]: position j's update reaches the chunk's last state)."""
  same = count[..., :, None] == count[..., None, :]
  return same, count == 0, count == count[..., -1:]


def chunk_masks(count, chunk: int):
  """The masks of `count_masks` from `reset_counts` [B, T'] (or None), laid out [B, 1, N, C, ...] to broadcast
  over heads; without counts all true and of size 1 but for the chunk (one document: masks that broadcast, rather
  than [B, N, C] constants the compiler would fold at every length)."""
  if count is None:
    return jnp.ones((1, 1, 1, chunk, chunk), bool), jnp.ones((1, 1, 1, chunk), bool), jnp.ones((1, 1, 1, chunk), bool)
  return tuple(m[:, None] for m in count_masks(to_chunks(count, chunk)))


def chunked_inputs(arrays, segment_ids, chunk: int):
  """fp32, zero-padded to a whole number of chunks and laid out [B, H, N, C, ...] (arrays are [B, T, H, ...]),
  with the document masks of `chunk_masks`. Zero padding must leave the state as it is (zero keys and values,
  zero log-gates, zero β)."""
  heads_first = lambda x: jnp.moveaxis(to_chunks(pad_to_multiple(x.astype(jnp.float32), chunk), chunk), 3, 1)
  return tuple(heads_first(x) for x in arrays), chunk_masks(reset_counts(segment_ids, chunk), chunk)
