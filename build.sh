#!/usr/bin/env bash
# Builds the deep_ep wheel into output/.
#
#   bash build.sh -a deepep     # Atlas A3 (default)
#   bash build.sh -a deepep2    # Atlas A2
#
# The SoC is recorded in the wheel (deep_ep/_build_info.py, TARGET_SOC) through the
# environment variable DEEP_EP_TARGET_SOC, which setup.py reads. Without CANN on this
# machine the CPU package is built (TARGET_SOC = "cpu") and the script says so. When the
# machine's SoC differs from the one asked for, build.sh warns (if torch_npu can tell), and so does
# deep_ep at run time when a Buffer is created on NPUs (deep_ep/npu.py check_build_soc).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash build.sh [-a deepep|deepep2] [-h]

Builds the deep_ep wheel into output/.

  -a deepep    Atlas A3 (Ascend910_93): DEEP_EP_TARGET_SOC=A3 (the default)
  -a deepep2   Atlas A2 (Ascend910B):   DEEP_EP_TARGET_SOC=A2
  -h           print this help

CANN is looked for in $ASCEND_HOME_PATH, $ASCEND_TOOLKIT_HOME and /usr/local/Ascend.
Without it the CPU package is built (TARGET_SOC = "cpu"); it runs on CPU ranks.
The SoC is recorded in the wheel; a warning says so when this machine's NPU is another
SoC (here, if torch_npu can tell, and at run time when a Buffer is created on NPUs).
Install the result with:  pip install output/deep_ep-*.whl
EOF
}

usage_error() {
    echo "build.sh: $1" >&2
    usage >&2
    exit 2
}

TARGET="deepep"
while getopts ":a:h" opt; do
    case "$opt" in
        a) TARGET="$OPTARG" ;;
        h) usage; exit 0 ;;
        :) usage_error "option -$OPTARG needs a value (deepep or deepep2)" ;;
        *) usage_error "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || usage_error "unexpected argument: $1"

case "$TARGET" in
    deepep) SOC="A3" ;;
    deepep2) SOC="A2" ;;
    *) usage_error "unknown -a value '$TARGET' (expected deepep for A3 or deepep2 for A2)" ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")"

CANN_HOME=""
for candidate in "${ASCEND_HOME_PATH:-}" "${ASCEND_TOOLKIT_HOME:-}" /usr/local/Ascend; do
    if [ -n "$candidate" ] && [ -d "$candidate" ]; then
        CANN_HOME="$candidate"
        break
    fi
done

if [ -n "$CANN_HOME" ]; then
    export DEEP_EP_TARGET_SOC="$SOC"
    echo "build.sh: CANN found at $CANN_HOME: building deep_ep for Atlas $SOC (-a $TARGET)"
    # The same check deep_ep makes at run time (deep_ep/npu.py check_build_soc): warn when the SoC
    # asked for is not this machine's. Best effort: needs torch_npu and a visible NPU.
    MACHINE_SOC="$(python - 2>/dev/null <<'EOF' || true
try:
    import torch, torch_npu  # noqa: F401
    name = torch.npu.get_device_name() if torch.npu.is_available() else ""
except Exception:
    name = ""
print("A2" if name.startswith("Ascend910B") else "A3" if name.startswith("Ascend910_93") else "")
EOF
)"
    if [ -z "$MACHINE_SOC" ]; then
        echo "build.sh: could not detect this machine's SoC (no torch_npu or no NPU visible);" \
             "deep_ep warns at run time if the NPU is not an Atlas $SOC"
    elif [ "$MACHINE_SOC" != "$SOC" ]; then
        echo "build.sh: WARNING: building for Atlas $SOC (-a $TARGET), but this machine is Atlas $MACHINE_SOC" \
             "(-a $([ "$MACHINE_SOC" = A2 ] && echo deepep2 || echo deepep) builds for it)" >&2
    fi
else
    export DEEP_EP_TARGET_SOC="cpu"
    echo "build.sh: NO CANN found (ASCEND_HOME_PATH, ASCEND_TOOLKIT_HOME and /usr/local/Ascend are unset or absent)."
    echo "build.sh: building the CPU package instead of the Atlas $SOC one (TARGET_SOC = \"cpu\")."
fi

mkdir -p output
rm -f output/deep_ep-*.whl
# --no-deps: only deep_ep's own wheel (never a copy of torch); the build environment
# needs setuptools and pybind11 only.
python -m pip wheel . --no-deps -w output

wheel="$(ls output/deep_ep-*.whl)"
recorded="$(python - "$wheel" <<'EOF'
import re, sys, zipfile
text = zipfile.ZipFile(sys.argv[1]).read("deep_ep/_build_info.py").decode()
print(re.search(r'TARGET_SOC = "([^"]*)"', text).group(1))
EOF
)"
if [ "$recorded" != "$DEEP_EP_TARGET_SOC" ]; then
    echo "build.sh: the wheel records TARGET_SOC = \"$recorded\", expected \"$DEEP_EP_TARGET_SOC\"" >&2
    exit 1
fi
echo "build.sh: built $wheel (TARGET_SOC = \"$recorded\")"
echo "build.sh: install it with: pip install $wheel"
