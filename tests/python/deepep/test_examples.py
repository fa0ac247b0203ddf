"""The examples run as documented and pass their own checks.

python -m pytest tests/python/deepep/test_examples.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def run_example(*command: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEP_EP_TIMEOUT_S": "60"}
    result = subprocess.run(command, cwd=EXAMPLES.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_moe_layer(launcher: str) -> None:
    script = str(EXAMPLES / "moe_layer.py")
    if launcher == "spawn":
        out = run_example(sys.executable, script, "--num-processes", "2")
    else:
        out = run_example(
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script, "--scoring", "softmax"
        )
    assert (
        "EP (dispatch/combine) on 2 ranks vs one process" in out
        and "EP (fused_deep_moe) on 2 ranks" in out
        and out.rstrip().endswith("OK")
    ), out
