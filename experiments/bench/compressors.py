"""General-purpose compressors on the held-out bytes the models are scored on (train/compressors.py): one JSON
line per compressor with its bits per byte, for the eval sizes the experiments use.

  python experiments/bench/compressors.py [--dataset pystdlib] [--eval-bytes 8192 32768]
"""

import argparse
import json

from altbench.train import compressors
from altbench.train.config import DataConfig


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="pystdlib")
  parser.add_argument("--eval-bytes", type=int, nargs="+", default=[8192, 32768])
  args = parser.parse_args()
  for n in args.eval_bytes:
    size, bpb = compressors.compressor_bpb(DataConfig(dataset=args.dataset, eval_bytes=n))
    for name, value in bpb.items():
      print(json.dumps({"bench": "compressors", "dataset": args.dataset, "eval_bytes": size, "compressor": name,
                        "bpb": round(value, 4)}), flush=True)


if __name__ == "__main__":
  main()
