"""The hybrid-ratio study on MQAR: linear mixer × linear:attention ratio × seed, 2-layer-group models.

  python scripts/sweep.py --sweep configs/sweeps/hybrid_ratio.py --workdir runs/hybrid_ratio

Ratios are r:1 groups of an 8-layer stack (1:0 = no attention; 7:1 = one attention layer; 3:1 = two; 1:1 = four).
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.base = 'configs/hybrid.py:size=tiny'
  c.grid = ml_collections.ConfigDict({
      'model.hybrid.linear': ['hgrn', 'retnet', 'gla', 'hgrn2', 'deltanet', 'gated_deltanet', 'lightning', 'mamba2'],
      'model.hybrid.ratio': ['1:0', '7:1', '3:1', '1:1'],
      'seed': [0],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({
      'model.num_layers': 8, 'data.source': 'mqar', 'model.vocab_size': 8192, 'data.seq_len': 256,
      'data.mqar.num_pairs': 16, 'train.num_steps': 2000, 'train.batch_size': 64, 'train.eval_every': 500,
      'train.eval_batches': 8, 'model.linear.chunk_size': 64,
  }, allow_dotted_keys=True)
  c.evals = ['mqar --grid 256:16,512:64']
  return c
