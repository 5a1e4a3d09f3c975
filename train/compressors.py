"""General-purpose compressors on the held-out bytes every model is scored on: a floor for bits per byte.

The bytes are those of `train.data.eval_text` (the first data.eval_bytes bytes of the held-out documents),
concatenated in order, compressed as one file. Sizes include each format's header and checksum, as the
command-line tools would write them: gzip -9, bzip2 -9, xz -9e (lzma preset 9 | PRESET_EXTREME) and
zstd -19 when the `zstandard` package is importable. Models pay for an <eos> between documents and
compressors do not pay for document boundaries, so the comparison slightly favours the compressors.
"""

import bz2
import gzip
import lzma

from altbench.train import data


def _zstd():
  try:
    import zstandard
  except ImportError:
    return None
  return lambda b: zstandard.ZstdCompressor(level=19).compress(b)


COMPRESSORS = {
    "gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "bzip2 -9": lambda b: bz2.compress(b, compresslevel=9),
    "xz -9e": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
}
if _zstd() is not None:
  COMPRESSORS["zstd -19"] = _zstd()


def heldout_bytes(data_cfg):
  """The scored held-out bytes of a DataConfig (text datasets only)."""
  _, heldout = data.load_documents(data_cfg.dataset, data_cfg.heldout_fraction)
  return "".join(data.eval_text(heldout, data_cfg.eval_bytes)).encode("utf-8")


def bits_per_byte(raw):
  """{compressor: bits per byte} of raw bytes."""
  if not raw:
    raise ValueError("no bytes to compress")
  return {name: 8.0 * len(compress(raw)) / len(raw) for name, compress in COMPRESSORS.items()}


def compressor_bpb(data_cfg):
  """(number of bytes, {compressor: bits per byte}) on the held-out bytes a run with data_cfg scores."""
  raw = heldout_bytes(data_cfg)
  return len(raw), bits_per_byte(raw)
