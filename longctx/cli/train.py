"""longctx-train / scripts/train.py: train a config in a workdir, resuming whatever the workdir holds.

  python scripts/train.py --config configs/default.py --workdir /tmp/run [--config.train.num_steps=500 ...]
  python scripts/train.py --config ... --workdir /tmp/run --replay_halt [--config.model.linear.kernel=jax ...]

A run halted by a non-finite step leaves the step's state, batch and gradient report in WORKDIR/halt
(longctx.train.halt); --replay_halt recomputes that report under the given config and prints it, trains nothing.
"""
from __future__ import annotations

import jax
from absl import app, flags, logging

from longctx import config as config_lib
from longctx.cli import common

common.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, TensorBoard logs')
_REPLAY = flags.DEFINE_bool('replay_halt', False, 'recompute the gradient report of WORKDIR/halt and print it')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  common.quiet_library_logs()
  from longctx.parallel import distributed
  distributed.initialize()
  config = common.load_config(jax.device_count())
  from longctx.train.loop import IncompatibleCheckpoint, TrainingHalted, train
  if _REPLAY.value:
    import json
    from longctx.train import halt
    try:
      report = halt.replay(config, _WORKDIR.value)
    except FileNotFoundError as e:
      common.fail(str(e), 2)
    print(json.dumps({k: v for k, v in report.items() if k != 'gradient_norms'}, indent=1))
    return
  try:
    final = train(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  except IncompatibleCheckpoint as e:
    common.fail(str(e), 2)
  except TrainingHalted as e:
    common.fail(str(e), 1)
  logging.info('finished at step %d: %s', final['step'], final)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()
