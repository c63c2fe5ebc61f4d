# Sourced by the docs/gpu/*/run.sh scripts, run from the repository root on a lent GPU machine:
#   . "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
# Sets OUT (default ./out, created) and CHARLLM_HOME (default /tmp/charllm-home); installs the
# Python packages the machine lacks (pydantic, sqlalchemy) from the wheels in .whl/
# (pip download --python-version 3.12 --only-binary=:all: pydantic sqlalchemy -d .whl) and puts
# them and the repository on PYTHONPATH.
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export CHARLLM_HOME=${CHARLLM_HOME:-/tmp/charllm-home}
if ! python3 -c 'import pydantic, sqlalchemy' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/charllm-wheels .whl/*.whl
  export PYTHONPATH=/tmp/charllm-wheels
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
