"""Context parallelism on fake devices: ring and all-gather attention against dense attention, forward and backward,
in every token order, with GQA, odd head counts, documents and windows; the reorderings themselves."""
import json

import numpy as np
import pytest

from longctx.parallel import context
from tests.conftest import run_script


@pytest.fixture(scope='module')
def results():
  result = run_script(['tests/helpers/context_attention.py'])
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('method', ['ring', 'all_gather'])
@pytest.mark.parametrize('case', ['zigzag_gqa', 'striped_gqa', 'none_gqa', 'zigzag_docs_window',
                                  'striped_8dev_odd_heads'])
def test_sharded_attention_equals_dense_forward_and_backward(results, method, case):
  r = results[f'{method}_{case}']
  assert r['finite']
  assert max(r['fwd'], r['dq'], r['dk'], r['dv']) < 1e-5, r


@pytest.mark.parametrize('order', context.ORDERS)
def test_reorderings_are_permutations_that_balance_causal_work(order):
  t, n = 48, 4
  perm = context.permutation(t, n, order)
  assert sorted(perm) == list(range(t))
  x = np.arange(t)[None]
  np.testing.assert_array_equal(np.asarray(context.restore(context.reorder(x, n, order), n, order)), x)
  work = [int(np.sum(perm.reshape(n, -1)[r] + 1)) for r in range(n)]    # causal pairs of each shard's queries
  if order != 'none':
    assert max(work) - min(work) <= t // n * n, work
  else:
    assert max(work) > 3 * min(work)
