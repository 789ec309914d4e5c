"""Sampling through the caches, and the recall evaluations (MQAR, S-NIAH) with their scripts."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longctx.data import needles
from longctx.data.sources import BOS
from longctx.eval import niah
from longctx.generate import sample
from longctx.models.transformer import LanguageModel
from longctx.train.loop import train
from tests.conftest import run_script, small_config


@pytest.fixture(scope='module')
def hybrid_model():
  cfg = small_config(**{'model.pattern': 'hgrn2,mamba2,attention', 'model.num_layers': 3,
                        'model.linear.chunk_size': 16})
  return LanguageModel(cfg, rngs=nnx.Rngs(0))


def test_greedy_sampling_follows_the_full_forward(hybrid_model):
  prompt = np.random.default_rng(0).integers(0, 256, (2, 13))
  new = sample(hybrid_model, prompt, 8, temperature=0)
  whole = jnp.asarray(np.concatenate([prompt, new], axis=1))
  logits = hybrid_model(whole, jnp.broadcast_to(jnp.arange(21), (2, 21)), None)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, 12:20]), -1), new)


def test_sampling_options_and_end_of_document(hybrid_model):
  prompt = np.random.default_rng(1).integers(0, 256, (3, 5))
  greedy = sample(hybrid_model, prompt, 6, temperature=0)
  np.testing.assert_array_equal(sample(hybrid_model, prompt, 6, temperature=2.0, top_k=1, seed=4), greedy)
  hot = sample(hybrid_model, prompt, 6, temperature=100.0, seed=4)
  assert hot.shape == (3, 6) and (hot != greedy).any() and (hot < 384).all()
  nucleus = sample(hybrid_model, prompt, 6, temperature=100.0, top_p=1e-6, seed=4)
  np.testing.assert_array_equal(nucleus, greedy)
  stopped = sample(hybrid_model, prompt, 6, temperature=0, eos_id=int(greedy[0, 1]))
  assert (stopped[0, 1:] == greedy[0, 1]).all()


def test_needle_rows_hold_the_needle_at_its_depth_and_score_only_the_value():
  rng = np.random.default_rng(0)
  filler = np.frombuffer(b'lorem ipsum dolor sit amet\n' * 400, np.uint8)
  for depth in (0.0, 0.5, 1.0):
    tokens, mask = needles.make_row(rng, filler, 400, depth)
    text = bytes(tokens[1:].astype(np.uint8))
    assert len(tokens) == 400 and tokens[0] == BOS
    key = text.split(b'special magic number for ')[1].split(b' is ')[0]
    value = text.split(b' is ')[1][:7]
    assert text.endswith(b'for ' + key + b' is ' + value) and value.isdigit()
    at = text.index(b'\nThe special') / (len(text) - 150)
    assert abs(at - depth) < 0.2
    answers = np.flatnonzero(mask)
    assert len(answers) == 7 and bytes(tokens[answers + 1].astype(np.uint8)) == value


def test_evaluate_and_generate_scripts_on_a_byte_level_run(tmp_path):
  train(small_config(**{'train.num_steps': 3, 'model.pattern': 'gla,attention', 'model.linear.chunk_size': 16}),
        str(tmp_path))
  result = run_script(['scripts/evaluate.py', 'niah', '--workdir', str(tmp_path), '--lengths', '200,256',
                       '--depths', '0,1', '--samples', '2'])
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / 'eval_niah.json').read_text())
  assert len(report['rows']) == 4 and all(0 <= r['accuracy'] <= 1 for r in report['rows'])
  assert '| 200 |' in (tmp_path / 'eval_niah.md').read_text()
  out = run_script(['scripts/generate.py', '--workdir', str(tmp_path), '--prompt', 'import os', '--max_new_tokens',
                    '12', '--num_samples', '2', '--seed', '1'])
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count('--- sample') == 2 and out.stdout.count('import os') == 2
  bad = run_script(['scripts/evaluate.py', 'recall', '--workdir', str(tmp_path)])
  assert bad.returncode == 2 and 'perplexity, mqar, niah' in bad.stderr


def test_mqar_evaluation_at_several_grid_points(tmp_path):
  from longctx.eval import mqar
  train(small_config(**{'train.num_steps': 2, 'data.source': 'mqar', 'model.vocab_size': 8192,
                        'data.mqar.num_pairs': 4, 'model.pattern': 'gated_deltanet,attention',
                        'model.linear.chunk_size': 16}), str(tmp_path))
  result = mqar.evaluate(str(tmp_path), [(64, 4), (128, 8)], batches=1)
  assert [(r['seq_len'], r['num_pairs'], r['answers']) for r in result['rows']] == [(64, 4, 16), (128, 8, 32)]
  assert all(0 <= r['accuracy'] <= 1 for r in result['rows']) and '| 128 | 8 |' in mqar.table(result)
