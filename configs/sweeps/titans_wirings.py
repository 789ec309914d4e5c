"""Titans' wirings against the dense baseline at equal steps on the byte-level corpus: LMM, MAC, MAG, MAL and
softmax attention, each trained the same number of steps, then scored by loss and single-needle retrieval at the
training length and beyond it.

  python scripts/sweep.py --sweep configs/sweeps/titans_wirings.py --workdir runs/titans          # tiny, 4 layers
  python scripts/sweep.py --sweep configs/sweeps/titans_wirings.py:size=340m --workdir runs/titans340m

Variants: size (configs/titans.py's sizes), steps, batch (0: the size's), niah (data.niah_fraction: that share of
the training rows carry a needle and its question, so that a small model learns the retrieval format it is then
scored on at the training length, 2× and 4×; 0 scores it zero-shot). Each run is configs/titans.py at that size with
the layer pattern and persistent tokens of one wiring (`model.pattern + model.attention.persistent_tokens` vary
together); MAL alternates memory and sliding-window layers.
"""
import ml_collections

from longctx.config import parse_variant

PERSISTENT = {'tiny': 4}


def get_config(arg=None):
  variant = parse_variant(arg, size='tiny', steps=300, batch=0, niah=0.0)
  layers = {'tiny': 4, '170m': 12}.get(variant.size, 24)
  persistent = PERSISTENT.get(variant.size, 128)
  seq_len = 256 if variant.size == 'tiny' else 4096
  c = ml_collections.ConfigDict()
  c.base = f'configs/titans.py:size={variant.size}'
  c.grid = ml_collections.ConfigDict({
      'model.pattern+model.attention.persistent_tokens': [
          ('attention', 0), ('titans', 0), ('titans_mac', persistent), ('titans_mag', persistent),
          (','.join(['titans', 'swa'] * (layers // 2)), persistent)],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({
      'data.source': 'stdlib', 'train.num_steps': variant.steps, 'train.eval_every': 0,
      'train.checkpoint_every': 0, 'train.progress_bar': False, 'seed': 0, 'data.niah_fraction': variant.niah,
      **({'train.batch_size': variant.batch} if variant.batch else {}),
  }, allow_dotted_keys=True)
  c.evals = ['perplexity --batches 4', f'niah --lengths {seq_len},{2 * seq_len},{4 * seq_len} --samples 8']
  return c
