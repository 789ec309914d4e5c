"""Random-access sources of documents (variable-length int32 token arrays) or of ready rows.

Byte-level text: each byte is a token 0..255; PAD, BOS and EOS follow. A document is [BOS] bytes [EOS]; files longer
than `MAX_PIECE_BYTES` are read in pieces so that no element needs a whole large file in memory.
"""
from __future__ import annotations

import glob as globlib
import os
import sysconfig
import zlib

import numpy as np

PAD, BOS, EOS = 256, 257, 258
BYTE_VOCAB = 259
MAX_PIECE_BYTES = 1 << 20
SPLITS = ('train', 'validation')


def stdlib_files() -> tuple[str, list[str]]:
  """The running interpreter's standard-library sources: a corpus that is on every machine, no download."""
  root = sysconfig.get_paths()['stdlib']
  files = [p for p in globlib.glob(os.path.join(root, '**', '*.py'), recursive=True)
           if 'site-packages' not in p and 'dist-packages' not in p]
  return root, sorted(files)


def split_files(files: list[str], root: str, split: str, val_percent: float) -> list[str]:
  """Stable split by a hash of the path relative to root: the same file lands in the same split everywhere."""
  def is_val(path):
    rel = os.path.relpath(path, root).replace(os.sep, '/')
    return zlib.crc32(rel.encode()) % 10000 < val_percent * 100
  return [f for f in files if is_val(f) == (split == 'validation')]


class ByteDocuments:
  """Files as byte-level documents, large files in pieces (BOS on the first piece, EOS on the last)."""

  def __init__(self, files: list[str]):
    self._pieces: list[tuple[str, int, int, bool, bool]] = []
    for path in files:
      size = os.path.getsize(path)
      starts = range(0, max(size, 1), MAX_PIECE_BYTES)
      for start in starts:
        length = min(MAX_PIECE_BYTES, size - start)
        self._pieces.append((path, start, length, start == 0, start + MAX_PIECE_BYTES >= size))

  def __len__(self):
    return len(self._pieces)

  def __getitem__(self, index):
    path, start, length, first, last = self._pieces[index]
    with open(path, 'rb') as f:
      f.seek(start)
      raw = np.frombuffer(f.read(length), np.uint8).astype(np.int32)
    parts = ([np.array([BOS], np.int32)] if first else []) + [raw] + ([np.array([EOS], np.int32)] if last else [])
    return {'tokens': np.concatenate(parts)}


class TokenWindows:
  """Fixed windows of `seq_len` tokens from a pre-tokenised file (.npy, or raw .bin of `dtype`), memory-mapped.

  Documents inside the stream are delimited by `eos_id` (if >= 0): a token after EOS starts a new segment, so packed
  attention never crosses documents. Windows [start, stop) of the window index belong to this split.
  """

  def __init__(self, path: str, seq_len: int, dtype: str, eos_id: int, start: float, stop: float):
    if path.endswith('.npy'):
      self._tokens = np.load(path, mmap_mode='r')
    else:
      self._tokens = np.memmap(path, dtype=np.dtype(dtype), mode='r')
    self._seq_len, self._eos = seq_len, eos_id
    n = len(self._tokens) // seq_len
    self._first, self._count = int(n * start), int(n * stop) - int(n * start)

  def __len__(self):
    return self._count

  def __getitem__(self, index):
    i = (self._first + index) * self._seq_len
    tokens = np.asarray(self._tokens[i:i + self._seq_len], np.int32)
    is_start = np.zeros(len(tokens), bool)
    is_start[0] = True
    if self._eos >= 0:
      is_start[1:] = tokens[:-1] == self._eos
    index = np.arange(len(tokens), dtype=np.int32)
    segment_ids = np.cumsum(is_start, dtype=np.int32)
    positions = index - np.maximum.accumulate(np.where(is_start, index, 0))
    return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}
