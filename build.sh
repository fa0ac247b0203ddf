#!/usr/bin/env bash
# Builds the deep_ep wheel into output/.
#
#   bash build.sh -a deepep     # Atlas A3 (default)
#   bash build.sh -a deepep2    # Atlas A2
#
# The SoC is recorded in the wheel (deep_ep/_build_info.py, TARGET_SOC) through the
# environment variable DEEP_EP_TARGET_SOC, which setup.py reads. Without CANN on this
# machine the CPU package is built (TARGET_SOC = "cpu") and the script says so.
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
