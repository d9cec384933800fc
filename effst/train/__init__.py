"""Training pipeline: settings, the training loop, checkpoints, DDP, reports and ``effst pipeline``.

Stages (each also an ``effst`` subcommand): :func:`pretrain` (``train``), :func:`prune`,
:func:`finetune` (converts LIF to sLIF first), :func:`evaluate_checkpoint` (``eval``), and
:func:`run_pipeline` (``pipeline``: all of them over sparsities, methods and seeds).

Modules: ``config`` (settings), ``loop`` (training), ``checkpoint``, ``metrics``, ``runs`` (the
stages), ``run_folder`` (output folders, --resume/--overwrite), ``pipeline`` (orchestration),
``pipeline_workers`` (one stage in a worker process), ``pipeline_report`` (tables, verdicts,
plot), ``statistics`` (paired t-intervals), ``report`` (one run's report), ``distributed``.
"""
from effst.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_atomic
from effst.train.config import DEFAULTS, Settings, load_config_file, resolve
from effst.train.loop import Interrupted, TrainingDiverged, fit, make_optimizer, warmup_cosine
from effst.train.metrics import evaluate, measure_activity, parameter_counts
from effst.train.pipeline import PipelineOptions, run_pipeline
from effst.train.run_folder import RunFolder, RunFolderError
from effst.train.runs import evaluate_checkpoint, finetune, pretrain, prune
from effst.train.statistics import PairedComparison, paired_comparison

__all__ = [
    "CheckpointError", "DEFAULTS", "Interrupted", "PairedComparison", "PipelineOptions", "RunFolder", "RunFolderError",
    "Settings", "TrainingDiverged", "paired_comparison", "evaluate", "evaluate_checkpoint",
    "finetune", "fit", "load_checkpoint", "load_config_file", "make_optimizer", "measure_activity",
    "model_from_checkpoint", "parameter_counts", "pretrain", "prune", "resolve", "run_pipeline", "save_atomic",
    "warmup_cosine",
]
