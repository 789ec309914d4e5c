"""longctx-eval / scripts/evaluate.py: evaluations of a run's newest checkpoint.

  python scripts/evaluate.py [perplexity] --workdir RUN [--batches 16] [--seq_len 1024]
  python scripts/evaluate.py mqar --workdir RUN [--grid 64:4,128:8,256:16,512:64] [--batches 4]
  python scripts/evaluate.py niah --workdir RUN [--lengths 512,1024] [--depths 0,0.25,0.5,0.75,1] [--samples 8]

perplexity: validation loss, accuracy and both by in-document position (--seq_len evaluates at another context
length than the run trained at). mqar: recall at each (length, pairs) grid point (default: the run's own). niah:
needle retrieval by context length and depth, for byte-level runs. Writes WORKDIR/eval_TASK.json and .md (or
--output PATH.json and PATH.md) and prints the table.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from longctx import config as config_lib
from longctx.cli import common

TASKS = ('perplexity', 'mqar', 'niah')

_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory to evaluate')
_BATCHES = flags.DEFINE_integer('batches', 8, 'perplexity, mqar: validation batches of train.batch_size rows')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'perplexity: evaluation context length (0: the training length)')
_GRID = flags.DEFINE_string('grid', '', 'mqar: comma-separated seq_len:pairs points (default: the run\'s own)')
_LENGTHS = flags.DEFINE_string('lengths', '', 'niah: comma-separated context lengths (default: data.seq_len)')
_DEPTHS = flags.DEFINE_string('depths', '0,0.25,0.5,0.75,1', 'niah: comma-separated needle depths in [0, 1]')
_SAMPLES = flags.DEFINE_integer('samples', 8, 'niah: rows per length and depth')
_OUTPUT = flags.DEFINE_string('output', '', 'JSON path (default WORKDIR/eval_TASK.json); the table goes next to it')
flags.mark_flag_as_required('workdir')


def _numbers(flag: str, text: str, kind):
  try:
    return [kind(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise config_lib.ConfigError(flag, text, f'comma-separated {kind.__name__} values') from None


def _grid(text: str, config):
  if not text:
    return [(config.data.seq_len, config.data.mqar.num_pairs)]
  try:
    return [tuple(int(v) for v in point.split(':')) for point in text.split(',')]
  except ValueError:
    raise config_lib.ConfigError('--grid', text, 'comma-separated seq_len:pairs points, e.g. 64:4,256:16') from None


def perplexity_run(workdir: str, batches: int, seq_len: int = 0) -> dict:
  from longctx import data
  from longctx.eval import perplexity, run as run_lib
  from longctx.parallel.mesh import batch_sharding
  from longctx.train.step import make_eval_step

  run = run_lib.load(workdir, {'data.seq_len': seq_len} if seq_len else None)
  eval_step, buckets = make_eval_step(run.setup)
  result = perplexity.evaluate(eval_step, buckets, run.weights, perplexity.validation(run.config, batches),
                               batch_sharding(run.setup.mesh), data.is_byte_level(run.config))
  return {'task': 'perplexity', 'workdir': workdir, 'seq_len': run.config.data.seq_len, 'batches': batches,
          **result}


def perplexity_table(result: dict) -> str:
  lines = [f'validation loss {result["loss"]:.4f}, accuracy {result["accuracy"]:.4f} over {result["tokens"]} '
           f'scored tokens (seq_len {result["seq_len"]})',
           '| positions | tokens | loss | accuracy |', '|---|---|---|---|']
  lines += [f'| {r["positions"]} | {r["tokens"]} | {r["loss"]:.4f} | {r["accuracy"]:.4f} |' if r['loss'] is not None
            else f'| {r["positions"]} | 0 | - | - |' for r in result['by_position']]
  return '\n'.join(lines)


def evaluate(task: str, workdir: str) -> tuple[dict, str]:
  """(result, markdown table) of one task on a run."""
  from longctx.eval import run as run_lib

  if task == 'perplexity':
    result = perplexity_run(workdir, _BATCHES.value, _SEQ_LEN.value)
    return result, perplexity_table(result)
  if task == 'mqar':
    from longctx.eval import mqar
    result = mqar.evaluate(workdir, _grid(_GRID.value, run_lib.load_config(workdir)), _BATCHES.value)
    return {'workdir': workdir, **result}, mqar.table(result)
  from longctx.eval import niah
  run = run_lib.load(workdir)
  lengths = _numbers('--lengths', _LENGTHS.value, int) or [run.config.data.seq_len]
  depths = _numbers('--depths', _DEPTHS.value, float)
  if any(not 0 <= d <= 1 for d in depths):
    raise config_lib.ConfigError('--depths', _DEPTHS.value, 'depths in [0, 1]')
  result = niah.evaluate(run, lengths, depths, _SAMPLES.value)
  return {'workdir': workdir, **result}, niah.table(result)


def main(argv):
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in TASKS):
    config_lib.exit_with(config_lib.ConfigError('task', ' '.join(argv[1:]), f'one of {", ".join(TASKS)}'))
  task = argv[1] if len(argv) == 2 else 'perplexity'
  common.quiet_library_logs()
  try:
    result, table = evaluate(task, _WORKDIR.value)
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  except FileNotFoundError as e:
    common.fail(str(e), 2)
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, f'eval_{task}.json')
  with open(output, 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(output)[0] + '.md', 'w') as f:
    f.write(table + '\n')
  print(table)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()
