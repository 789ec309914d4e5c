"""Training: learns, resumes exactly, survives preemption and damaged checkpoints, halts on non-finite loss."""
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from longctx import config as config_lib
from longctx.parallel.mesh import make_mesh
from longctx.train.checkpoint import Checkpoints
from longctx.train.loop import IncompatibleCheckpoint, TrainingHalted, train
from longctx.train.state import TrainSetup
from tests.conftest import ROOT, child_env, load_config, run_script, small_config


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def final_state(cfg, workdir):
  setup = TrainSetup(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
  manager = Checkpoints(os.path.join(workdir, 'checkpoints'))
  state, step = manager.restore_latest(setup.abstract_state)
  manager.close()
  return state, step


def test_loss_falls_on_the_default_config_within_60_steps(tmp_path):
  cfg = load_config(**{'train.num_steps': 60, 'train.eval_every': 0, 'train.progress_bar': False,
                       'data.num_threads': 2})
  train(cfg, str(tmp_path))
  losses = [r['loss'] for r in rows(tmp_path) if 'loss' in r]
  # The first logged loss (step 10) is above 6 nats; by step 60 the model has the corpus' byte statistics (≈ 2.8).
  assert losses[-1] < losses[0] - 2.0, losses
  assert losses[-1] < 3.2, losses


def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  cfg = small_config()
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  train(cfg, straight)
  first = train(small_config(**{'train.stop_after': 20}), split)
  assert first['step'] == 20
  train(cfg, split)
  a, step_a = final_state(cfg, straight)
  b, step_b = final_state(cfg, split)
  assert step_a == step_b == 40
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Every logged step after the resume saw the same batch (same loss to the bit).
  late = lambda w: [(r['step'], r['loss']) for r in rows(w) if 'loss' in r and r['step'] > 20]
  assert late(straight) == late(split)


def test_sigterm_saves_a_restorable_checkpoint_and_exits_0(tmp_path):
  workdir = str(tmp_path)
  args = [sys.executable, 'scripts/train.py', '--config', 'configs/default.py', '--workdir', workdir,
          '--config.train.num_steps=100000', '--config.train.log_every=1', '--config.train.eval_every=0',
          '--config.train.checkpoint_every=0', '--config.train.progress_bar=False', '--config.model.d_model=64',
          '--config.data.seq_len=64']
  proc = subprocess.Popen(args, cwd=ROOT, env=child_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  logged = lambda: len(pathlib.Path(metrics).read_text().splitlines()) if os.path.exists(metrics) else 0
  while time.time() < deadline and logged() < 3:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  cfg = load_config(**{'model.d_model': 64, 'data.seq_len': 64})
  state, step = final_state(cfg, workdir)
  assert step is not None and step >= 3 and int(state['step']) == step


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
  workdir = str(tmp_path)
  train(small_config(**{'train.num_steps': 30}), workdir)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '30', 'state', '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 3)
  final = train(small_config(**{'train.num_steps': 35}), workdir)
  assert final['step'] == 35
  assert glob.glob(os.path.join(workdir, 'checkpoints', 'corrupt-30-*'))
  logged = [r['step'] for r in rows(workdir) if 'loss' in r]
  assert logged[-2:] == [25, 30] or 25 in logged[logged.index(30) + 1:]   # steps 21..30 were trained again


def test_non_finite_step_halts_keeping_the_checkpoints_and_the_state_before_it_with_a_replayable_report(tmp_path):
  from longctx.train import halt
  steady = {'train.learning_rate': 1e-3, 'train.schedule': 'constant', 'train.warmup_steps': 0}
  # Metrics are read every 10 steps: the failed step is found some steps after it ran.
  exploding = {'train.checkpoint_every': 0, 'train.log_every': 10, 'train.learning_rate': 1e30,
               'train.schedule': 'constant', 'train.warmup_steps': 0}
  workdir, replica = str(tmp_path / 'run'), str(tmp_path / 'replica')
  train(small_config(**{'train.num_steps': 10, **steady}), workdir)
  shutil.copytree(workdir, replica)
  cfg = small_config(**{'train.num_steps': 20, **exploding})
  with pytest.raises(TrainingHalted, match=r'not finite at step (1[1-9]|20).*gradient report') as err:
    train(cfg, workdir)
  failed = err.value.step
  # No checkpoint after the failed step; the good one stays.
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['10']
  with open(os.path.join(workdir, 'halt', 'report.json')) as f:
    report = json.load(f)
  assert report['step'] == failed and (report['non_finite_gradients'] or not np.isfinite(report['loss']))
  assert halt.replay(cfg, workdir)['non_finite_gradients'] == report['non_finite_gradients']
  # The saved state is the one a run that stops just before the failed step ends with.
  manager = Checkpoints(os.path.join(workdir, 'halt'))
  setup = TrainSetup(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
  saved, step = manager.restore_latest(setup.abstract_state)
  manager.close()
  assert step == failed - 1 and int(saved['step']) == failed - 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved['params']))
  if failed - 1 > 10:
    train(small_config(**{'train.num_steps': failed - 1, **exploding}), replica)
  reference, _ = final_state(cfg, replica)
  for x, y in zip(jax.tree.leaves(saved['params']), jax.tree.leaves(reference['params'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_replay_halt_without_a_halted_step_says_so(tmp_path):
  result = run_script(['scripts/train.py', '--config', 'configs/default.py', '--workdir', str(tmp_path),
                       '--replay_halt'])
  assert result.returncode == 2 and 'no halted step saved' in result.stderr, result.stderr[-2000:]


def test_resume_with_an_incompatible_optimizer_state_is_refused_and_keeps_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  train(small_config(**{'train.num_steps': 5}), workdir)
  with pytest.raises(IncompatibleCheckpoint, match='clip_norm'):
    train(small_config(**{'train.num_steps': 10, 'train.clip_norm': 0.0}), workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['5']


def test_skip_policy_steps_over_non_finite_updates(tmp_path):
  cfg = small_config(**{'train.num_steps': 6, 'train.learning_rate': 1e30, 'train.clip_norm': 0.0,
                        'train.schedule': 'constant', 'train.warmup_steps': 0, 'train.nan_policy': 'skip'})
  final = train(cfg, str(tmp_path))
  assert final['step'] == 6 and final['skipped_steps'] > 0


def test_resume_with_a_different_architecture_is_refused(tmp_path):
  train(small_config(**{'train.num_steps': 5}), str(tmp_path))
  with pytest.raises(config_lib.ConfigError) as err:
    train(small_config(**{'train.num_steps': 10, 'model.mlp_dim': 256}), str(tmp_path))
  assert err.value.field == 'model.mlp_dim'


def test_a_workdir_without_checkpoints_accepts_a_new_architecture(tmp_path):
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config_lib.to_json(small_config(**{'model.mlp_dim': 256})))
  assert train(small_config(**{'train.num_steps': 2}), str(tmp_path))['step'] == 2


def test_init_from_loads_another_runs_parameters(tmp_path):
  source, target = str(tmp_path / 'a'), str(tmp_path / 'b')
  cfg = small_config(**{'train.num_steps': 5})
  train(cfg, source)
  frozen = small_config(**{'train.num_steps': 1, 'train.learning_rate': 0.0, 'init_from': source})
  train(frozen, target)
  a, _ = final_state(cfg, source)
  b, _ = final_state(frozen, target)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_evaluate_reports_loss_by_position(tmp_path):
  train(small_config(**{'train.num_steps': 5}), str(tmp_path))
  result = run_script(['scripts/evaluate.py', '--workdir', str(tmp_path), '--batches', '2'])
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / 'eval_perplexity.json').read_text())
  assert np.isfinite(report['loss']) and report['by_position'][0]['positions'] == '0-0'
  assert '| positions | tokens | loss | accuracy |' in result.stdout and 0 <= report['accuracy'] <= 1


def test_profile_steps_write_a_trace(tmp_path):
  train(small_config(**{'train.num_steps': 4, 'train.profile_steps': '2,3'}), str(tmp_path))
  assert glob.glob(os.path.join(tmp_path, 'profile', '**', '*.xplane.pb'), recursive=True)


def test_metric_rows_carry_step_loss_and_throughput(tmp_path):
  train(small_config(**{'train.num_steps': 10, 'train.eval_every': 10}), str(tmp_path))
  logged = rows(tmp_path)
  training = [r for r in logged if 'loss' in r]
  assert [r['step'] for r in training] == [5, 10]
  for key in ('bits_per_byte', 'perplexity', 'learning_rate', 'grad_norm', 'param_norm', 'tokens_per_s', 'step_time'):
    assert np.isfinite(training[-1][key]), key
  assert [r['step'] for r in logged if 'val_loss' in r] == [10]
  assert glob.glob(os.path.join(tmp_path, 'tb', 'events.out.tfevents.*'))


def test_checkpoints_keep_the_newest_k_and_every_mth(tmp_path):
  train(small_config(**{'train.num_steps': 40, 'train.keep': 2, 'train.keep_every': 20}), str(tmp_path))
  steps = sorted(int(n) for n in os.listdir(tmp_path / 'checkpoints') if n.isdigit())
  assert steps == [20, 30, 40]


def test_bench_case_times_the_train_step_of_a_config():
  from longctx.cli.bench import bench_case
  row = bench_case('tiny', small_config(), steps=2, warmup=1)
  assert row['step_ms'] > 0 and np.isfinite(row['loss']) and row['tokens_per_s'] > 0


def test_state_pass_suite_names_the_cases_it_takes():
  from longctx import config as config_lib
  from longctx.cli.bench_linear import bench_state_pass
  with pytest.raises(config_lib.ConfigError) as err:
    bench_state_pass(1, ('fp8',))
  assert err.value.field == '--cases' and err.value.value == 'fp8' and 'tf32, bf16' in err.value.allowed


def test_max_context_raises_a_config_error_instead_of_recording_it_as_the_limit():
  from longctx import config as config_lib
  from longctx.cli.bench import max_context
  cfg = small_config(**{'parallel.sequence': 2 * jax.device_count(), 'parallel.data': 1})
  with pytest.raises(config_lib.ConfigError) as err:
    max_context('tiny', cfg, steps=1, limit=cfg.data.seq_len)
  assert err.value.field.startswith('parallel')
