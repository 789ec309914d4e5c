"""Sweeps: grid expansion with readable names, local runs, skipping finished runs, one results table."""
import csv
import os

import ml_collections

from longctx import sweep
from tests.conftest import ROOT, run_script

SWEEP_FILE = '''
import ml_collections
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.base = {base!r}
  c.grid = ml_collections.ConfigDict({{'model.hybrid.ratio': ['1:0', '1:1']}}, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({{'train.num_steps': 3, 'train.eval_every': 0, 'train.checkpoint_every': 0,
                                       'model.d_model': 32, 'model.num_layers': 2, 'data.seq_len': 32,
                                       'train.batch_size': 2, 'train.progress_bar': False, 'data.source': 'mqar',
                                       'model.vocab_size': 512, 'data.mqar.vocab': 512, 'data.mqar.num_pairs': 4,
                                       'model.linear.chunk_size': 16}}, allow_dotted_keys=True)
  c.evals = ['mqar --batches 1']
  return c
'''


def test_grid_expands_to_named_runs_with_fixed_overrides():
  c = ml_collections.ConfigDict()
  c.grid = ml_collections.ConfigDict({'train.learning_rate': [1e-3, 3e-3], 'seed': [0, 1, 2]}, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({'train.num_steps': 7}, allow_dotted_keys=True)
  runs = sweep.expand(c)
  assert len(runs) == 6 and len({r['name'] for r in runs}) == 6
  assert 'learning_rate=0.003' in runs[-1]['name'] and 'seed=2' in runs[-1]['name']
  assert all(r['overrides']['train.num_steps'] == 7 for r in runs)


def test_sweep_runs_evaluates_gathers_skips_finished_runs_and_the_notebook_plots_it(tmp_path, monkeypatch):
  path = tmp_path / 'sweep.py'
  path.write_text(SWEEP_FILE.format(base=os.path.join(ROOT, 'configs', 'hybrid.py') + ':linear=gla,size=tiny'))
  workdir = tmp_path / 'runs'
  args = ['scripts/sweep.py', '--sweep', str(path), '--workdir', str(workdir), '--runs_per_device', '2']
  first = run_script(args, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and all(r['done'] == 'True' and int(r['step']) == 3 for r in rows)
  assert sorted(float(r['attention_fraction']) for r in rows) == [0.0, 0.5]
  assert all(0 <= float(r['mqar_accuracy']) == float(r['mqar@32:4']) <= 1 for r in rows)
  assert (workdir / 'results.md').exists()
  second = run_script(args, timeout=600)
  assert second.returncode == 0 and second.stdout.count('skip ') == 2 and 'evaluate ' not in second.stdout
  import nbclient
  import nbformat
  monkeypatch.setenv('LONGCTX_SWEEP', str(workdir))
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'hybrid_ratio_sweep.ipynb'), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': ROOT}}).execute()
  printed = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
  assert '2 finished runs' in printed and 'recall: mqar_accuracy' in printed
  assert (workdir / 'hybrid_ratio.png').exists()


def test_joined_grid_keys_vary_together():
  c = ml_collections.ConfigDict()
  c.grid = ml_collections.ConfigDict({'model.hybrid.linear': ['gla', 'hgrn'],
                                      'model.hybrid.ratio+model.num_layers': [('1:0', 2), ('3:1', 4)]},
                                     allow_dotted_keys=True)
  runs = sweep.expand(c)
  assert len(runs) == 4 and runs[1]['name'] == 'linear=gla,ratio=3:1,num_layers=4'
  assert runs[1]['overrides'] == {'model.hybrid.linear': 'gla', 'model.hybrid.ratio': '3:1', 'model.num_layers': 4}


def test_shipped_sweeps_expand_into_valid_configs():
  import os
  from longctx import config as config_lib
  from tests.conftest import ROOT
  for name in ('learning_rate.py', 'hybrid_ratio.py', 'hybrid_ratio.py:scale=small,linear=gla', 'mqar_mixers.py',
               'mqar_mixers.py:scale=small,steps=8000,batch=256,lr=0.003', 'mqar_mixers.py:ratio=1:0',
               'titans_wirings.py', 'titans_wirings.py:niah=0.25,steps=2000,batch=32,scored=answer', 'mqar_titans.py',
               'mqar_titans.py:scale=small'):
    spec = config_lib.load_file(os.path.join(ROOT, 'configs', 'sweeps', name))
    for run in sweep.expand(spec):
      cfg = config_lib.override(config_lib.load_file(os.path.join(ROOT, spec.base)), run['overrides'])
      config_lib.validate(cfg, 1)


def test_a_sweep_needs_at_least_one_slot(tmp_path):
  result = run_script(['scripts/sweep.py', '--sweep', 'configs/sweeps/learning_rate.py', '--workdir', str(tmp_path),
                       '--runs_per_device', '0'], timeout=120)
  assert result.returncode == 2 and '--runs_per_device' in result.stderr and 'a count >= 1' in result.stderr
