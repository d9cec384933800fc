"""Test set-up shared by every test module.

Triton kernels run on the CPU through Triton's interpreter unless EFFST_TEST_DEVICE=cuda
(set by bench/gpu_check.sh on the GPU machine). The variable must be set before triton is
imported anywhere, which is why it happens here at the top of conftest.

Tests marked ``gpu`` need a CUDA device: on the CPU they are deselected (reported in the
summary line as "deselected"), and EFFST_TEST_DEVICE=cuda on a machine where torch sees no CUDA
device is an error rather than a run that silently skips them.

For a run that may be cut short (the GPU machine's steps have hard time limits), two settings
make it diagnosable:

- ``EFFST_TEST_REPORT_NOW=1`` (the default with EFFST_TEST_DEVICE=cuda) prints each failure's
  traceback and captured output as soon as the test fails, not only in the end-of-session
  summary, which a killed run never reaches.
- ``EFFST_TEST_TIMEOUT=<seconds>`` limits each test's body: the test fails with
  :class:`TestTimeout` (its traceback shows where it was) and the session goes on. A test stuck
  inside C code, where Python's signal handler cannot run, is stopped ``EFFST_TEST_TIMEOUT_GRACE``
  seconds later (default 10) by faulthandler, which prints every thread's stack to the terminal
  and ends the process. 0 or unset: no limit. (pytest-timeout is not among the wheels
  bench/gpu_check.sh carries, so this does not rely on it.)
"""
import faulthandler
import os
import signal
import sys

DEVICES = ("cpu", "cuda")
DEVICE = os.environ.get("EFFST_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

#: the longest tail of a failure's captured stdout/stderr printed by the immediate report
CAPTURE_TAIL_LINES = 40
#: a long traceback is printed as its first and last lines
TRACEBACK_HEAD_LINES, TRACEBACK_TAIL_LINES = 30, 150


class TestTimeout(BaseException):
    """A test ran past EFFST_TEST_TIMEOUT. A BaseException, so the code under test's
    ``except Exception`` handlers cannot swallow it."""

    __test__ = False  # not a test class, despite the name


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise pytest.UsageError(f"{name}: expected seconds >= 0 (0 = no limit), got {text!r}")
    return value


def _flag_from_env(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if text not in ("0", "1"):
        raise pytest.UsageError(f"{name}: expected 0 or 1, got {text!r}")
    return text == "1"


class _Settings:
    report_now = False
    timeout = 0.0
    grace = 10.0
    terminal = None  # a duplicate of the real stderr, for faulthandler (pytest captures fd 2)
    config = None


def pytest_configure(config):
    if DEVICE not in DEVICES:
        raise pytest.UsageError(f"EFFST_TEST_DEVICE: expected one of {list(DEVICES)}, got {DEVICE!r}")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("EFFST_TEST_DEVICE=cuda, but torch.cuda.is_available() is False "
                                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    _Settings.config = config
    _Settings.report_now = _flag_from_env("EFFST_TEST_REPORT_NOW", DEVICE == "cuda")
    _Settings.timeout = _seconds_from_env("EFFST_TEST_TIMEOUT", 0.0)
    _Settings.grace = _seconds_from_env("EFFST_TEST_TIMEOUT_GRACE", 10.0)
    if _Settings.timeout > 0 and not hasattr(signal, "setitimer"):
        raise pytest.UsageError("EFFST_TEST_TIMEOUT needs signal.setitimer (POSIX)")
    if _Settings.timeout > 0:
        # pytest_configure runs while output capture is suspended: fd 2 is the real stderr here
        _Settings.terminal = os.fdopen(os.dup(2), "w")


def pytest_unconfigure(config):
    if _Settings.terminal is not None:
        _Settings.terminal.close()
        _Settings.terminal = None


def pytest_report_header(config):
    where = "Triton interpreter (TRITON_INTERPRET=1)" if DEVICE == "cpu" else torch.cuda.get_device_name()
    lines = [f"effst: EFFST_TEST_DEVICE={DEVICE}, kernels on the {where}"]
    if _Settings.timeout > 0:
        lines.append(f"effst: EFFST_TEST_TIMEOUT={_Settings.timeout:g} s per test "
                     f"(+{_Settings.grace:g} s before a hard stop)")
    if _Settings.report_now:
        lines.append("effst: failures are printed as they happen (EFFST_TEST_REPORT_NOW=1)")
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """The test body under EFFST_TEST_TIMEOUT (see the module docstring)."""
    seconds = _Settings.timeout
    if seconds <= 0:
        return (yield)

    def on_alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past EFFST_TEST_TIMEOUT={seconds:g} s; the traceback "
                          "shows where it was")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + _Settings.grace, exit=True, file=_Settings.terminal)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _clip(text: str, head: int, tail: int) -> str:
    lines = text.splitlines()
    if len(lines) <= head + tail:
        return text
    return "\n".join(lines[:head] + [f"... ({len(lines) - head - tail} lines left out) ..."]
                     + lines[-tail:])


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """With EFFST_TEST_REPORT_NOW=1: a failure's traceback and output right after its result line."""
    if not (_Settings.report_now and report.failed):
        return
    terminal = _Settings.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None:
        return
    terminal.ensure_newline()
    terminal.write_sep("-", f"{report.nodeid} failed ({report.when}), reported now", red=True)
    terminal.write_line(_clip(report.longreprtext, TRACEBACK_HEAD_LINES, TRACEBACK_TAIL_LINES))
    for name, content in report.sections:
        if "stdout" in name or "stderr" in name:
            lines = content.rstrip().splitlines()
            terminal.write_line(f"--- {name} (last {min(len(lines), CAPTURE_TAIL_LINES)} lines) ---")
            terminal.write_line("\n".join(lines[-CAPTURE_TAIL_LINES:]))
    terminal.write_sep("-", f"end of {report.nodeid}")
    sys.stdout.flush()


@pytest.fixture
def device() -> str:
    """Device the kernel tests run on: 'cpu' (Triton interpreter) or 'cuda'."""
    return DEVICE


def gpu_items(items):
    """The collected tests marked ``gpu``."""
    return [item for item in items if item.get_closest_marker("gpu") is not None]


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        return
    deselected = gpu_items(items)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        chosen = set(map(id, deselected))
        items[:] = [item for item in items if id(item) not in chosen]
