"""Recall of every mixer on MQAR (Zoology), pure and as a 3:1 hybrid, at one training budget.

  python scripts/sweep.py --sweep configs/sweeps/mqar_mixers.py --workdir runs/mqar          # L 256, N 16, d 128
  python scripts/sweep.py --sweep configs/sweeps/mqar_mixers.py:scale=small --workdir runs/mqar64  # L 64, N 4, d 64, vocab 512

Each mixer fills the linear slot of configs/hybrid.py; 'attention' there gives the softmax-attention baseline.
Pure stacks have Zoology's 2 layers; a 3:1 hybrid needs a group of 4 (three linear layers, one attention layer).
Every run is scored on MQAR at its training (L, N) and at twice the length with more pairs. Variants scale
(longctx.eval.mqar.SWEEP_SCALES), steps, batch, lr (a bigger budget: `scale=paper,steps=8000,batch=256,lr=0.003`),
and ratio (both | 1:0 | 3:1: only the pure stacks or only the hybrids).
"""
import ml_collections

from longctx.config import ConfigError, parse_variant
from longctx.eval.mqar import sweep_settings

MIXERS = ['attention', 'hgrn', 'retnet', 'gla', 'hgrn2', 'deltanet', 'gated_deltanet', 'lightning', 'mamba2']


def get_config(arg=None):
  variant = parse_variant(arg, scale='paper', steps=0, batch=0, lr=0.0, ratio='both')
  fixed, evals = sweep_settings(variant)
  stacks = {'1:0': [('1:0', 2)], '3:1': [('3:1', 4)]}
  stacks['both'] = stacks['1:0'] + stacks['3:1']
  if variant.ratio not in stacks:
    raise ConfigError('--sweep variant ratio', variant.ratio, 'both, 1:0 or 3:1')
  c = ml_collections.ConfigDict()
  c.base = 'configs/hybrid.py:size=tiny'
  c.grid = ml_collections.ConfigDict({
      'model.hybrid.linear': MIXERS,
      'model.hybrid.ratio+model.num_layers': stacks[variant.ratio],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({**fixed, 'seed': 0}, allow_dotted_keys=True)
  c.evals = evals
  return c
