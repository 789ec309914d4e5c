"""Sweeps: a grid of config overrides expanded into named runs, run locally K at a time, gathered into one table.

A sweep file's get_config returns `base` (a config spec), `grid` (key -> list of values), `fixed` (key -> value)
and optionally `evals`: evaluations to run on each finished run, as `scripts/evaluate.py` arguments ('mqar',
'niah --lengths 512,1024', ...). Each combination becomes a run in WORKDIR/NAME, NAME spelling its values
(`learning_rate=0.003,seed=1`). Finished runs (marked DONE) are skipped; interrupted ones resume from their
checkpoints; evaluations already written (WORKDIR/NAME/eval_TASK.json) are not repeated. The table holds each run's
overrides, its last training and validation metrics, the share of attention layers in its stack
(`attention_fraction`) and each evaluation's headline number (`mqar_accuracy`, `niah_accuracy`, `eval_loss`) with
its points (`mqar@L:N`, `niah@L`).
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

import ml_collections

from longctx import config as config_lib

TABLE_KEYS = ('step', 'loss', 'bits_per_byte', 'val_loss', 'val_bits_per_byte', 'tokens_per_s', 'mfu')


def _value_text(v) -> str:
  return f'{v:g}' if isinstance(v, float) else str(v)


def expand(sweep) -> list[dict]:
  """[{'name', 'overrides'}] for every combination of the grid, fixed overrides included.

  A grid key joining several config keys with '+' ('model.hybrid.ratio+model.num_layers') takes tuples of values
  that vary together."""
  grid = {k: list(v) for k, v in sweep.grid.items()} if 'grid' in sweep else {}
  for key, values in grid.items():
    if not values:
      raise config_lib.ConfigError(f'grid.{key}', values, 'a non-empty list of values')
    width = len(key.split('+'))
    if width > 1 and any(not isinstance(v, (tuple, list)) or len(v) != width for v in values):
      raise config_lib.ConfigError(f'grid.{key}', values, f'a list of {width}-tuples, one value per joined key')
  fixed = dict(sweep.fixed.items()) if 'fixed' in sweep else {}
  runs = []
  for combo in itertools.product(*grid.values()) if grid else [()]:
    chosen = {}
    for key, value in zip(grid, combo):
      chosen.update(zip(key.split('+'), value) if '+' in key else [(key, value)])
    name = ','.join(f'{k.split(".")[-1]}={_value_text(v)}' for k, v in chosen.items()) or 'base'
    runs.append({'name': name, 'overrides': {**fixed, **chosen}})
  if len({r['name'] for r in runs}) != len(runs):
    keys = {part for key in grid for part in key.split('+')}
    runs = [{**r, 'name': ','.join(f'{k}={_value_text(v)}' for k, v in r['overrides'].items() if k in keys)}
            for r in runs]
  return runs


def train_args(base: str, workdir: str, overrides: dict) -> list[str]:
  return (['--config', base, '--workdir', workdir] +
          [f'--config.{k}={_value_text(v)}' for k, v in overrides.items()])


def last_rows(workdir: str) -> dict:
  """The run's last training row merged with its last validation row."""
  path = os.path.join(workdir, 'metrics.jsonl')
  out: dict = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        out.update({k: v for k, v in row.items() if k in TABLE_KEYS})
  return out


ATTENTION_MIXERS = ('attention', 'swa')


def eval_task(spec: str) -> str:
  task = spec.split()[0] if spec.split() else ''
  if task not in ('perplexity', 'mqar', 'niah'):
    raise config_lib.ConfigError('evals', spec, 'evaluate.py arguments starting with perplexity, mqar or niah')
  return task


def eval_args(spec: str, rundir: str) -> list[str]:
  return shlex.split(spec)[:1] + ['--workdir', rundir] + shlex.split(spec)[1:]


def eval_summary(rundir: str) -> dict:
  """Headline numbers of the run's evaluation files, and the share of attention layers in its stack."""
  out = {}
  path = os.path.join(rundir, 'config.json')
  if os.path.exists(path):
    from longctx.models.pattern import resolve
    with open(path) as f:
      model = json.load(f)['model']
    hybrid = ml_collections.ConfigDict(model['hybrid']) if 'hybrid' in model else None
    names = resolve(model['pattern'], model['num_layers'], hybrid)
    out['attention_fraction'] = sum(n in ATTENTION_MIXERS for n in names) / len(names)
  for task, key, pick in (('mqar', 'mqar_accuracy', lambda r: sum(x['accuracy'] for x in r['rows']) / len(r['rows'])),
                          ('niah', 'niah_accuracy', lambda r: r['accuracy']),
                          ('perplexity', 'eval_loss', lambda r: r['loss'])):
    path = os.path.join(rundir, f'eval_{task}.json')
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      out[key] = pick(result)
      out.update(_by_point(task, result))
  return out


