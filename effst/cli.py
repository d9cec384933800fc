"""The ``effst`` command: train, prune, finetune, eval, pipeline, bench.

Every training subcommand takes its settings from, lowest precedence first: per-dataset defaults
(docs/pruning.md for fine-tuning), a ``--config`` file (YAML or JSON, keys = the long flag names), and
the flags. Several processes / GPUs: ``torchrun --nproc_per_node N -m effst.cli train ...``.
Errors a user can fix (bad flag values, a missing dataset or checkpoint, a corrupt checkpoint,
an output folder that cannot be written) print one line ``effst: error: ...`` and exit with
status 2, before any work starts where they can be known then. A folder that already holds a run
is never overwritten silently: ``--resume`` continues it (with the settings saved in its
checkpoint; flags given again override them and are reported), ``--overwrite`` replaces it
atomically. An interrupted run exits 130 after writing a checkpoint that ``--resume`` continues.
This module imports only the standard library at start-up, so ``--help`` and ``--version`` are
instant; torch and the rest load when a command runs.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
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
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out (atomically, when done)")
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
        t.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars and no per-epoch lines")
        t.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)
        t.add_argument("--resume", action="store_true",
                       help="continue OUT/checkpoint.pt where it stopped, with its saved settings (flags given override)")
        t.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # simulate Ctrl-C (tests)


SETTINGS_FLAGS = ("data", "data_dir", "frames", "model", "T", "backend", "device", "amp", "threads", "workers",
                  "eval_batch_size", "measure_batches", "seed", "epochs", "batch_size", "lr", "weight_decay",
                  "warmup_epochs", "min_lr_ratio", "label_smoothing", "eval_every", "progress", "tensorboard",
                  "stop_after_steps", "neuron")


TOKEN_HELP = {
    "train": ("token selection (docs/token_sparsity.md), stored in the checkpoint's model recipe so that "
              "finetune, eval and --resume keep it", "rho (STS) or gamma (STATA); default 0.7 / 0.5"),
    "finetune": ("add token selection to a dense checkpoint: its weights load strictly, the selector's are new, "
                 "and STS distils from the checkpoint's dense model", "rho (STS) or gamma (STATA) to fine-tune at; "
                 "default 0.7 / 0.5, or the checkpoint's"),
    "eval": ("must be the checkpoint's own (eval uses the selector it was trained with)",
             "evaluate at another rho / gamma (kept-token counts are computed at inference time)"),
}


def _add_token_flags(p: argparse.ArgumentParser, command: str) -> None:
    """--token-selector / --keep-ratio: the config file's model_overrides {token_selector, keep_ratio}."""
    selector_help, ratio_help = TOKEN_HELP[command]
    g = p.add_argument_group("token selection (config file: model_overrides: {token_selector: ..., keep_ratio: ...})")
    g.add_argument("--token-selector", choices=("sts", "stata", "sts-random", "stata-random"), help=selector_help)
    g.add_argument("--keep-ratio", type=float, help=ratio_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effst",
        description="Prune a spiking transformer (L1P / block L1P / DSP), swap LIF for sLIF, fine-tune, report.",
        epilog="Main command: `effst pipeline` (embedded digits data, no download, about 5 minutes on 2 idle CPU cores).",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (pretrain) a Spikformer from scratch")
    _add_settings_flags(p)
    p.add_argument("--neuron", help="lif (default), plif, slif, stl or spikingjelly")
    _add_token_flags(p, "train")
    p.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>-train)")

    p = sub.add_parser("prune", help="prune a trained checkpoint; reports accuracy without fine-tuning")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--method", required=True, choices=("l1p", "block-l1p", "dsp", "random", "random-block", "dsp-random"))
    p.add_argument("--sparsity", type=float, required=True, help="fraction p in [0, 1) of weights (or dims) removed")
    p.add_argument("--block-size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="tile of block-l1p / random-block (default: effst.prune.DEFAULT_BLOCK_SIZE)")
    _add_settings_flags(p, training=False)
    p.add_argument("--out", type=Path)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint, converting its LIF neurons to sLIF first")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--neuron", help="slif (default: learn tau and V_th with the weights), plif or lif (keep)")
    p.add_argument("--per-layer", action="store_true", help="one tau/V_th per layer instead of per channel")
    _add_token_flags(p, "finetune")
    _add_settings_flags(p)
    p.add_argument("--out", type=Path)

    p = sub.add_parser("eval", help="accuracy, size, firing rates and energy of a checkpoint")
    p.add_argument("checkpoint", type=Path)
    _add_token_flags(p, "eval")
    _add_settings_flags(p, training=False)
    p.add_argument("--out", type=Path, help="also write report.{md,json,png} here")

    p = sub.add_parser("pipeline", help="the paper's whole method, in small by default (see the README)")
    p.add_argument("--study", choices=("weights", "tokens"), default="weights",
                   help="weights (default): pruning + sLIF; tokens: STS/STATA token selection vs random "
                        "controls and IMP + STS (effst/train/token_study.py; takes --seeds, --pretrain-epochs, "
                        "--finetune-epochs, --workers, --out)")
    p.add_argument("--config", type=Path, help="YAML/JSON: top-level pipeline keys, plus 'train' and 'finetune' sections")
    p.add_argument("--data", help="digits (default), cifar10, cifar10-dvs or synthetic")
    p.add_argument("--data-dir")
    p.add_argument("--model")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    p.add_argument("--sparsities", type=float, nargs="+", help="default 0.5 0.8 0.9")
    p.add_argument("--methods", nargs="+", choices=("l1p", "dsp"), help="default l1p dsp")
    p.add_argument("--random-sparsity", type=float, help="sparsity of the random-pruning control (default 0.9)")
    p.add_argument("--block-size", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="block L1P tile (default: effst.prune.DEFAULT_BLOCK_SIZE)")
    p.add_argument("--no-block", dest="block", action="store_false", default=None, help="skip block L1P")
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--workers", type=int, help="parallel worker processes (default: CPU cores up to 4, or one per GPU)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--baseline", type=Path, help="a trained checkpoint used as the baseline of every seed instead of pretraining")
    p.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>-pipeline)")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in --out, resume unfinished ones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pipeline run in --out (atomically)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no overall progress bar (stage results are still printed as they finish)")

    p = sub.add_parser("bench", help="benchmarks (effst.benchmarks); `effst bench --help` lists them", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


class _VersionAction(argparse.Action):
    """``effst --version``: the package version, read without importing torch."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from effst import __version__

        print(f"effst {__version__}")
        parser.exit()


def default_out(kind: str) -> Path:
    import datetime

    return Path("runs") / f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{kind}"


def _flag_values(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTINGS_FLAGS if hasattr(args, k) and getattr(args, k) is not None}


def _settings(stage: str, args: argparse.Namespace, extra: Optional[dict] = None, data: Optional[str] = None,
              saved: Optional[dict] = None):
    """Settings and the names given explicitly. Precedence, lowest first: the dataset's defaults,
    ``saved`` (a resumed run's own settings), the ``--config`` file, the flags. ``data`` picks the
    per-dataset defaults when nothing else names a dataset (a source checkpoint's dataset)."""
    from effst.train.config import SETTING_NAMES, load_config_file, resolve

    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {**_flag_values(args), **{k: v for k, v in (extra or {}).items() if v is not None}}
    restored = {k: v for k, v in (saved or {}).items() if k in SETTING_NAMES and k not in RESUME_NOT_RESTORED}
    given = frozenset(flags) | frozenset(str(k).replace("-", "_") for k in file_values)
    settings = resolve(stage, data=data, file_values={**restored, **file_values}, flag_values=flags)
    selection = {k: getattr(args, k) for k in ("token_selector", "keep_ratio") if getattr(args, k, None) is not None}
    if selection:  # the flags override the same keys of model_overrides (config file or resumed run)
        settings.model_overrides = {**(settings.model_overrides or {}), **selection}
        given |= {"model_overrides"}
    return settings, given


# Pipeline options that change what a finished stage holds: a resumed pipeline reuses its finished
# stages, so these cannot change on --resume (seeds, sparsities, methods, controls, workers, device can).
PIPELINE_STAGE_CONTENT = ("data", "model", "block_size", "pretrain_epochs", "finetune_epochs", "baseline", "train",
                          "finetune")

# A resumed run gets back every saved setting except the test-only stop hook.
RESUME_NOT_RESTORED = ("stop_after_steps",)


def _resumed_settings(stage: str, args: argparse.Namespace, out: Path, extra: Optional[dict] = None,
                      data: Optional[str] = None):
    """Settings of ``--resume``: the checkpoint's own, with what was given again reported."""
    from effst.train.checkpoint import load_checkpoint

    saved = load_checkpoint(out / "checkpoint.pt").get("settings") or {}
    settings, given = _settings(stage, args, extra, data=data, saved=saved)
    now = settings.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(given)
               if k in saved and k in now and saved[k] != now[k] and k not in RESUME_NOT_RESTORED]
    print(f"effst: resuming {out} with the settings saved in its checkpoint"
          + (f"; overridden here: {', '.join(changed)}" if changed else ""), file=sys.stderr)
    return settings, given


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
    print(f"effst {args.command}: starting (loading torch)", file=sys.stderr, flush=True)
    previous_sigterm = _sigterm_as_interrupt()
    previous_format, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        warnings.formatwarning = previous_format


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings (a block tile adapted to a small layer, a fallback backend) as one line each, without
    the library's file name and source line that made them look like a traceback."""
    return f"effst: warning: {message}\n"


def _sigterm_as_interrupt():
    """SIGTERM stops a command the way Ctrl-C does (the training loop installs its own while it trains)."""
    def handle(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _run(args: argparse.Namespace) -> int:
    try:
        from effst.train.checkpoint import CheckpointError
        from effst.train.loop import Interrupted, interrupted_message
    except ImportError as error:  # torch or a training dependency missing: one line
        print(f"effst: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args)
    except Interrupted as stop:
        print(f"effst: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _OverwriteDiscarded as stop:
        print(f"effst: interrupted; the new run was discarded and {stop.path} is left as it was", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        where = getattr(args, "out", None)
        saved = where is not None and any((Path(where) / name).is_file() for name in ("checkpoint.pt", "plan.json"))
        print(f"effst: {interrupted_message(where) if saved else 'interrupted before anything was saved'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:  # a filesystem error: one line with the path
        if os.environ.get("EFFST_DEBUG"):
            raise
        print(f"effst: error: {_os_error_text(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, ValueError, TypeError, ImportError, RuntimeError) as error:
        if os.environ.get("EFFST_DEBUG"):
            raise
        print(f"effst: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        from effst.train.distributed import teardown

        teardown()


def _os_error_text(error: OSError) -> str:
    """``path: reason`` for errors the OS raised, the message itself for effst's own."""
    if error.filename is None:
        return str(error)
    text = f"{error.filename}: {error.strerror or error}"
    if error.filename2 is not None:
        text += f" (and {error.filename2})"
    return text


class _OverwriteDiscarded(KeyboardInterrupt):
    """Ctrl-C stopped an ``--overwrite`` run before it saved anything: ``path`` still holds the old run."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _in_folder(folder, work):
    """Run ``work(path)`` in a RunFolder: committed when it finishes or stops resumably, else discarded."""
    from effst.train.loop import CHECKPOINT_NAME, Interrupted, TrainingDiverged

    folder.create()
    try:
        result = work(folder.work)
    except Interrupted:
        folder.commit()
        raise Interrupted(folder.path / CHECKPOINT_NAME) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: nothing resumable saved
        folder.discard()
        if folder.work != folder.path:  # the folder in --out is still the old run, not this one
            raise _OverwriteDiscarded(folder.path) from None
        raise
    except TrainingDiverged as error:
        folder.discard()
        if folder.work != folder.path:  # --overwrite: the temporary folder (and its checkpoint) is gone
            raise RuntimeError(f"{error.reason}; the new run was discarded and {folder.path} is left as it was "
                               "(--overwrite replaces it only with a run that finishes) — lower --lr or check "
                               "the data") from None
        raise
    except BaseException:
        folder.discard()
        raise
    folder.commit()
    return result


def _dispatch(args: argparse.Namespace) -> int:
    from effst.train import runs
    from effst.train.run_folder import RunFolder, check_writable_location

    if args.command == "train":
        out = args.out = args.out or default_out("train")
        folder = RunFolder(out, resume=args.resume, overwrite=args.overwrite, main=_is_main_rank())
        settings, _ = (_resumed_settings("train", args, out) if args.resume else _settings("train", args))
        if args.keep_ratio is not None and not (settings.model_overrides or {}).get("token_selector"):
            raise ValueError("--keep-ratio: only meaningful with --token-selector "
                             "(or model_overrides: {token_selector: ...} in --config)")
        runs.token_selection_of(settings.model_overrides)  # bad values fail before any work
        runs.configure_threads(settings)
        summary = _in_folder(folder, lambda work: runs.pretrain(settings, work, resume=args.resume))
        _print_summary(summary, out)
        return 0
    if args.command == "prune":
        out = args.out = args.out or default_out(f"prune-{args.method}-{args.sparsity}")
        _keep_input(args.checkpoint, out, args.overwrite)
        folder = RunFolder(out, overwrite=args.overwrite, marker=None)
        block = tuple(args.block_size) if args.block_size else runs.default_block_size()
        runs.prune_step(args.method, args.sparsity, block_size=block)  # bad values fail before any work
        ckpt = _checkpoint(args)
        settings, given = _settings("finetune", args, data=runs.checkpoint_dataset(ckpt))
        runs.configure_threads(settings)
        summary = _in_folder(folder, lambda work: runs.prune(ckpt, args.method, args.sparsity, work, settings,
                                                             given=given, block_size=block, seed=settings.seed))
        _print_summary(summary, out)
        return 0
    if args.command == "finetune":
        out = args.out = args.out or default_out(f"finetune-{args.neuron or 'slif'}")
        _keep_input(args.checkpoint, out, args.overwrite)
        folder = RunFolder(out, resume=args.resume, overwrite=args.overwrite, main=_is_main_rank())
        ckpt = _checkpoint(args)
        source_data = runs.checkpoint_dataset(ckpt)
        if args.resume:
            settings, given = _resumed_settings("finetune", args, out, {"neuron": args.neuron}, data=source_data)
        else:
            settings, given = _settings("finetune", args, {"neuron": args.neuron or "slif"}, data=source_data)
        runs.configure_threads(settings)
        channels = not args.per_layer
        if args.resume and not args.per_layer:  # --resume restores --per-layer too: it is in the recipe's convert step
            from effst.train.checkpoint import load_checkpoint

            converts = [s for s in load_checkpoint(out / "checkpoint.pt")["recipe"] if s.get("op") == "convert"]
            channels = bool(converts[-1].get("channels", True)) if converts else True
        summary = _in_folder(folder, lambda work: runs.finetune(ckpt, settings, work, given=given, resume=args.resume,
                                                                channels=channels))
        _print_summary(summary, out)
        return 0
    if args.command == "eval":
        if args.out is not None:
            _keep_input(args.checkpoint, args.out, args.overwrite)
        folder = RunFolder(args.out, overwrite=args.overwrite, marker=None) if args.out is not None else None
        ckpt = _checkpoint(args)
        settings, given = _settings("finetune", args, data=runs.checkpoint_dataset(ckpt))
        runs.configure_threads(settings)
        if folder is None:
            summary = runs.evaluate_checkpoint(ckpt, settings, given=given, out=None)
        else:
            summary = _in_folder(folder, lambda work: runs.evaluate_checkpoint(ckpt, settings, given=given, out=work))
        _print_summary(summary, args.out)
        return 0
    if args.command == "pipeline" and args.study == "tokens":
        from effst.train.token_study import TokenStudyOptions, run_token_study

        unsupported = [f"--{k.replace('_', '-')}" for k in ("config", "data", "data_dir", "model", "sparsities", "methods",
                                                            "random_sparsity", "block_size", "baseline", "resume")
                       if getattr(args, k, None) not in (None, False)] + (["--no-block"] if args.block is False else [])
        if unsupported:
            raise ValueError(f"--study tokens: {', '.join(unsupported)} apply to the weights study only")
        out = args.out = args.out or default_out("tokens")
        check_writable_location(out)
        folder = RunFolder(out, overwrite=args.overwrite, marker="summary.json", keep_partial=True)
        values = {k: getattr(args, a) for k, a in (("seeds", "seeds"), ("pretrain_epochs", "pretrain_epochs"),
                                                   ("finetune_epochs", "finetune_epochs"), ("workers", "workers"))
                  if getattr(args, a) is not None}
        options = TokenStudyOptions(**values).validate()
        summary = _in_folder(folder, lambda work: run_token_study(options, work))
        print(f"effst: token study report: {Path(out) / 'report.md'} ({summary['seconds']:.0f} s)")
        for c in summary["comparisons"]:
            print(f"  - {c['selector']} at {c['ratio']:g} vs {c['against']}: {c['text']}: {c['verdict']}")
        for v in summary["verdicts"]:
            print(f"  {v['text']}")
        return 0
    if args.command == "pipeline":
        from dataclasses import asdict

        from effst.train.pipeline import PipelineOptions, StagesFailed, run_pipeline, saved_options

        out = args.out = args.out or default_out("pipeline")
        check_writable_location(out)
        folder = RunFolder(out, resume=args.resume, overwrite=args.overwrite, marker="plan.json")
        saved = saved_options(out) if args.resume else None
        options = PipelineOptions.from_args(args, saved)
        if options.baseline is not None:  # a corrupt baseline fails here, not in every seed's first stage
            _keep_input(Path(options.baseline), out, args.overwrite, flag="--baseline")
            from effst.train.checkpoint import load_checkpoint

            load_checkpoint(options.baseline)
        if saved is not None:
            now = asdict(options)
            changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now) if k in saved and saved[k] != now[k]]
            stale = [k for k in PIPELINE_STAGE_CONTENT if k in saved and saved[k] != now[k]]
            if stale:  # finished stages are reused as they are: they would not reflect the change
                raise ValueError(f"--resume: {', '.join(c for c in changed if c.split()[0] in stale)} would change "
                                 f"what the stages finished in {out} were made with, and they are reused as they are; "
                                 "resume without changing them, or start again with --overwrite or another --out")
            print(f"effst: resuming {out} with the options saved in its plan.json"
                  + (f"; overridden here: {', '.join(changed)}" if changed else ""), file=sys.stderr)
        def pipeline(work: Path):
            try:
                return run_pipeline(options, work, resume=args.resume, shown_as=out)
            except StagesFailed as failed:  # a finished, resumable run: kept (under --overwrite, moved into place)
                return failed

        result = _in_folder(folder, pipeline)
        if isinstance(result, StagesFailed):
            raise RuntimeError(str(result))
        print(f"effst: pipeline report: {Path(out) / 'report.md'} ({result['wall_time_s']:.0f} s)")
        for line in result["conclusions"]["statements"]:
            print(f"  - {line}")
        return 0
    raise AssertionError(args.command)


def _keep_input(checkpoint: Path, out: Path, overwrite: bool, flag: str = "checkpoint") -> None:
    """``--overwrite`` deletes the old folder: refuse when the checkpoint being read lives in it."""
    if not overwrite or not Path(out).is_dir():
        return
    source, target = Path(checkpoint).resolve(), Path(out).resolve()
    if target == source or target in source.parents:
        raise ValueError(f"--out {out} --overwrite would delete {flag} {checkpoint}, which this command reads; "
                         "write the result to another folder")


def _is_main_rank() -> bool:
    """Rank 0 under torchrun (or a plain run): the one process that owns the output folder."""
    return os.environ.get("RANK", "0") == "0"


def _checkpoint(args: argparse.Namespace) -> dict:
    from effst.train.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint)


def _print_summary(summary: dict, out: Optional[Path]) -> None:
    if not summary:  # not the main rank of a distributed run
        return
    params = summary["parameters"]
    act = summary["activity"]
    blocks = summary["compression"]["blocks"]
    compression = "nothing kept in the blocks" if blocks is None or blocks == float("inf") else f"{blocks:.2f}×"
    print(f"effst: {summary['stage']}: test accuracy {100 * summary['accuracy']:.2f} % "
          f"({summary['test']['samples']} samples); params {params['total_nonzero']:,} non-zero of {params['total']:,} "
          f"(blocks {params['blocks_nonzero']:,}); compression (blocks) {compression}; "
          f"firing rate {act['mean_firing_rate']:.4f}; energy {act['energy_uj']:.4f} µJ/sample")
    tokens = summary.get("token_selection")
    if tokens:
        print(f"effst: token selection {tokens['selector']} at keep ratio {tokens['keep_ratio']:g}: image tokens per "
              f"block {', '.join(f'{t:g}' for t in tokens['tokens_per_block'])}")
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
