"""The `altbench` command: train | arena | eval RUN | sample RUN | probe RUN | report RUN... | convert-hf HF_DIR --out RUN
| prepare SRC --out DIR

Exit codes: 0 done, 2 bad config, data or run directory, 3 non-finite loss, 130 interrupted (resumable).
"""

import argparse
import os
import sys


def _setup_jax(args):
  """Device flags must be set before JAX initialises its backend."""
  import jax
  if getattr(args, "cpu_devices", None):
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  explicit = {"coordinator_address": getattr(args, "coordinator", None),
              "num_processes": getattr(args, "num_processes", None), "process_id": getattr(args, "process_id", None)}
  auto = os.environ.get("ALTBENCH_DISTRIBUTED") == "1"
  if any(v is not None for v in explicit.values()) or auto:
    # Cross-process collectives of the CPU backend (GPUs and TPUs use their own, this changes nothing there).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Flags left out are auto-detected (SLURM, TPU pods, Open MPI, Kubernetes), as with ALTBENCH_DISTRIBUTED=1.
    jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})


def _is_main():
  import jax
  return jax.process_index() == 0


def cmd_train(args):
  from altbench.train import config, loop
  cfg = config.apply_overrides(config.load_experiment(args.experiment), args.set or [])
  config.validate(cfg)
  name = os.path.splitext(os.path.basename(args.experiment.split(":")[0]))[0]
  variant = args.experiment.partition(":")[2]
  workdir = args.workdir or os.path.join("runs", f"{name}-{variant}" if variant else name)
  _setup_jax(args)
  loop.train(cfg, workdir)


def cmd_arena(args):
  from altbench.train import arena, loop
  spec = arena.load(args.arena)
  import dataclasses
  if args.power_w:
    spec = dataclasses.replace(spec, power_w=args.power_w)
  if args.seeds is not None:
    if args.seeds < 1:
      raise SystemExit(f"altbench arena: --seeds {args.seeds}: valid: an int >= 1")
    spec = dataclasses.replace(spec, seeds=args.seeds)
  workdir = args.workdir or os.path.join("runs", spec.name)
  _setup_jax(args)
  import jax
  if not jax.config.jax_compilation_cache_dir:  # a resumed arena (and the ledger's XLA cross-check) reuse compiles
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "xla_cache"))
  try:
    arena.run(spec, workdir)
  except KeyboardInterrupt:
    raise loop.Interrupted(f"arena interrupted; rerun the same command to resume {workdir}") from None


def cmd_eval(args):
  from altbench.train import loop
  _setup_jax(args)
  cfg, family, corpus, graphdef, state, mesh_, step = loop.load_run(args.run)
  result = loop.evaluate(family, graphdef, state, corpus, cfg, mesh_)
  if _is_main():
    print({"step": step, **result})


