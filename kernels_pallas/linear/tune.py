"""Times the chunk state-pass kernel alone over launch options, next to its jax reference (GPU).

  python -m kernels_pallas.linear.tune [--delta] [--bh 64] [--t 8192]

Prints one line per option: forward and forward+backward median ms and the error against the reference."""
import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.linear import reference, kernel


def median_ms(fn, *args, steps=20):
  import time
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--delta', action='store_true')
  parser.add_argument('--bh', type=int, default=64)
  parser.add_argument('--t', type=int, default=8192)
  parser.add_argument('--chunk', type=int, default=64)
  parser.add_argument('--d', type=int, default=128)
  args = parser.parse_args()
  bh, t, c, d = args.bh, args.t, args.chunk, args.d
  n = t // c
  ks = jax.random.split(jax.random.PRNGKey(0), 9)
  x = [jax.random.normal(ks[0], (bh, t, d)), 0.1 * jax.random.normal(ks[1], (bh, t, d)),
       jax.random.normal(ks[2], (bh, t, d)), jnp.tril(0.1 * jax.random.normal(ks[3], (bh, n, c, c))).reshape(bh, t, c),
       jax.random.uniform(ks[4], (bh, d, n), minval=0.9, maxval=1.0), jax.random.normal(ks[5], (bh, d, d))]
  if args.delta:
    x.append(0.01 * jax.random.normal(ks[6], (bh, t, d)))
  cot = jax.random.normal(ks[7], (bh, t, d))
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  def timed(fn):
    fwd = jax.jit(lambda *a: fn(*a)[0])
    both = jax.jit(lambda *a: jax.grad(lambda *a: jnp.sum(fn(*a)[0] * cot), argnums=tuple(range(len(a))))(*a))
    return fwd, both

  ref_fwd, ref_both = timed(lambda *a: reference.state_pass(*a, chunk=c))
  o_ref, g_ref = ref_fwd(*x), ref_both(*x)
  print(json.dumps({'form': 'jax', 'fwd_ms': median_ms(ref_fwd, *x), 'fwd_bwd_ms': median_ms(ref_both, *x)}))
  for block_v, warps, stages in itertools.product((32, 64), (4, 8), (1, 2)):
    fn = lambda *a: kernel.state_pass(*a, chunk=c, block_v=block_v, num_warps=warps, num_stages=stages)
    fwd, both = timed(fn)
    row = {'form': 'pallas', 'block_v': block_v, 'num_warps': warps, 'num_stages': stages}
    try:
      o, g = fwd(*x), both(*x)
      row.update(err_o=rel(o, o_ref), err_grad=max(rel(a, b) for a, b in zip(g, g_ref)),
                 fwd_ms=median_ms(fwd, *x), fwd_bwd_ms=median_ms(both, *x))
    except Exception as e:  # an option the compiler refuses (e.g. out of shared memory) is a result
      row['error'] = f'{type(e).__name__}: {str(e)[:120]}'
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
