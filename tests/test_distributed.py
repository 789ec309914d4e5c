"""Multi-process training on localhost: 2 processes × 4 fake CPU devices (jax.distributed, gloo) train, checkpoint,
stop, resume, evaluate and reach the parameters of 1 process × 8 devices that never stopped."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import ROOT, child_env, small_config
from tests.test_train import final_state

ARGS = ['--config', os.path.join(ROOT, 'configs', 'default.py'), '--config.data.source=mqar',
        '--config.data.mqar.vocab=64', '--config.model.vocab_size=64', '--config.data.seq_len=32',
        '--config.data.mqar.num_pairs=4', '--config.model.d_model=32', '--config.model.num_heads=2',
        '--config.model.num_kv_heads=2', '--config.model.mlp_dim=64', '--config.train.batch_size=8',
        '--config.train.num_steps=6', '--config.train.warmup_steps=1', '--config.train.checkpoint_every=3',
        '--config.train.eval_every=6', '--config.train.eval_batches=1', '--config.train.progress_bar=False',
        '--config.model.attention.chunk_size=32', '--config.data.num_threads=1']
OVERRIDES = {'data.source': 'mqar', 'data.mqar.vocab': 64, 'model.vocab_size': 64, 'data.seq_len': 32,
             'data.mqar.num_pairs': 4, 'model.d_model': 32, 'model.num_heads': 2, 'model.num_kv_heads': 2,
             'model.mlp_dim': 64, 'train.batch_size': 8, 'train.num_steps': 6, 'model.attention.chunk_size': 32}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, processes, devices_each, extra=()):
  port = free_port()
  procs = []
  for i in range(processes):
    env = child_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_each}', JAX_PLATFORMS='cpu')
    if processes > 1:
      env.update(LONGCTX_COORDINATOR_ADDRESS=f'localhost:{port}', LONGCTX_NUM_PROCESSES=str(processes),
                 LONGCTX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, 'scripts/train.py', '--workdir', str(workdir), *ARGS, *extra],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


def test_two_processes_stop_and_resume_to_the_parameters_of_one_process(tmp_path):
  launch(tmp_path / 'one', 1, 8)
  launch(tmp_path / 'two', 2, 4, ['--config.train.stop_after=3'])
  launch(tmp_path / 'two', 2, 4)
  cfg = small_config(**OVERRIDES)
  a, step_a = final_state(cfg, str(tmp_path / 'one'))
  b, step_b = final_state(cfg, str(tmp_path / 'two'))
  assert step_a == step_b == 6
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_a_single_process_does_not_start_jax_distributed_and_partial_settings_are_refused(monkeypatch):
  import pytest
  from longctx.parallel import distributed
  for name in ('LONGCTX_NUM_PROCESSES', 'TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  monkeypatch.setenv('LONGCTX_NUM_PROCESSES', '1')
  assert distributed.initialize() is False
  monkeypatch.setenv('LONGCTX_NUM_PROCESSES', '2')
  monkeypatch.delenv('LONGCTX_COORDINATOR_ADDRESS', raising=False)
  with pytest.raises(ValueError, match='LONGCTX_COORDINATOR_ADDRESS'):
    distributed.initialize()
