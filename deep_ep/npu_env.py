"""The old name of ``deep_ep.npu.env``: ``python -m deep_ep.npu_env`` keeps working."""

import sys

from .npu.env import hccl_buffsize_mb, main, report

__all__ = ["hccl_buffsize_mb", "report", "main"]

if __name__ == "__main__":
    sys.exit(main())
