"""Output folders of runs: checked before any work starts, never silently overwritten.

A run folder that already holds files is refused unless the user asks to ``--resume`` it or to
``--overwrite`` it. ``--overwrite`` builds the new run in a hidden sibling folder and renames it
into place only when the run finishes (or stops with a resumable checkpoint), so a failed run
leaves the old one untouched. ``--resume`` of a folder without a checkpoint is refused before
anything is created, and a new run that fails before saving anything resumable (no ``marker``
file) removes what it created, so no empty or half-written folder is left behind to be refused
as "already holds a run" next time.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


class RunFolderError(ValueError):
    """The output location cannot be used; the message names the path and what to do."""


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_writable_location(out: Path, flag: str = "--out") -> None:
    """Raise :class:`RunFolderError` when ``out`` cannot be a folder this process writes into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out}: is a file, expected a directory")
    existing = _nearest_existing(out.absolute())
    if not existing.is_dir():
        raise RunFolderError(f"{flag} {out}: cannot be created because {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK) or not _can_create_file_in(existing):
        raise RunFolderError(f"{flag} {out}: {existing} is not writable")


def _can_create_file_in(directory: Path) -> bool:
    """Probe with an unnamed temporary file: catches read-only mounts and root-only checks alike."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def holds_files(out: Path) -> bool:
    return Path(out).is_dir() and any(Path(out).iterdir())


# What effst writes at the top of a run folder (stage runs, pipelines, token studies, their partial
# states): a folder holding none of these is someone else's, never replaced by --overwrite.
RUN_NAMES = frozenset({"checkpoint.pt", "plan.json", "report.json", "report.md", "summary.json", "log.csv", "tb"})


def holds_an_effst_run(out: Path) -> bool:
    names = {p.name for p in Path(out).iterdir()}
    return bool(names & RUN_NAMES) or any(n.startswith("dense-seed") and n.endswith(".pt") for n in names)


def _holds_cwd(path: Path) -> bool:
    cwd, target = Path.cwd().resolve(), path.resolve()
    return cwd == target or target in cwd.parents


class RunFolder:
    """Where a run writes: ``path`` (the final folder) or a temporary sibling under ``--overwrite``.

    ``marker`` is the file whose presence makes a folder resumable (``checkpoint.pt`` for a
    training run, ``plan.json`` for a pipeline). Use :meth:`commit` when the run ended in a state
    worth keeping and :meth:`discard` otherwise; ``keep_partial`` keeps what a failed new run
    wrote even without a marker (only an empty folder is removed). Under DDP only rank 0 (``main``) touches the
    folder; the other ranks write nothing there.
    """

    def __init__(self, path: Path, *, resume: bool = False, overwrite: bool = False,
                 marker: Optional[str] = "checkpoint.pt", main: bool = True, keep_partial: bool = False):
        self.path = Path(path)
        self.work = self.path
        self.resume = resume
        self.overwrite = overwrite
        self.main = main
        self.marker = marker
        self.keep_partial = keep_partial
        self.existed = self.path.exists()
        absolute = Path(os.path.abspath(self.path))
        # The folders a run creates: ``path`` and its missing parents (removed again if it fails).
        self.created = [absolute, *[p for p in absolute.parents if not p.exists()]]
        self.fresh = False  # a new run in a folder that holds nothing yet (everything in it is ours)
        if not main:  # another rank of a distributed run: rank 0 checks, creates and renames the folder
            return
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite: pick one (continue the run, or replace it)")
        check_writable_location(self.path)
        if resume:
            if marker is not None and not (self.path / marker).is_file():
                raise RunFolderError(f"--resume: {self.path / marker} does not exist, so there is nothing to resume; "
                                     f"drop --resume to start a new run")
        elif holds_files(self.path) and not holds_an_effst_run(self.path):
            names = sorted(p.name for p in self.path.iterdir())
            raise RunFolderError(f"--out {self.path}: holds files that are not an effst run "
                                 f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''}); pick a new or empty "
                                 "folder (--overwrite replaces only an earlier effst run)")
        elif holds_files(self.path) and not overwrite:
            raise RunFolderError(f"--out {self.path}: already holds a run; pass --resume to continue it or "
                                 f"--overwrite to replace it")
        elif holds_files(self.path) and _holds_cwd(self.path):
            raise RunFolderError(f"--out {self.path}: is or contains the current directory, which --overwrite cannot "
                                 "replace; run from another directory")
        self.work = self.path
        self.fresh = not resume and not holds_files(self.path)
        if overwrite and holds_files(self.path):
            self.work = self._sibling("new")
            if not _can_create_file_in(self.work.parent):
                raise RunFolderError(f"--out {self.path}: --overwrite builds the new run beside it, but "
                                     f"{self.work.parent} is not writable")
            if self.work.exists():
                shutil.rmtree(self.work)

    def _sibling(self, kind: str) -> Path:
        """A hidden folder beside ``path`` (``--out`` may be relative, even ``a/..``)."""
        absolute = Path(os.path.abspath(self.path))
        return absolute.parent / f".{absolute.name}.effst-{kind}-{os.getpid()}"

    def create(self) -> Path:
        """Create the working folder (one line with the path on a filesystem error)."""
        if not self.main:
            return self.work
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"--out {self.work}: cannot be created ({error.strerror or error})") from None
        return self.work

    def commit(self) -> Path:
        """Move an ``--overwrite`` run into place (the old run is deleted only after that)."""
        if not self.main or self.work == self.path or not self.work.exists():
            return self.path
        old, target = self._sibling("old"), Path(os.path.abspath(self.path))  # `a/../a` stops resolving once a moves
        os.replace(target, old)
        os.replace(self.work, target)
        shutil.rmtree(old, ignore_errors=True)
        self.work = self.path
        return self.path

    def discard(self) -> None:
        """After a failed run: remove the temporary folder of an ``--overwrite`` run (the old run
        stays), or what a new run created when it saved nothing resumable (no ``marker`` file)."""
        if not self.main:
            return
        if self.work != self.path:
            if self.work.exists():
                shutil.rmtree(self.work, ignore_errors=True)
            return
        if not self.fresh or not self.path.is_dir():
            return
        if self.marker is not None and (self.path / self.marker).is_file():
            return  # e.g. a diverged training run: its last good checkpoint is kept
        if self.keep_partial and any(self.path.iterdir()):
            return  # the caller keeps partial outputs (logs of a long study) for inspection
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.created[1:]:  # missing parents it made, if nothing else went there
                try:
                    parent.rmdir()
                except OSError:
                    break
            return
        for child in self.path.iterdir():  # the folder was there, empty: empty it again
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
