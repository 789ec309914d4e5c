"""Titans' neural long-term memory (Behrouz, Zhong, Mirrokni 2025): an MLP memory trained inside the forward pass.

Per head, with memory weights M (an MLP, `memory.apply`) and the associative loss ℓ(M; k, v) = ‖M(k) − v‖²:

    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t)      (surprise with momentum)
    M_t = (1 − α_t) M_{t−1} + S_t                         (forgetting as weight decay)
    o_t = M_t(q_t)                                        (a read, no update)

θ, η, α are [B, T, H] in [0, 1]. Faces: `naive.lmm` (token by token, fp32: the recurrence itself), `naive.chunked_lmm`
(the paper's chunk-parallel semantics, every gradient in a chunk taken at the memory the previous chunk left, with
per-token weights materialised: the reference for the fast form), `chunk.lmm` (the same semantics without per-token
weights: each linear layer's per-token gradient is a rank-1 outer product, so reads inside a chunk are a dual form,
masked matmuls with a coefficient matrix built from α, η, θ). The state is {'weights': [...], 'momentum': [...]},
one [B, H, d_in, d_out] array per memory layer, fp32.
"""
from longctx.ops.titans.chunk import lmm as chunk_lmm  # noqa: F401
from longctx.ops.titans.memory import MemorySpec, apply, init_state  # noqa: F401
from longctx.ops.titans.naive import chunked_lmm as materialized_lmm, lmm as naive_lmm  # noqa: F401
