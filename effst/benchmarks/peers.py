"""Peer environments: each SpikingJelly version in its own install location and subprocess.

SpikingJelly 0.0.0.0.14 and 2.0.0 cannot share a Python environment, so every peer gets a
directory ``<peers_dir>/<name>`` filled by ``pip install --no-deps --target`` (from carried
wheels in ``.whl/`` when they are there, else from the package registry) and is run as
``<this python> bench/peers/<runner> `` with that directory first on ``PYTHONPATH``. The peer
re-uses this interpreter's torch, numpy and friends; only what the base interpreter lacks
(e.g. loguru for 2.0.0) is installed next to the peer. A peer that cannot be installed or run
comes back as a :class:`PeerRun` with ``ok=False`` and the error text, never as nothing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RESULT_MARKER = "EFFST_PEER_RESULT "  # printed by bench/peers/peer_common.py (MARKER there)
STAMP = ".effst-peer.json"


@dataclass(frozen=True)
class PeerSpec:
    """A peer library: what to install, and the version its runners must find."""

    name: str
    label: str
    requirement: str  # pip requirement of the peer itself, installed with --no-deps
    version: str  # the version the runner must find (isolation check)
    # (import name, requirement) pairs installed next to the peer only if the base lacks them
    extras: tuple[tuple[str, str], ...] = ()


PEERS: dict[str, PeerSpec] = {
    "sj2": PeerSpec(
        name="sj2",
        label="spikingjelly 2.0.0",
        requirement="spikingjelly==2.0.0",
        version="2.0.0",
        # 2.0.0 also declares torchvision, torchaudio, h5py, SciencePlots, scipy, requests...:
        # its neuron code imports only loguru of them (checked by blocking the rest), and
        # pulling torchvision would replace the pinned torch.
        extras=(("loguru", "loguru>=0.7,<1"),),
    ),
    "sj014": PeerSpec(
        name="sj014",
        label="spikingjelly 0.0.0.0.14",
        requirement="spikingjelly==0.0.0.0.14",
        version="0.0.0.0.14",  # its neuron code needs only torch and numpy (+ cupy on GPU)
    ),
}


@dataclass
class PeerEnv:
    """Where a peer is installed, or why it is not."""

    spec: PeerSpec
    path: Path
    ok: bool
    source: str = ""  # "wheels", "registry", "existing"
    error: str = ""
    log: str = ""


@dataclass
class PeerRun:
    """What one runner subprocess returned."""

    ok: bool
    payload: dict = field(default_factory=dict)
    error: str = ""
    returncode: Optional[int] = None
    stderr_tail: str = ""
    seconds: float = 0.0


def _missing_extras(spec: PeerSpec) -> list[str]:
    return [req for module, req in spec.extras if importlib.util.find_spec(module) is None]


def _wheel_for(requirement: str, wheels: Optional[Path]) -> bool:
    """Whether ``wheels`` holds a wheel for a pinned ``name==version`` requirement."""
    if wheels is None or not wheels.is_dir() or "==" not in requirement:
        return False
    name, version = requirement.split("==", 1)
    prefix = f"{name.replace('-', '_')}-{version}-"
    return any(p.name.startswith(prefix) and p.suffix == ".whl" for p in wheels.iterdir())


def ensure_env(spec: PeerSpec, peers_dir: Path, wheels: Optional[Path] = None, *,
               timeout: float = 600.0) -> PeerEnv:
    """Create (or re-use) the isolated install location of ``spec``.

    Re-used when its stamp file records the same requirements. Installs into a temporary
    sibling first and renames it into place, so an interrupted install never looks complete.
    """
    path = peers_dir / spec.name
    requirements = [spec.requirement, *_missing_extras(spec)]
    stamp = path / STAMP
    if stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("requirements") == requirements:
            return PeerEnv(spec, path, True, source="existing")
    peers_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=peers_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the finished environment is not
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
            "--disable-pip-version-check", "--upgrade", "--target", str(staging),
            # an offline machine (the GPU one) must fail fast, not retry for minutes
            "--retries", "1", "--timeout", "10"]
    attempts = []  # carried wheels alone first, then the registry (with the wheels as a source)
    if wheels is not None and wheels.is_dir():
        if _wheel_for(spec.requirement, wheels):
            attempts.append(("wheels", base + ["--no-index", "--find-links", str(wheels)]))
        attempts.append(("registry", base + ["--find-links", str(wheels)]))
    else:
        attempts.append(("registry", base))
    errors, logs, source = [], [], ""
    for source, command in attempts:
        try:
            done = subprocess.run(command + requirements, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"[{source}] pip install timed out after {timeout:.0f} s")
            continue
        log = (done.stdout + done.stderr).strip()
        logs.append(f"[{source}] {log}")
        if done.returncode == 0:
            break
        errors.append(f"[{source}] pip install {' '.join(requirements)} failed (exit {done.returncode}): {_tail(log, 600)}")
    else:
        shutil.rmtree(staging, ignore_errors=True)
        return PeerEnv(spec, path, False, source, error="; ".join(errors), log="\n".join(logs))
    (staging / STAMP).write_text(json.dumps({"requirements": requirements, "source": source,
                                             "python": sys.executable}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
    return PeerEnv(spec, path, True, source, log="\n".join(logs))


def run_runner(env: PeerEnv, runner: Path, request: dict, *, timeout: float,
               extra_env: Optional[dict] = None) -> PeerRun:
    """Run ``runner`` with the peer's directory first on PYTHONPATH; ``request`` goes to stdin.

    The runner prints one line ``EFFST_PEER_RESULT <json>``; everything else it prints is
    logging. A crash, a timeout or a missing result line is returned as an error with the
    tail of stderr.
    """
    if not runner.is_file():
        return PeerRun(False, error=f"peer runner {runner} not found: the harness runs peers from a clone's "
                                    "bench/peers/ (pass --bench-dir)")
    child_env = dict(os.environ)
    child_env.pop("TRITON_INTERPRET", None)  # a benchmark never runs the interpreter
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(env.path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    child_env["PYTHONNOUSERSITE"] = "1"
    child_env.update(extra_env or {})
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(runner)], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout, env=child_env,
                              cwd=str(runner.parent))
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return PeerRun(False, error=f"runner timed out after {timeout:.0f} s", stderr_tail=_tail(stderr, 1500),
                       seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                payload = json.loads(line[len(RESULT_MARKER):])
            except ValueError as exc:
                return PeerRun(False, error=f"runner printed malformed JSON: {exc}",
                               returncode=done.returncode, stderr_tail=_tail(done.stderr, 1500), seconds=seconds)
            return PeerRun(bool(payload.get("ok")), payload, error=payload.get("error", ""),
                           returncode=done.returncode, stderr_tail=_tail(done.stderr, 1500), seconds=seconds)
    return PeerRun(False, error=f"runner exited with code {done.returncode} without a result line",
                   returncode=done.returncode, stderr_tail=_tail(done.stderr or done.stdout, 1500), seconds=seconds)


def _tail(text: str, limit: int) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]
