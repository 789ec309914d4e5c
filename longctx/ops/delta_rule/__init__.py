"""The (gated) delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang et al. 2025).

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t),    α_t = exp(g_t), g_t ≤ 0

DeltaNet is g = 0. Faces: `naive.delta_rule` (token-by-token fp32 scan, the reference), `chunk.delta_rule`
(chunkwise-parallel WY/UT form for training), `naive.step` (one token, for decoding). All take
q, k [B, T, H, Dk], v [B, T, H, Dv], beta, g [B, T, H], optional initial_state [B, H, Dk, Dv] and segment_ids [B, T]
(the state restarts from zero where a new document starts) and return (o [B, T, H, Dv], final_state fp32).
"""
from longctx.ops.delta_rule.chunk import delta_rule as chunk_delta_rule  # noqa: F401
from longctx.ops.delta_rule.naive import delta_rule as naive_delta_rule, step  # noqa: F401
