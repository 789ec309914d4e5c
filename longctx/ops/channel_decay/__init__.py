"""Linear attention with a decay per key channel: GLA and HGRN2 (matrix state), HGRN (vector state).

    GLA / HGRN2:  S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t),   α_t = exp(g_t), g [B, T, H, Dk]
    HGRN:         h_t = α_t ⊙ h_{t−1} + x_t,            (the vector case: one state entry per channel)

Faces: `naive.channel_decay` / `naive.vector_decay` (fp32 `lax.scan` over time, the references),
`chunk.channel_decay` (chunkwise parallel with secondary chunking), `chunk.vector_decay` (an associative scan),
`naive.step` / `naive.vector_step` (one token). Initial state in, final fp32 state out; segment ids restart the
state where a new document starts. Returns (output, final_state).
"""
from longctx.ops.channel_decay.chunk import channel_decay as chunk_channel_decay  # noqa: F401
from longctx.ops.channel_decay.chunk import vector_decay as scan_vector_decay  # noqa: F401
from longctx.ops.channel_decay.naive import channel_decay as naive_channel_decay, step  # noqa: F401
from longctx.ops.channel_decay.naive import vector_decay as naive_vector_decay, vector_step  # noqa: F401
