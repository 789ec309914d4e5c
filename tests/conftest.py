import os
import subprocess
import sys
import tempfile


def _xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows `flag` (an unknown XLA flag aborts the process that starts the backend)."""
  try:
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices("cpu")'], capture_output=True,
                           timeout=120, env={**os.environ, 'XLA_FLAGS': flag, 'JAX_PLATFORMS': 'cpu'})
  except subprocess.TimeoutExpired:
    return False
  return probe.returncode == 0


# Test shapes are tiny, so XLA's compile time dominates: LLVM's cheapest optimisation level about halves it, and
# where this XLA has them, XLA:CPU's loop emitters in place of its MLIR fusion emitters take a further fifth off
# (the sharded Titans step: 44 -> 35 s; jaxlib 0.10 has the flag, 0.11 does not). Set before jax starts its CPU
# backend; the xdist workers and child processes inherit them.
if 'LONGCTX_TEST_XLA_FLAGS' not in os.environ:
  _flags = ['--xla_backend_optimization_level=0']
  if _xla_accepts('--xla_cpu_use_fusion_emitters=false'):
    _flags.append('--xla_cpu_use_fusion_emitters=false')
  _given = os.environ.get('XLA_FLAGS', '')
  _flags = [f for f in _flags if f.split('=')[0] not in _given]
  os.environ['XLA_FLAGS'] = ' '.join([_given] + _flags).strip()
  os.environ['LONGCTX_TEST_XLA_FLAGS'] = '1'

# Every test that trains builds its own jitted step, and scripts run in child processes, so a run compiles the same
# programs many times over; jax's persistent compilation cache, shared by the xdist workers and their children
# through the environment, compiles each once. Private to this user: the cache is trusted code.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = os.path.join(tempfile.gettempdir(), f'longctx-tests-xla-cache-{os.getuid()}')
  os.makedirs(_cache, mode=0o700, exist_ok=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

import pytest  # noqa: E402

from longctx import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg=None, **overrides):
  """configs/default.py with dotted-key overrides, as `--config.a.b=v` would give."""
  path = os.path.join(ROOT, 'configs', 'default.py')
  return config_lib.override(config_lib.load_file(f'{path}:{arg}' if arg else path), overrides)


def small_config(**overrides):
  """A model small enough that a training step takes milliseconds on one CPU core."""
  base = {'model.num_layers': 2, 'model.d_model': 64, 'model.num_heads': 4, 'model.num_kv_heads': 2,
          'model.mlp_dim': 128, 'data.seq_len': 64, 'train.batch_size': 4, 'train.num_steps': 40,
          'train.log_every': 5, 'train.eval_every': 0, 'train.checkpoint_every': 10, 'train.progress_bar': False,
          'data.num_threads': 1, 'data.prefetch': 2, 'model.attention.chunk_size': 32}
  base.update(overrides)
  return load_config(**base)


def child_env(**extra):
  """This environment with the repository first on PYTHONPATH (kept, not replaced: installs may live there)."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p)
  return {**os.environ, 'PYTHONPATH': path, **extra}


def run_script(args, env=None, timeout=300, **kwargs):
  environ = child_env(**(env or {}))
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=environ, timeout=timeout,
                        cwd=ROOT, **kwargs)


def script_json(args, timeout=300):
  """The JSON object a helper script prints on its last line (the script must exit 0)."""
  import json
  result = run_script(args, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def small():
  return small_config
