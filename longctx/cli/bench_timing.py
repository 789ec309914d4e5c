"""Timing and recording helpers shared by the layer and kernel benchmarks (`bench_layers`, `bench_linear`)."""
from __future__ import annotations

import contextlib
import json
import statistics
import time

import jax
import jax.numpy as jnp



def median_ms(fn, *args, steps: int, back_to_back: int = 1) -> float:
  """Median wall time of one `fn(*args)` over `steps` samples, after one untimed call. A sample issues
  `back_to_back` calls and waits once: above 1 the host's per-call dispatch and wait drop out and the device's
  time remains, launch gaps included (what CUDA-event timers such as triton.testing.do_bench report)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(back_to_back)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) / back_to_back)
  return statistics.median(times) * 1e3


def error_text(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'


def rel_error(a, b) -> float:
  """‖a − b‖ / ‖b‖ over all elements, a taken to fp32."""
  return float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))


def timed(row: dict, label: str, fn, *args, steps: int, back_to_back: int = 1) -> float | None:
  """`row[label + '_ms']` = median_ms(fn, *args); a failure (out of memory is a result) goes to
  `row[label + '_error']` and gives None."""
  try:
    row[f'{label}_ms'] = median_ms(fn, *args, steps=steps, back_to_back=back_to_back)
    return row[f'{label}_ms']
  except Exception as e:
    row[f'{label}_error'] = error_text(e)
    return None


@contextlib.contextmanager
def recorded(row: dict, results: list):
  """The block fills `row`; a failure inside it (out of memory, an option the compiler refuses) is a result, kept as
  the row's `error`. The row then joins `results` and is printed as a JSON line."""
  try:
    yield row
  except Exception as e:
    row['error'] = error_text(e)
  results.append(row)
  print(json.dumps(row), flush=True)


def profile_tables(results: list[dict]) -> str:
  lines = []
  for r in results:
    if r.get('profile', {}).get('top_kernels_ms'):
      p = r['profile']
      kinds = ', '.join(f'{k} {v:.2f}' for k, v in p['by_kind_ms'].items())
      lines += [f'\n{r["case"]} forward+backward, device ms by kind: {kinds}. Top kernels:\n',
                '| kernel | ms |', '|---|---|']
      lines += [f'| `{n[:90]}` | {ms:.2f} |' for n, ms in p['top_kernels_ms']]
  return '\n'.join(lines) + ('\n' if lines else '')


def both_of(fn, q, k, v, beta, g, gk, do):
  """Gradients of Σ fn(...) · do in q, k, v."""
  return jax.vjp(lambda q, k, v: fn(q, k, v, beta, g, gk), q, k, v)[1](do)


def time_mixer_grad(row: dict, graph, params, x, dy, positions, segments, steps: int):
  """Compiles the gradient of Σ mixer(x) · dy in the mixer's parameters and x, and records in `row` its median time
  (`fwd_bwd_ms`) and the compiled step's own memory (`step_memory_gib`: arguments, outputs, temporaries).
  Returns the compiled function (called as compiled(params, x))."""
  from flax import nnx

  def loss(params, x):
    y, _ = nnx.merge(graph, params)(x, positions=positions, segment_ids=segments)
    return jnp.sum(y.astype(jnp.float32) * dy)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    row['step_memory_gib'] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2 ** 30
  row['fwd_bwd_ms'] = median_ms(compiled, params, x, steps=steps)
  return compiled
