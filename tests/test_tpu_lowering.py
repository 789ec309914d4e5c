"""The Mosaic TPU kernels lower for a TPU at the shapes models run them at, forward and backward, without a TPU:
`jax.export` for platform tpu runs Pallas' TPU lowering (block shapes against the (8, 128) tiling, every primitive
in the kernel bodies) on this machine. The kernels' arithmetic is checked in TPU interpret mode elsewhere
(test_linear_kernels, test_titans_kernel)."""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas.linear import state_pass
from kernels_pallas.titans import Options, memory_pass

f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)


def mosaic_calls(fn, args) -> int:
  """How many Mosaic TPU kernels the gradient of sum(fn) lowers to for a TPU."""
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(fn(*a)))
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
  return export.export(grad, platforms=['tpu'])(*args).mlir_module().count('tpu_custom_call')


@pytest.mark.parametrize('delta', [False, True])
def test_linear_state_pass_lowers_for_tpu(delta):
  # B·H 4, T 256 in chunks of 64, head dims 128: the forward storing states, then the reverse sweep.
  bh, t, d, c = 4, 256, 128, 64
  args = [f32(bh, t, d), f32(bh, t, d), f32(bh, t, d), f32(bh, t, c), f32(bh, d, t // c), f32(bh, d, d)]
  args += [f32(bh, t, d)] * delta
  fn = lambda q, k, u, p, a, h0, *w: state_pass(q, k, u, p, a, h0, *(w or (None,)), chunk=c, backend='tpu')
  assert mosaic_calls(fn, args) == 2


def test_titans_memory_pass_lowers_for_tpu():
  # The paper's head: D 128, a 2-layer memory of width 512, anchor batches of 16.
  bh, t, d, h, c = 2, 64, 128, 512, 16
  args = [f32(bh, t, d)] * 3 + [f32(bh, t, 1)] * 3 + [f32(bh, t, c), f32(bh, t, 1), f32(bh, t, 1)]
  args += [f32(bh, d, h), f32(bh, h, d)] * 2
  opts = Options(chunk=c, grad_clip=1.0, backend='tpu')
  fn = lambda *a: memory_pass(*a[:9], a[9:11], a[11:13], opts)
  assert mosaic_calls(fn, args) == 2
