"""Device choice for the multi-rank tests.

A test that takes the `device` fixture runs once per device: "cpu" (gloo ranks) and "npu" (one NPU
per rank, HCCL; the Buffer takes the NPU path). The NPU runs are skipped, with the reason, unless
torch_npu is importable and enough NPUs are visible.

    python -m pytest tests/python/deepep                    # both (NPU skipped without torch_npu)
    python -m pytest tests/python/deepep --device npu       # only the NPU runs
    DEEP_EP_TEST_DEVICE=cpu python -m pytest tests/python/deepep
"""

from __future__ import annotations

import functools
import os

import pytest

CHOICES = ("all", "cpu", "npu")


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=CHOICES,
        default=os.environ.get("DEEP_EP_TEST_DEVICE", "all"),
        help="run the device-parametrized tests on cpu, npu or both (default: all; env DEEP_EP_TEST_DEVICE)",
    )


@functools.lru_cache(maxsize=None)
def _npu_skip_reason():
    from deep_ep.testing import npu_skip_reason

    return npu_skip_reason()


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames:
        return
    choice = metafunc.config.getoption("device")
    params = []
    if choice in ("all", "cpu"):
        params.append(pytest.param("cpu", id="cpu"))
    if choice in ("all", "npu"):
        reason = _npu_skip_reason()
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param("npu", id="npu", marks=marks))
    metafunc.parametrize("device", params)
