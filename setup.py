"""Builds the native core deep_ep_cpp. The C++ source list lives in csrc/sources.txt,
shared with CMakeLists.txt (used for sanitizer and warning builds), so the two
builds cannot drift apart."""
import os
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = Path(__file__).resolve().parent
SOURCES = [f"csrc/{line.strip()}" for line in (HERE / "csrc" / "sources.txt").read_text().splitlines() if line.strip()]
# A changed header rebuilds the module (setuptools compares only the sources' times otherwise).
HEADERS = sorted(f"csrc/{path.name}" for pattern in ("*.hpp", "*.inc") for path in (HERE / "csrc").glob(pattern))

# Written by build.sh: the Ascend SoC this wheel was built for ("A2", "A3" or "cpu").
TARGET_SOC = os.environ.get("DEEP_EP_TARGET_SOC", "cpu")
(HERE / "deep_ep" / "_build_info.py").write_text(
    '"""Written by setup.py at build time."""\n' f'TARGET_SOC = "{TARGET_SOC}"\n'
)

ext = Pybind11Extension(
    "deep_ep_cpp",
    SOURCES,
    depends=HEADERS,
    cxx_std=17,
    # -ffp-contract=off: no fused multiply-add the compiler chooses, so combine sums are the same bits
    # on every build (the reduction's vector path, csrc/x86_blocks.cpp, fuses explicitly where the product is exact).
    extra_compile_args=["-O3", "-ffp-contract=off", "-Wall", "-Wextra"],
    extra_link_args=["-lrt", "-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