def _by_point(task: str, result: dict) -> dict:
  """Per-point columns: MQAR accuracy at each (length, pairs) `mqar@L:N`, S-NIAH accuracy at each length over its
  depths `niah@L`."""
  if task == 'mqar':
    return {f'mqar@{r["seq_len"]}:{r["num_pairs"]}': r['accuracy'] for r in result['rows']}
  if task == 'niah':
    lengths = sorted({r['length'] for r in result['rows']})
    return {f'niah@{n}': sum(r['accuracy'] for r in result['rows'] if r['length'] == n) /
            sum(r['length'] == n for r in result['rows']) for n in lengths}
  return {}


def gather(workdir: str, runs: list[dict]) -> list[dict]:
  table = []
  for run in runs:
    rundir = os.path.join(workdir, run['name'])
    table.append({'run': run['name'], 'done': os.path.exists(os.path.join(rundir, 'DONE')),
                  **{k: run['overrides'][k] for k in run['overrides']}, **last_rows(rundir), **eval_summary(rundir)})
  keys = list(dict.fromkeys(k for row in table for k in row))
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(table)
  cell = lambda v: f'{v:.4g}' if isinstance(v, float) else ('' if v is None else str(v))
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(cell(row.get(k)) for k in keys) + ' |' for row in table]
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return table


def _job(workdir: str, base: str, run: dict, evals) -> list[tuple[str, list[str], str]]:
  """What a run still needs, in order: (log file, command, what it is) for training and each missing evaluation."""
  rundir = os.path.join(workdir, run['name'])
  steps = []
  if not os.path.exists(os.path.join(rundir, 'DONE')):
    steps.append(('train.log', [sys.executable, '-m', 'longctx.cli.train'] + train_args(base, rundir, run['overrides']),
                  'train'))
  for spec in evals:
    if not os.path.exists(os.path.join(rundir, f'eval_{eval_task(spec)}.json')):
      steps.append(('eval.log', [sys.executable, '-m', 'longctx.cli.evaluate'] + eval_args(spec, rundir),
                    f'evaluate {eval_task(spec)}'))
  return steps


def run_local(base: str, workdir: str, runs: list[dict], parallel: int, evals=(), runs_per_device: int = 1) -> None:
  """Runs `parallel × runs_per_device` runs at a time: slot i sees only local device i // runs_per_device
  (CUDA_VISIBLE_DEVICES, and a share of its memory when several runs share it). A run trains, then its evaluations
  follow in the same slot; a failed training skips its evaluations."""
  jobs = [(run, _job(workdir, base, run, evals)) for run in runs]
  for run, steps in jobs:
    if not steps:
      print(f'skip {run["name"]} (done)', flush=True)
  pending = [(run, steps) for run, steps in jobs if steps]
  active: list[tuple[dict, list, subprocess.Popen, int, str]] = []
  free = list(range(parallel * runs_per_device))

  def start(run, steps, slot):
    rundir = os.path.join(workdir, run['name'])
    os.makedirs(rundir, exist_ok=True)
    env = dict(os.environ)
    if parallel > 1 or runs_per_device > 1:
      env['CUDA_VISIBLE_DEVICES'] = str(slot // runs_per_device)
    if runs_per_device > 1:
      env.update(XLA_PYTHON_CLIENT_PREALLOCATE='false',
                 XLA_PYTHON_CLIENT_MEM_FRACTION=f'{0.9 / runs_per_device:.3f}')
    (log, cmd, what), rest = steps[0], steps[1:]
    print(f'{what} {run["name"]}: {shlex.join(cmd)}', flush=True)
    with open(os.path.join(rundir, log), 'a') as f:
      active.append((run, rest, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), slot, what))

  while pending or active:
    while pending and free:
      run, steps = pending.pop(0)
      start(run, steps, free.pop(0))
    time.sleep(0.5)
    for item in list(active):
      run, rest, proc, slot, what = item
      if proc.poll() is None:
        continue
      active.remove(item)
      rundir = os.path.join(workdir, run['name'])
      if proc.returncode:
        print(f'FAILED {what} {run["name"]} (exit {proc.returncode}); see {rundir}', flush=True)
        rest = [] if what == 'train' else rest
      else:
        if what == 'train':
          open(os.path.join(rundir, 'DONE'), 'w').close()
        print(f'done {what} {run["name"]}', flush=True)
      if rest:
        start(run, rest, slot)
      else:
        free.append(slot)


def tpu_commands(base: str, workdir: str, runs: list[dict], tpu_name: str, zone: str, repo: str,
                 evals=()) -> list[str]:
  """One `gcloud compute tpus tpu-vm ssh ... --worker=all` launch command per run (training, then evaluations)."""
  out = []
  for run in runs:
    rundir = f'{workdir.rstrip("/")}/{run["name"]}'
    inner = f'cd {repo} && python3 scripts/train.py ' + shlex.join(train_args(base, rundir, run['overrides']))
    for spec in evals:
      inner += ' && python3 scripts/evaluate.py ' + shlex.join(eval_args(spec, rundir))
    out.append(shlex.join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu_name, f'--zone={zone}', '--worker=all',
                           f'--command={inner}']))
  return out
