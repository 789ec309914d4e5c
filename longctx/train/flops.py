"""Model FLOPs per training step, counted as MaxText does, and MFU.

matmuls:    6 · (parameters used in a matmul per token) · tokens   (2 forward, 4 backward)
mixers:     3 · Σ_layers mixer.flops(config, seq_len) · batch      (each mixer counts its own forward FLOPs that
                                                                    no parameter accounts for; attention:
                                                                    4 · pairs · heads · head_dim, where pairs is
                                                                    the number of visible (query, key) pairs,
                                                                    about T²/2 causal, about T·w with a window)
Recomputation (remat) is not counted: MFU measures useful work.
"""
from __future__ import annotations

import jax

from longctx.layers import registry

# Dense bf16 peak of one chip, FLOP/s, by jax device_kind prefix.
PEAK_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA GH200': 989e12,
    'NVIDIA A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
}


def causal_pairs(seq_len: int, window: int = 0) -> int:
  """Number of (query, key) pairs with key <= query and query - key < window."""
  if not window or window >= seq_len:
    return seq_len * (seq_len + 1) // 2
  return window * (window + 1) // 2 + (seq_len - window) * window


def train_flops_per_step(setup) -> float:
  cfg = setup.config
  tokens = cfg.train.batch_size * cfg.data.seq_len
  matmul = 6.0 * setup.matmul_param_count() * tokens
  mixers = sum(registry.get(name).flops(cfg, cfg.data.seq_len) for name in setup.layer_names)
  return matmul + 3.0 * mixers * cfg.train.batch_size


def peak_flops(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return value
  return None
