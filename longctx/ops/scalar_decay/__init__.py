"""Linear attention with a scalar decay per head and token: RetNet (fixed γ_h), Lightning/TNL (other fixed decays),
Mamba2's SSD (data-dependent).

    S_t = α_t S_{t−1} + k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t),    α_t = exp(g_t), g [B, T, H], g ≤ 0

Faces as for the delta rule: `naive.scalar_decay` (fp32 scan, the reference), `chunk.scalar_decay` (chunkwise
parallel), `naive.step` (one token). Same arguments and returns: (o [B, T, H, Dv], final state fp32).
"""
from longctx.ops.scalar_decay.chunk import scalar_decay as chunk_scalar_decay  # noqa: F401
from longctx.ops.scalar_decay.naive import scalar_decay as naive_scalar_decay, step  # noqa: F401
