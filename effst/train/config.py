"""Training settings: per-dataset defaults, a config file (YAML or JSON), then flags.

Precedence, lowest first: built-in defaults for the dataset and stage (pretraining ``train`` or
``finetune``) < the config file < command-line flags. Fine-tuning defaults are the paper's
Table I (docs/pruning.md). Pretraining defaults for CIFAR-10 / CIFAR10-DVS follow Spikformer's published
training configs (Zhou et al. 2023; they are not in docs/pruning.md). The ``digits`` and ``synthetic``
defaults are effst's own, chosen so that ``effst pipeline`` finishes in under 10 minutes on a
2-core CPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

STAGES = ("train", "finetune")
# The neurons a run can train with (effst.models.NEURONS, less the CUDA-only SpikingJelly variant;
# spelled out here so that validating settings does not import the models).
NEURON_NAMES = ("lif", "plif", "slif", "stl", "spikingjelly")
AMP_MODES = ("auto", "bf16", "off")


@dataclass
class Settings:
    """Everything one training or evaluation run needs. ``None`` means "from the dataset"."""

    data: str = "digits"
    data_dir: Optional[str] = None
    frames: Optional[int] = None  # T the CIFAR10-DVS events are integrated into
    model: Optional[str] = None  # effst.models config name; default: the dataset's
    neuron: str = "lif"
    T: Optional[int] = None
    backend: str = "auto"
    model_overrides: Optional[dict] = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.06
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast on GPU when 'auto'
    threads: Optional[int] = None
    workers: int = 0  # DataLoader workers for file-backed data (CIFAR10-DVS)
    eval_every: int = 1
    eval_batch_size: int = 256
    measure_batches: Optional[int] = None  # test batches used for firing rates / SOPs (None = all)
    progress: bool = True
    tensorboard: bool = True
    synthetic: Optional[dict] = None
    stop_after_steps: Optional[int] = None  # behave as if interrupted after N steps (testing resume)

    def validate(self) -> "Settings":
        """Raise a ValueError naming the first setting that is out of range."""
        from effst.data import DATASET_NAMES

        if self.data not in DATASET_NAMES:
            raise ValueError(f"data: expected one of {list(DATASET_NAMES)}, got {self.data!r}")
        if self.neuron not in NEURON_NAMES:
            raise ValueError(f"neuron: expected one of {list(NEURON_NAMES)}, got {self.neuron!r}")
        if self.backend not in ("auto", "reference", "triton", "native"):
            raise ValueError(f"backend: expected 'auto', 'reference', 'triton' or 'native', got {self.backend!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {list(AMP_MODES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("T", "frames", "threads", "measure_batches", "stop_after_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("workers", self.workers, 0)
        for name, low, high, expected in (("lr", 0.0, math.inf, "a finite number > 0"),
                                          ("weight_decay", 0.0, math.inf, "a finite number >= 0"),
                                          ("warmup_epochs", 0.0, math.inf, "a finite number >= 0"),
                                          ("min_lr_ratio", 0.0, 1.0, "a number in [0, 1]"),
                                          ("label_smoothing", 0.0, 1.0, "a number in [0, 1]")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not (low <= value <= high) or (name == "lr" and value == 0):
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
        for name in ("model_overrides", "synthetic"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: expected a mapping, got {type(getattr(self, name)).__name__}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


SETTING_NAMES = tuple(f.name for f in fields(Settings))

# Per dataset and stage: only what differs from the Settings defaults above.
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        "train": dict(epochs=20, batch_size=128, lr=1e-2, weight_decay=0.01, warmup_epochs=1),
        "finetune": dict(epochs=3, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_epochs=0),
    },
    "synthetic": {
        "train": dict(epochs=3, batch_size=32, lr=5e-3, weight_decay=0.01),
        "finetune": dict(epochs=2, batch_size=32, lr=1e-3, weight_decay=0.01),
    },
    # Spikformer's CIFAR-10 recipe (pretraining) and the paper's Table I (fine-tuning).
    "cifar10": {
        "train": dict(epochs=300, batch_size=64, lr=5e-4, weight_decay=0.06, warmup_epochs=20, label_smoothing=0.1, T=4),
        "finetune": dict(epochs=50, batch_size=128, lr=1e-5, weight_decay=0.06, warmup_epochs=0, T=4),
    },
    "cifar10-dvs": {
        "train": dict(epochs=106, batch_size=16, lr=1e-3, weight_decay=0.06, warmup_epochs=10, label_smoothing=0.1, T=16, frames=16, workers=4),
        "finetune": dict(epochs=56, batch_size=16, lr=1e-4, weight_decay=0.06, warmup_epochs=10, T=16, frames=16, workers=4),
    },
}


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            from effst.data.optional import require

            data = require("yaml", f"reading the YAML config {path}").safe_load(text)
    except ImportError:
        raise
    except Exception as exc:
        raise ValueError(f"config {path}: cannot be parsed ({_parse_error_text(exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of setting: value at the top level")
    return data


def _parse_error_text(exc: Exception) -> str:
    """A parser's error on one line: YAML's spans several (a quoted source excerpt and a caret)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:  # yaml.MarkedYAMLError
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def normalize_keys(values: dict, where: str, allowed: tuple[str, ...] = SETTING_NAMES) -> dict:
    """Accept ``batch-size`` for ``batch_size``; reject unknown keys by name."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(allowed)}")
        out[name] = value
    return out


def resolve(stage: str, *, data: Optional[str] = None, file_values: Optional[dict] = None,
            flag_values: Optional[dict] = None) -> Settings:
    """Settings for ``stage`` from defaults < file < flags (``None`` flags are "not given")."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {list(STAGES)}, got {stage!r}")
    file_values = normalize_keys(file_values or {}, "config")
    flag_values = {k: v for k, v in (flag_values or {}).items() if v is not None}
    dataset = flag_values.get("data") or file_values.get("data") or data or Settings.data
    settings = Settings(data=dataset)
    if dataset in DEFAULTS:
        settings = replace(settings, **DEFAULTS[dataset][stage])
    settings = replace(settings, **file_values)
    settings = replace(settings, **flag_values)
    return settings.validate()
