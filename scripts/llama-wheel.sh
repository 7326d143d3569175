#!/usr/bin/env bash
# Build llama-cpp-python from its sdist once per machine and install the cached wheel.
# There is no prebuilt wheel on the package index here; the build takes several minutes,
# so the wheel is kept under $INFERLEDGER_HOME/wheels and reused by later runs.
set -euo pipefail
VERSION="${LLAMA_CPP_VERSION:-0.3.16}"
PIP="${1:-.venv/bin/pip}"
HOME_DIR="${INFERLEDGER_HOME:-$HOME/.cache/inferledger}"
WHEELS="$HOME_DIR/wheels"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION from its sdist (once; cached in $WHEELS)" >&2
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
        "$PIP" wheel --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$WHEELS"
fi
"$PIP" install --quiet --no-deps "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
# its runtime dependencies (numpy, typing-extensions, diskcache, jinja2) are ordinary wheels
"$PIP" install --quiet diskcache jinja2 typing-extensions numpy
