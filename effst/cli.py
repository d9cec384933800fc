"""The ``effst`` command: train, prune, finetune, eval, pipeline, bench.

Every training subcommand takes its settings from, lowest precedence first: per-dataset defaults
(SPEC §5 for fine-tuning), a ``--config`` file (YAML or JSON, keys = the long flag names), and
the flags. Several processes / GPUs: ``torchrun --nproc_per_node N -m effst.cli train ...``.
Errors a user can fix (bad flag values, a missing dataset or checkpoint, a corrupt checkpoint)
print one line ``effst: error: ...`` and exit with status 2; an interrupted run exits 130 after
writing a checkpoint that ``--resume`` continues from.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_settings_flags(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """Flags that map onto :class:`effst.train.config.Settings` (default None = not given)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--config", type=Path, help="YAML or JSON file of settings (keys = long flag names)")
    g.add_argument("--data", help="digits (embedded default), cifar10, cifar10-dvs or synthetic")
    g.add_argument("--data-dir", help="directory holding the dataset files (CIFAR-10, CIFAR10-DVS)")
    g.add_argument("--frames", type=int, help="frames T that CIFAR10-DVS events are integrated into")
    g.add_argument("--model", help="effst.models config name (default: the dataset's)")
    g.add_argument("--T", type=int, dest="T", help="time steps (default: the model config's)")
    g.add_argument("--backend", choices=("auto", "reference", "triton", "native"), help="sLIF kernel backend")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), help="bf16 autocast: auto = on GPU only")
    g.add_argument("--threads", type=int, help="CPU threads (default: cores / processes)")
    g.add_argument("--workers", type=int, help="DataLoader workers for file-backed data")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--measure-batches", type=int, help="test batches used for firing rates and energy (default all)")
    g.add_argument("--seed", type=int)
    if training:
        t = p.add_argument_group("training")
        t.add_argument("--epochs", type=int)
        t.add_argument("--batch-size", type=int, help="per process")
        t.add_argument("--lr", type=float, help="peak learning rate of AdamW")
        t.add_argument("--weight-decay", type=float)
        t.add_argument("--warmup-epochs", type=float)
        t.add_argument("--min-lr-ratio", type=float, help="final lr of the cosine schedule ÷ peak lr")
        t.add_argument("--label-smoothing", type=float)
        t.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
        t.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no tqdm bars")
        t.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)
        t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt where it stopped")
        t.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # simulate Ctrl-C (tests)


