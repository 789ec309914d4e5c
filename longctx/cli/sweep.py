"""longctx-sweep / scripts/sweep.py: expand a grid of config overrides into runs, run them, gather one table.

  python scripts/sweep.py --sweep configs/sweeps/learning_rate.py --workdir runs/lr [--parallel 2]
  python scripts/sweep.py --sweep configs/sweeps/mqar_mixers.py --workdir runs/mqar --runs_per_device 6   # one GPU
  python scripts/sweep.py --sweep ... --workdir gs://bucket/lr --emit tpu --tpu_name NAME --zone ZONE

See longctx/sweep.py for the sweep file. `--parallel K` spreads runs over K local devices (CUDA_VISIBLE_DEVICES),
`--runs_per_device N` puts N small runs on each; a run's evaluations follow its training in its slot. Results go to WORKDIR/results.csv and results.md. `--emit tpu` prints one launch command
per run instead of running anything.
"""
from __future__ import annotations

import os

from absl import app, flags

from longctx import config as config_lib
from longctx import sweep
from longctx.cli import common

_SWEEP = flags.DEFINE_string('sweep', None, 'sweep file: get_config() -> base, grid, fixed')
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory holding one subdirectory per run')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'runs at a time, each on its own local device')
_PER_DEVICE = flags.DEFINE_integer('runs_per_device', 1, 'runs sharing each device (small models), each with '
                                   'an equal share of its memory')
_EMIT = flags.DEFINE_enum('emit', 'local', ['local', 'tpu'], 'run locally, or print TPU pod launch commands')
_TPU_NAME = flags.DEFINE_string('tpu_name', 'TPU_NAME', 'TPU VM name for --emit tpu')
_ZONE = flags.DEFINE_string('zone', 'ZONE', 'TPU zone for --emit tpu')
_REPO = flags.DEFINE_string('repo', '~/longctx', 'checkout path on the TPU workers for --emit tpu')
flags.mark_flags_as_required(['sweep', 'workdir'])


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  try:
    for name, flag in (('--parallel', _PARALLEL), ('--runs_per_device', _PER_DEVICE)):
      if flag.value < 1:
        raise config_lib.ConfigError(name, flag.value, 'a count >= 1')
    spec = config_lib.load_file(_SWEEP.value)
    if 'base' not in spec:
      raise config_lib.ConfigError('base', None, 'a config spec (file.py[:variant]) in the sweep file')
    runs = sweep.expand(spec)
    evals = list(spec.get('evals', ()))
    for e in evals:
      sweep.eval_task(e)
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  if _EMIT.value == 'tpu':
    print('\n'.join(sweep.tpu_commands(spec.base, _WORKDIR.value, runs, _TPU_NAME.value, _ZONE.value, _REPO.value,
                                        evals)))
    return
  os.makedirs(_WORKDIR.value, exist_ok=True)
  sweep.run_local(spec.base, _WORKDIR.value, runs, _PARALLEL.value, evals, _PER_DEVICE.value)
  sweep.gather(_WORKDIR.value, runs)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()