def cmd_sample(args):
  from altbench.train import loop
  from altbench.train.config import ConfigError
  for flag, value in (("--n", args.n), ("--length", args.length)):
    if value < 1:
      raise ConfigError(f"sample {flag}={value}: must be >= 1")
  _setup_jax(args)
  cfg, family, corpus, graphdef, state, mesh_, _ = loop.load_run(args.run)
  pairs = loop.sample_texts(family, graphdef, state, corpus, cfg, args.n, args.length, seed=args.seed,
                            prompt=args.prompt, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  for prompt, continuation in pairs if _is_main() else []:
    print(f"{prompt}{continuation}\n---")


def cmd_convert_hf(args):
  from altbench.train import convert_hf
  _setup_jax(args)
  convert_hf.convert(args.hf_dir, args.out, args.set or [])


def cmd_bench(args):
  import runpy
  from altbench.train.config import ConfigError
  bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench")
  names = sorted(f[:-3] for f in os.listdir(bench_dir) if f.endswith(".py") and not f.startswith("_"))
  if args.name not in names:
    raise ConfigError(f"benchmark {args.name!r} is not in {bench_dir}; valid: {names}")
  path = os.path.join(bench_dir, args.name + ".py")
  sys.argv = [path] + args.args
  runpy.run_path(path, run_name="__main__")


def cmd_prepare(args):
  from altbench.train import loop, shards
  try:
    m = shards.prepare(args.src, args.out, args.tokenizer, args.heldout_fraction, args.bpe_vocab_size,
                       args.shard_tokens, args.text_field)
  except KeyboardInterrupt:
    raise loop.Interrupted(f"prepare interrupted; finished shards are kept, rerun the same command to resume "
                           f"{args.out}") from None
  for split, entry in m["splits"].items():
    print(f"{split}: {entry['docs']} docs, {entry['tokens']} tokens in {len(entry['shards'])} shards of {m['dtype']}")
  from altbench.train.config import DataConfig
  kind, vocab = m["tokenizer"]["kind"], m["tokenizer"]["vocab_size"]
  sets = [f"data.dataset=tokens:{args.out}", f"data.tokenizer={kind}"]
  if m["heldout_fraction"] != DataConfig.heldout_fraction:  # the run's settings must match the shards'
    sets.append(f"data.heldout_fraction={m['heldout_fraction']}")
  if kind == "bpe" and vocab != DataConfig.bpe_vocab_size:
    sets.append(f"data.bpe_vocab_size={vocab}")
  print(f"wrote {args.out}/manifest.json; train with " + " ".join(f"--set {s}" for s in sets))


def cmd_report(args):
  from altbench.train import report
  print(report.report(args.runs, args.png))


def cmd_probe(args):
  import json
  from altbench.interp import suite
  from altbench.train.config import ConfigError
  _setup_jax(args)
  try:
    summary = suite.run(args.run, args.suite, args.task, args.n, progress=_is_main())
  except ValueError as e:  # a run or option the suite cannot probe: exit 2 like other bad input
    raise ConfigError(str(e)) from e
  if _is_main():
    print(json.dumps(summary, indent=1))


def main(argv=None):
  parser = argparse.ArgumentParser(prog="altbench", description="Alternative LM architectures bench")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) an experiment in a run directory")
  p.add_argument("experiment", help="experiments/<name>.py[:variant]")
  p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
  p.add_argument("--workdir", help="run directory (default runs/<name>-<variant>)")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("arena", help="train every entry of an arena to equal FLOPs; leaderboard, ledger and plots")
  p.add_argument("arena", help="experiments/arena.py[:variant] (smoke | cpu | gpu)")
  p.add_argument("--workdir", help="arena directory, one run directory per entry (default runs/arena-<variant>)")
  p.add_argument("--seeds", type=int, help="runs per entry (train.seed + 0..N-1; default: the variant's, 1 for "
                 "smoke, 3 for cpu and gpu): mean, 95%% interval and paired differences")
  p.add_argument("--power-w", type=float, default=0.0, help="stated device power (W) where energy is estimated")
  p.set_defaults(func=cmd_arena)

  p = sub.add_parser("eval", help="held-out loss and bits per byte of a run's latest checkpoint")
  p.add_argument("run")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
  p.add_argument("run")
  p.add_argument("--prompt", default=None, help="prompt text (default: openings of held-out documents)")
  p.add_argument("--n", type=int, default=1)
  p.add_argument("--length", type=int, default=200, help="new tokens per sample")
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=cmd_sample)

  p = sub.add_parser("convert-hf", help="import a Hugging Face Llama, Mamba-2 or Falcon-H1 model as a run directory")
  p.add_argument("hf_dir", help="directory with config.json and *.safetensors (save_pretrained output)")
  p.add_argument("--out", required=True, help="run directory to create (eval, sample and load_run read it)")
  p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                 help="override a field of the generated config, e.g. data.dataset=text:PATH")
  p.set_defaults(func=cmd_convert_hf)

  p = sub.add_parser("bench", help="run a benchmark of experiments/bench/ (one JSON line per case)")
  p.add_argument("name", help="benchmark name, e.g. train_throughput, decode, ssd_scaling, attention")
  p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
  p.set_defaults(func=cmd_bench)

  p = sub.add_parser("probe", help="CoT probe suite of a reasoning run (probes, lenses, faithfulness, patching) "
                                   "-> RUN/probe/")
  p.add_argument("run")
  p.add_argument("--suite", default="cot", help="which suite (cot)")
  p.add_argument("--task", default=None, help="check the run's task (reach, mult, vartrack)")
  p.add_argument("--n", type=int, default=None, help="eval examples to use (default: all of the run's)")
  p.set_defaults(func=cmd_probe)

  p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards for data.dataset=tokens:DIR "
                                     "(resumable: rerun the same command)")
  p.add_argument("src", help="a UTF-8 file, a folder (recursively), a .jsonl / .parquet file, or pystdlib")
  p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
  p.add_argument("--tokenizer", default="bytes", help="bytes, bpe (trained on the training split) or bpe:RUN "
                                                      "(RUN/data/tokenizer.json of an earlier run)")
  p.add_argument("--bpe-vocab-size", type=int, default=4096, help="plain bpe: the vocabulary to train")
  p.add_argument("--heldout-fraction", type=float, default=0.02, help="as data.heldout_fraction")
  p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
  p.add_argument("--text-field", default="text", help="JSONL / Parquet: the field holding the text")
  p.set_defaults(func=cmd_prepare)

  p = sub.add_parser("report", help="table of runs' final metrics and a plot against FLOPs")
  p.add_argument("runs", nargs="+")
  p.add_argument("--png", default="altbench_report.png", help="where to write the plot")
  p.set_defaults(func=cmd_report)

  for name, p in sub.choices.items():
    p.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices (jax_num_cpu_devices)")
    if name not in ("report", "prepare"):  # every process of a multi-process run runs the same command
      p.add_argument("--coordinator", help="multi-process: coordinator host:port (process 0's address)")
      p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
      p.add_argument("--process-id", type=int, help="multi-process: this process's index, 0 writes the logs")

  args = parser.parse_args(argv)
  from altbench.train.config import ConfigError
  from altbench.train.data import DataError
  from altbench.train.loop import Interrupted, NonFiniteLoss
  try:
    args.func(args)
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"altbench: error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLoss as e:
    print(f"altbench: error: {e}", file=sys.stderr)
    return 3
  except Interrupted as e:
    print(f"altbench: {e}", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
