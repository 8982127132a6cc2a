#!/usr/bin/env bash
# Wheels of what the device machine's image lacks (the web stack), for Python 3.12 x86-64,
# into .whl/ (git-ignored): carried by bench/gpu_check.sh. Run here, where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
for spec in fastapi starlette "uvicorn" pydantic pydantic-core pydantic-settings \
        python-dotenv annotated-types typing-inspection websockets plotly platformdirs \
        httptools; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -c constraints.txt -d .whl "$spec" \
        || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 -d .whl "$spec"
done
ls .whl
