"""Test set-up shared by every test module.

Triton kernels run on the CPU through Triton's interpreter unless EFFST_TEST_DEVICE=cuda
(set by bench/gpu_check.sh on the GPU machine). The variable must be set before triton is
imported anywhere, which is why it happens here at the top of conftest.
"""
import os

DEVICE = os.environ.get("EFFST_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> str:
    """Device the kernel tests run on: 'cpu' (Triton interpreter) or 'cuda'."""
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE != "cuda" or not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (EFFST_TEST_DEVICE=cuda); run bench/gpu_check.sh")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
