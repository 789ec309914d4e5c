"""Titans' memory kernels: the chunk-parallel LMM pass over a whole sequence (`memory_pass`), whose jax reference is
`longctx.ops.titans.chunk`; `Options.backend` picks the GPU kernel (`kernel`) or the TPU one (`tpu`)."""
from kernels_pallas.titans.kernel import Options, memory_pass, supported  # noqa: F401
