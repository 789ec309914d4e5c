"""The Pallas kernels for Titans' memory (kernels_pallas.titans, GPU and TPU) equal the jax chunk form, forward and
backward, run in interpret mode on CPU."""
import jax.numpy as jnp
import pytest

import kernels_pallas.titans
from kernels_pallas.titans import kernel

from longctx.ops.titans import MemorySpec, chunk_lmm
from longctx.ops.titans.chunk import choose
from tests.test_titans_memory import assert_close, inputs


@pytest.fixture
def backend(request, monkeypatch):
  """The kernel the ops layer's pallas_interpret runs: the GPU one, or the TPU one (TPU interpret mode)."""
  if request.param == 'tpu':
    monkeypatch.setattr(kernels_pallas.titans, 'memory_pass',
                        lambda *args: kernel.memory_pass(*args[:-1], args[-1]._replace(backend='tpu')))
  return request.param


# The TPU kernel shares the per-batch arithmetic with the GPU one; one case checks its grid, VMEM state and reverse
# walk (the clip on, an odd length).
@pytest.mark.parametrize('clip,activation,t,backend', [(0.0, 'gelu', 40, 'gpu'), (80.0, 'gelu', 48, 'gpu'),
                                                       (80.0, 'silu', 35, 'gpu'), (80.0, 'silu', 35, 'tpu')],
                         indirect=['backend'])
def test_kernel_equals_the_chunk_form(clip, activation, t, backend):
  """Odd lengths (a padded last batch), the clip on for about half the tokens (norms 50–110), two hidden blocks
  (the GPU kernel; the TPU one keeps the hidden units in one block)."""
  spec = MemorySpec(dk=16, dv=16, depth=2, expansion=2, grad_clip=clip, activation=activation)
  x = inputs(t, 2, t, 2, 16, 16, spec, scale=1.5)
  x['alpha'] = jnp.concatenate([x['alpha'][:, :8], 0.9 * jnp.ones_like(x['alpha'][:, 8:12]), x['alpha'][:, 12:]], 1)
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=16, kernel='pallas_interpret'),
               lambda *a: chunk_lmm(spec, *a, chunk_size=16), x, out_tol=1e-5, grad_tol=1e-5)


def test_documents_take_the_jax_form_and_equal_it():
  """With a document starting inside a batch the run-time choice takes the jax form; forward and every gradient
  through that choice (both branches traced) equal the jax form's."""
  spec = MemorySpec(dk=16, dv=16, depth=2, expansion=2, grad_clip=0.3)
  x = inputs(1, 2, 32, 2, 16, 16, spec)
  seg = jnp.asarray([[1] * 20 + [2] * 12, [1] * 32])
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=16, segment_ids=seg, kernel='pallas_interpret'),
               lambda *a: chunk_lmm(spec, *a, chunk_size=16, segment_ids=seg), x, out_tol=1e-5, grad_tol=1e-5)


def test_kernel_choice():
  spec = MemorySpec(dk=128, dv=128, depth=2, expansion=4)
  assert choose('auto', spec, 16, False, 'gpu') == 'jax'                # the kernel is slower (benchmarks/)
  assert choose('pallas', spec, 16, False, 'gpu') == 'pallas'
  assert choose('pallas', spec, 16, False, 'tpu') == 'pallas'           # the TPU kernel
  assert choose('auto', spec, 16, False, 'tpu') == 'jax'
  for refused in (MemorySpec(dk=128, dv=128, depth=1), MemorySpec(dk=128, dv=128, objective='huber')):
    with pytest.raises(ValueError, match='the kernel has'):
      choose('pallas', refused, 16, False, 'gpu')
  with pytest.raises(ValueError, match='per-channel'):
    choose('pallas', spec, 16, True, 'gpu')
  with pytest.raises(ValueError, match='anchor batch 8'):
    choose('pallas_interpret', spec, 8, False, 'cpu')
  with pytest.raises(ValueError, match='needs a GPU or TPU'):
    choose('pallas', spec, 16, False, 'cpu')
  with pytest.raises(ValueError, match='expected one of'):
    choose('triton', spec, 16, False, 'gpu')
