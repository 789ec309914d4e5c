"""The sequential pass over chunks that every chunked linear-attention form ends in, and the choice of its path.

The chunk forms (`scalar_decay.chunk`, `channel_decay.chunk`, `delta_rule.chunk`) compute everything that needs no
state for all chunks at once, then call `state_pass` with [B, H, N, C, ·] operands (kernels_pallas.linear.reference
says what each is). Paths:
  jax     `lax.scan` over chunks (kernels_pallas.linear.reference), any platform and size.
  pallas  kernels_pallas.linear: on GPU one program per (batch·head, value block) walks the chunks with the state in
          registers (Triton lowering); on TPU one grid step per chunk with the state in VMEM (Mosaic TPU); forward
          and a recomputing backward. Chunk and head sizes must be powers of two ≥ 16 (head dims are zero-padded up
          to one here). `pallas_interpret` runs the GPU kernel on any platform in interpret mode (slow; for tests).
`choose` picks one by platform and sizes (auto: pallas on GPU or TPU where it applies, else jax); the choice is
logged once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from kernels_pallas.linear import kernel, reference

KERNELS = ('auto', 'pallas', 'jax', 'pallas_interpret')
_chosen: dict[tuple, str] = {}


def padded(d: int) -> int:
  """The head dim the kernels run at: d rounded up to a power of two ≥ 16."""
  return max(16, 1 << (d - 1).bit_length())


def choose(requested: str, *, platform: str, chunk: int, dk: int, dv: int) -> str:
  """'pallas', 'pallas_interpret' or 'jax' for these sizes; a forced kernel that cannot apply raises, saying why."""
  if requested not in KERNELS:
    raise ValueError(f'model.linear.kernel = {requested!r}: expected one of {", ".join(KERNELS)}')
  ok, why = kernel.supported(chunk, padded(dk), padded(dv))
  if requested in ('pallas', 'pallas_interpret') and not ok:
    raise ValueError(f'model.linear.kernel = {requested}: {why} (chunk {chunk}, head dims {dk}/{dv})')
  if requested == 'pallas' and platform not in ('gpu', 'tpu'):
    raise ValueError(f'model.linear.kernel = pallas needs a GPU or TPU (platform {platform}); pallas_interpret '
                     'runs the kernel on any platform, slowly')
  if requested != 'auto':
    return requested
  return 'pallas' if ok and platform in ('gpu', 'tpu') else 'jax'


def _pad(x, axis: int, to: int):
  """Zero-pads `axis` up to size `to` (exact for the state pass: padded key rows stay zero, value columns unread)."""
  extra = to - x.shape[axis]
  return x if not extra else jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])


def state_pass(q, k, u, p, a, h0=None, w=None, *, kernel_name: str = 'auto', out_dtype=jnp.float32):
  """q, k, w [B, H, N, C, Dk], u [B, H, N, C, Dv], p [B, H, N, C, C], a [B, H, N] (one decay per state) or
  [B, H, N, Dk] (one per key row), h0 [B, H, Dk, Dv] (None: zeros; it may have fewer rows and columns than the
  operands' head dims, which callers may have zero-padded). Returns (O in the tokens' layout [B, N·C, H, Dv] and
  `out_dtype`, final state fp32). bf16 operands run the kernel's matmuls in bf16 (the state rounded to bf16 for
  them, kept in fp32). The GPU kernel writes O in that layout itself."""
  b, h, n, c, dk = q.shape
  dv = u.shape[-1]
  platform = jax.default_backend()
  choice = choose(kernel_name, platform=platform, chunk=c, dk=dk, dv=dv)
  key = (choice, platform, q.shape, w is not None)
  if key not in _chosen:
    _chosen[key] = choice
    logging.info('linear state pass: %s (requested %s; platform %s, chunks %s of %d, head dims %d/%d, %s)', choice,
                 kernel_name, platform, n, c, dk, dv, 'delta rule' if w is not None else 'decay')
  rows = lambda x: x.reshape(b * h, n * c, x.shape[-1])
  a = jnp.broadcast_to(a[..., None], (b, h, n, dk)) if a.ndim == 3 else a
  a = jnp.swapaxes(a.reshape(b * h, n, dk), 1, 2)
  if h0 is None:
    h0 = jnp.zeros((b * h, dk, dv), jnp.float32)
  else:   # may be smaller than the operands' (padded) head dims
    h0 = _pad(_pad(h0.reshape((b * h,) + h0.shape[-2:]).astype(jnp.float32), 1, dk), 2, dv)
  q, k, u, p = rows(q), rows(k), rows(u), rows(p)
  w = None if w is None else rows(w)
  if choice == 'jax':
    o, state = reference.state_pass(q, k, u, p, a, h0, w, chunk=c)
    o = jnp.swapaxes(o.reshape(b, h, n * c, dv), 1, 2).astype(out_dtype)
  else:
    pk, pv = padded(dk), padded(dv)
    q, k = _pad(q, 2, pk), _pad(k, 2, pk)
    w = None if w is None else _pad(w, 2, pk)
    o, state = kernel.state_pass(q, k, _pad(u, 2, pv), p, _pad(a, 1, pk), _pad(_pad(h0, 1, pk), 2, pv), w, chunk=c,
                                 interpret=choice == 'pallas_interpret',
                                 precision='bf16' if q.dtype == jnp.bfloat16 else 'tf32',
                                 backend='tpu' if platform == 'tpu' and choice == 'pallas' else 'gpu', heads=h,
                                 out_dtype=out_dtype)
    o, state = o[..., :dv], state[:, :dk, :dv]
  return o, state.reshape(b, h, dk, dv)


def chosen_paths() -> list[str]:
  """Every state-pass path this process has dispatched to, for benchmark reports."""
  return sorted(set(_chosen.values()))
