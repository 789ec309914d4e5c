"""Where device time goes: a jax.profiler trace of a few steps, summarised by kernel and by kind of kernel."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os

import jax

KINDS = (  # (kind, substrings of a kernel name), first match wins
    ('attention', ('cudnn', 'fmha', 'flash', 'attention', 'mha')),
    ('matmul', ('gemm', 'cutlass', 'nvjet', 'xmma', 'cublas', 'matmul', 'dot')),
    ('collective', ('nccl', 'all-reduce', 'all-gather', 'reduce-scatter', 'collective')),
    ('copy', ('memcpy', 'memset', 'copy')),
    ('fusion', ('fusion', 'loop_', 'input_', 'reduce', 'transpose', 'convert', 'triton')),
)


def kind_of(name: str) -> str:
  lower = name.lower()
  for kind, keys in KINDS:
    if any(k in lower for k in keys):
      return kind
  return 'other'


def trace(fn, steps: int, logdir: str) -> None:
  """Runs fn() `steps` times under the profiler, waiting for each result."""
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(fn())


def summarize(logdir: str, steps: int, top: int = 15) -> dict:
  """Device kernel time per step, by kind and for the `top` kernels, from the newest perfetto trace in logdir."""
  paths = sorted(glob.glob(os.path.join(logdir, '**', 'perfetto_trace.json.gz'), recursive=True))
  if not paths:
    return {}
  with gzip.open(paths[-1]) as f:
    events = json.load(f)['traceEvents']
  device_pids = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and '/device:' in str(e.get('args', {}).get('name', ''))}
  by_name: collections.Counter = collections.Counter()
  launches = 0
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in device_pids:
      by_name[e['name']] += e.get('dur', 0.0)
      launches += 1
  by_kind: collections.Counter = collections.Counter()
  for name, us in by_name.items():
    by_kind[kind_of(name)] += us
  per_step = lambda us: us / steps / 1e3
  return {'device_ms_per_step': per_step(sum(by_name.values())), 'kernels_per_step': launches / steps,
          'by_kind_ms': {k: per_step(v) for k, v in by_kind.most_common()},
          'top_kernels_ms': [(n[:120], per_step(v)) for n, v in by_name.most_common(top)]}
