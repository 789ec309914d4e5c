"""Chunked linear attention kernels: the chunk state pass shared by the scalar-decay, per-channel-decay and
delta-rule families (`state_pass`), with its jax reference (`reference.state_pass`)."""
from kernels_pallas.linear.reference import state_pass as reference_state_pass  # noqa: F401
from kernels_pallas.linear.kernel import state_pass, supported  # noqa: F401