SETTINGS_FLAGS = ("data", "data_dir", "frames", "model", "T", "backend", "device", "amp", "threads", "workers",
                  "eval_batch_size", "measure_batches", "seed", "epochs", "batch_size", "lr", "weight_decay",
                  "warmup_epochs", "min_lr_ratio", "label_smoothing", "eval_every", "progress", "tensorboard",
                  "stop_after_steps", "neuron")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effst",
        description="Prune a spiking transformer (L1P / block L1P / DSP), swap LIF for sLIF, fine-tune, report.",
        epilog="Main command: `effst pipeline` (embedded digits data, no download, about 6 minutes on 2 CPU cores).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (pretrain) a Spikformer from scratch")
    _add_settings_flags(p)
    p.add_argument("--neuron", help="lif (default), plif, slif, stl or spikingjelly")
    p.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>-train)")

    p = sub.add_parser("prune", help="prune a trained checkpoint; reports accuracy without fine-tuning")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--method", required=True, choices=("l1p", "block-l1p", "dsp", "random", "random-block", "dsp-random"))
    p.add_argument("--sparsity", type=float, required=True, help="fraction p in [0, 1) of weights (or dims) removed")
    p.add_argument("--block-size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="tile of block-l1p / random-block (default 32 32)")
    _add_settings_flags(p, training=False)
    p.add_argument("--out", type=Path)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint, converting its LIF neurons to sLIF first")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--neuron", help="slif (default: learn tau and V_th with the weights), plif or lif (keep)")
    p.add_argument("--per-layer", action="store_true", help="one tau/V_th per layer instead of per channel")
    _add_settings_flags(p)
    p.add_argument("--out", type=Path)

    p = sub.add_parser("eval", help="accuracy, size, firing rates and energy of a checkpoint")
    p.add_argument("checkpoint", type=Path)
    _add_settings_flags(p, training=False)
    p.add_argument("--out", type=Path, help="also write report.{md,json,png} here")

    p = sub.add_parser("pipeline", help="the paper's whole method, in small by default (see the README)")
    p.add_argument("--config", type=Path, help="YAML/JSON: top-level pipeline keys, plus 'train' and 'finetune' sections")
    p.add_argument("--data", help="digits (default), cifar10, cifar10-dvs or synthetic")
    p.add_argument("--data-dir")
    p.add_argument("--model")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    p.add_argument("--sparsities", type=float, nargs="+", help="default 0.5 0.8 0.9")
    p.add_argument("--methods", nargs="+", choices=("l1p", "dsp"), help="default l1p dsp")
    p.add_argument("--random-sparsity", type=float, help="sparsity of the random-pruning control (default 0.9)")
    p.add_argument("--block-size", type=int, nargs=2, metavar=("ROWS", "COLS"), help="block L1P tile (default 16 16)")
    p.add_argument("--no-block", dest="block", action="store_false", default=None, help="skip block L1P")
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--workers", type=int, help="parallel worker processes (default: CPU cores up to 4, or one per GPU)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--baseline", type=Path, help="a trained checkpoint used as the baseline of every seed instead of pretraining")
    p.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>-pipeline)")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in --out, resume unfinished ones")
    p.add_argument("--progress", action="store_const", const=True, help="tqdm bars of every stage (off by default: parallel runs)")

    p = sub.add_parser("bench", help="benchmarks (effst.benchmarks); `effst bench --help` lists them", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def default_out(kind: str) -> Path:
    import datetime

    return Path("runs") / f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{kind}"


def _flag_values(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTINGS_FLAGS if hasattr(args, k) and getattr(args, k) is not None}


def _settings(stage: str, args: argparse.Namespace, extra: Optional[dict] = None, data: Optional[str] = None):
    """Settings and the names given explicitly; ``data`` picks the per-dataset defaults when
    neither flags nor the file name a dataset (a checkpoint's own dataset)."""
    from effst.train.config import load_config_file, resolve

    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {**_flag_values(args), **(extra or {})}
    return resolve(stage, data=data, file_values=file_values, flag_values=flags), frozenset(flags) | frozenset(
        k.replace("-", "_") for k in file_values)


def _checkpoint(args: argparse.Namespace) -> dict:
    from effst.train.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``effst`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from effst.train.checkpoint import CheckpointError
    from effst.train.loop import Interrupted

    try:
        return _dispatch(args)
    except Interrupted as stop:
        print(f"effst: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("effst: aborted; the last epoch's checkpoint (if any) is intact — continue with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        if os.environ.get("EFFST_DEBUG"):
            raise
        print(f"effst: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        from effst.train.distributed import teardown

        teardown()


def _dispatch(args: argparse.Namespace) -> int:
    from effst.train import runs

    if args.command == "train":
        settings, _ = _settings("train", args)
        out = args.out or default_out("train")
        runs.configure_threads(settings)
        summary = runs.pretrain(settings, out, resume=args.resume)
        _print_summary(summary, out)
        return 0
    if args.command == "prune":
        ckpt = _checkpoint(args)
        settings, given = _settings("finetune", args, data=runs.checkpoint_dataset(ckpt))
        out = args.out or default_out(f"prune-{args.method}-{args.sparsity}")
        runs.configure_threads(settings)
        block = tuple(args.block_size) if args.block_size else (32, 32)
        summary = runs.prune(ckpt, args.method, args.sparsity, out, settings, given=given,
                             block_size=block, seed=settings.seed)
        _print_summary(summary, out)
        return 0
    if args.command == "finetune":
        ckpt = _checkpoint(args)
        settings, given = _settings("finetune", args, {"neuron": args.neuron or "slif"}, data=runs.checkpoint_dataset(ckpt))
        out = args.out or default_out(f"finetune-{settings.neuron}")
        runs.configure_threads(settings)
        summary = runs.finetune(ckpt, settings, out, given=given, resume=args.resume,
                                channels=not args.per_layer)
        _print_summary(summary, out)
        return 0
    if args.command == "eval":
        ckpt = _checkpoint(args)
        settings, given = _settings("finetune", args, data=runs.checkpoint_dataset(ckpt))
        runs.configure_threads(settings)
        summary = runs.evaluate_checkpoint(ckpt, settings, given=given, out=args.out)
        _print_summary(summary, args.out)
        return 0
    if args.command == "pipeline":
        from effst.train.pipeline import PipelineOptions, run_pipeline

        options = PipelineOptions.from_args(args)
        out = args.out or default_out("pipeline")
        result = run_pipeline(options, out, resume=args.resume)
        print(f"effst: pipeline report: {Path(out) / 'report.md'} ({result['wall_time_s']:.0f} s)")
        for line in result["conclusions"]["statements"]:
            print(f"  - {line}")
        return 0
    raise AssertionError(args.command)


def _print_summary(summary: dict, out: Optional[Path]) -> None:
    if not summary:  # not the main rank of a distributed run
        return
    params = summary["parameters"]
    act = summary["activity"]
    print(f"effst: {summary['stage']}: test accuracy {100 * summary['accuracy']:.2f} % "
          f"({summary['test']['samples']} samples); params {params['total_nonzero']:,} non-zero of {params['total']:,} "
          f"(blocks {params['blocks_nonzero']:,}); compression {summary['compression']['blocks']:.2f}×; "
          f"firing rate {act['mean_firing_rate']:.4f}; energy {act['energy_uj']:.4f} µJ/sample")
    if out is not None:
        print(f"effst: report: {Path(out) / 'report.md'}")


def _bench(argv: list[str]) -> int:
    try:
        from effst.benchmarks import main as bench_main
    except ImportError as error:
        print(f"effst: error: the benchmark harness is not available ({error})", file=sys.stderr)
        return EXIT_USAGE
    return int(bench_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
