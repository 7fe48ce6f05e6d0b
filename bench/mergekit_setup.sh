#!/usr/bin/env bash
# mergekit in its own venv for bench/bench_merge.py (never in .venv: it pins its own transformers/peft/torch ranges).
# torch is installed first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
#   bash bench/mergekit_setup.sh            -> .cache/mergekit-venv/bin/mergekit-yaml
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REFORGE_MERGEKIT_VENV:-.cache/mergekit-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MERGEKIT_SPEC=${MERGEKIT_SPEC:-mergekit==0.1.5}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/mergekit-yaml" ]; then
    echo "mergekit already installed in $VENV ($("$VENV/bin/pip" show mergekit | sed -n 's/^Version: //p'))"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_SPEC"
"$VENV/bin/pip" install -q "$MERGEKIT_SPEC"
echo "mergekit $("$VENV/bin/pip" show mergekit | sed -n 's/^Version: //p') installed in $VENV"
