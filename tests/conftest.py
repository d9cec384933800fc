"""Test set-up shared by every test module.

Triton kernels run on the CPU through Triton's interpreter unless EFFST_TEST_DEVICE=cuda
(set by bench/gpu_check.sh on the GPU machine). The variable must be set before triton is
imported anywhere, which is why it happens here at the top of conftest.

Tests marked ``gpu`` need a CUDA device: on the CPU they are deselected (reported in the
summary line as "deselected"), and EFFST_TEST_DEVICE=cuda on a machine where torch sees no CUDA
device is an error rather than a run that silently skips them.
"""
import os

DEVICES = ("cpu", "cuda")
DEVICE = os.environ.get("EFFST_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    if DEVICE not in DEVICES:
        raise pytest.UsageError(f"EFFST_TEST_DEVICE: expected one of {list(DEVICES)}, got {DEVICE!r}")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("EFFST_TEST_DEVICE=cuda, but torch.cuda.is_available() is False "
                                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")


def pytest_report_header(config):
    where = "Triton interpreter (TRITON_INTERPRET=1)" if DEVICE == "cpu" else torch.cuda.get_device_name()
    return f"effst: EFFST_TEST_DEVICE={DEVICE}, kernels on the {where}"


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
