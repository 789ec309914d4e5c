"""MQAR recall of a run (Zoology's definition, `longctx.data.mqar`): accuracy at the answer positions over fresh
validation rows, at the run's own (length, pairs) and at any other grid point, e.g. Zoology's
(64, 4), (128, 8), (256, 16), (512, 64)."""
from __future__ import annotations

from longctx import data
from longctx.config import ConfigError
from longctx.eval import perplexity
from longctx.eval import run as run_lib
from longctx.parallel.mesh import batch_sharding
from longctx.train.step import make_eval_step

ZOOLOGY_GRID = ((64, 4), (128, 8), (256, 16), (512, 64))

# MQAR training settings for sweeps (configs/sweeps/*): Zoology's task at d 128 ('paper'), and a CPU-sized one.
SWEEP_SCALES = {
    #        vocab seq_len pairs d_model heads steps batch lr    eval grid
    'paper': (8192, 256, 16, 128, 2, 3000, 64, 1e-3, '256:16,512:64'),
    'small': (512, 64, 4, 64, 2, 1500, 32, 3e-3, '64:4,128:8'),
}


def sweep_settings(variant) -> tuple[dict, list[str]]:
  """(fixed config overrides, evaluations) of an MQAR sweep from its variant: `scale`, and `steps`, `batch`, `lr`
  (0: the scale's own). The evaluation scores the training point and twice the length with more pairs.

  Every layer of every model gets a short convolution in front of its mixer, softmax attention included
  (`model.attention.conv_size` 4): Zoology's MQAR models have one, and without it attention must first learn to
  attend to the previous token, which takes it many epochs at these widths while the linear mixers (whose short
  convolution is part of their design) bind keys to values at once. Runs save every 500 steps, so a sweep that is
  stopped resumes each unfinished run from its last save."""
  if variant.scale not in SWEEP_SCALES:
    raise ConfigError('--sweep variant scale', variant.scale, f'one of {", ".join(SWEEP_SCALES)}')
  vocab, seq_len, pairs, d_model, heads, steps, batch, lr, grid = SWEEP_SCALES[variant.scale]
  fixed = {
      'data.source': 'mqar', 'model.vocab_size': vocab, 'data.mqar.vocab': vocab, 'data.seq_len': seq_len,
      'data.mqar.num_pairs': pairs, 'model.d_model': d_model, 'model.num_heads': heads, 'model.num_kv_heads': heads,
      'model.mlp_dim': 2 * d_model, 'train.num_steps': variant.steps or steps,
      'train.batch_size': variant.batch or batch, 'train.learning_rate': variant.lr or lr,
      'train.warmup_steps': 100, 'train.eval_every': 0, 'train.checkpoint_every': 500, 'train.progress_bar': False,
      'model.linear.chunk_size': min(64, seq_len), 'model.attention.conv_size': 4,
  }
  return fixed, [f'mqar --grid {grid} --batches 8']


def evaluate(workdir: str, grid, batches: int = 4, weights=None) -> dict:
  """grid: (seq_len, num_pairs) pairs; weights: reuse weights already loaded for this run."""
  rows = []
  for seq_len, pairs in grid:
    run = run_lib.load(workdir, {'data.source': 'mqar', 'data.seq_len': seq_len, 'data.mqar.num_pairs': pairs},
                       weights=weights)
    if run.config.model.vocab_size < run.config.data.mqar.vocab:
      raise ConfigError('model.vocab_size', run.config.model.vocab_size,
                        f'at least data.mqar.vocab={run.config.data.mqar.vocab} to evaluate MQAR')
    weights = run.weights
    eval_step, buckets = make_eval_step(run.setup)
    result = perplexity.evaluate(eval_step, buckets, weights, perplexity.validation(run.config, batches),
                                 batch_sharding(run.setup.mesh), data.is_byte_level(run.config))
    rows.append({'seq_len': seq_len, 'num_pairs': pairs, 'accuracy': result['accuracy'], 'answers': result['tokens']})
  return {'task': 'mqar', 'rows': rows}


def table(result: dict) -> str:
  lines = ['| seq_len | pairs | answers | accuracy |', '|---|---|---|---|']
  lines += [f'| {r["seq_len"]} | {r["num_pairs"]} | {r["answers"]} | {r["accuracy"]:.4f} |' for r in result['rows']]
  return '\n'.join(lines)
