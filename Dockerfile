# syntax=docker/dockerfile:1
# attnscope dashboard server. CPU PyTorch by default; for a CUDA build:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
# Run: docker run -p 8000:8000 -e ATTNSCOPE_TOKEN=... -v attnscope-data:/data attnscope

ARG PYTHON_VERSION=3.11

# --- build: a venv with the pinned dependencies, then the project itself ---------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first (a layer that survives code changes): torch, then the pinned rest.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
COPY pyproject.toml constraints.txt README.md /app/
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
deps = tomllib.load(open("/app/pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("torch")))
PY
RUN pip install -c /app/constraints.txt -r /tmp/requirements.txt
# Then the code, built into the wheel and installed like any user's (not editable): the
# image runs what `pip install attnscope-*.whl` gives, page included. No dependency
# resolution: they are all installed.
COPY transformer_core /app/transformer_core
COPY server /app/server
COPY frontend /app/frontend
RUN pip wheel --no-deps --wheel-dir /tmp/dist /app \
    && pip install --no-deps /tmp/dist/attnscope-*.whl

# --- runtime: the venv (the code installed in it), as a non-root user ------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 attnscope && mkdir /data && chown attnscope /data
COPY --from=build /opt/venv /opt/venv
# Only the examples (docker-compose's trainer runs one); the code is in the venv.
COPY examples /app/examples
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ATTNSCOPE_DATA_DIR=/data \
    ATTNSCOPE_PORT=8000
USER attnscope
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health', timeout=2)"]
# Bound to all interfaces, so a token is required: ATTNSCOPE_TOKEN, or one is generated
# and printed in the log (docker logs) as a URL with ?token=.
CMD ["attnscope", "serve", "--host", "0.0.0.0"]
