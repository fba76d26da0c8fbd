#!/usr/bin/env bash
# Set-up and run commands for a fresh machine (Linux, Python 3.10+).
#   ./dev.sh demo   train a tiny reward LoRA on CPU with embedded random-weight models
#   ./dev.sh test   run the test suite (the ComfyUI tier too when COMFYUI_PATH is set)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # torch is normally the user's ComfyUI's; here we pin the release the tests use.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  if [ -n "${COMFYUI_PATH:-}" ] && [ -x "$COMFYUI_PATH/.venv/bin/python" ]; then
    # The ComfyUI tier loads the pack inside that ComfyUI: give it our requirements.
    DS_BUILD_OPS=0 "$COMFYUI_PATH/.venv/bin/python" -m pip install -q -r requirements-dev.txt
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" -m training.demo "$@"
    ;;
  test)
    setup
    # Reference implementations for the exactness tests: they pin old libraries, so no deps.
    "$VENV/bin/python" -m pip install -q --no-deps -r tests/requirements-reference.txt
    "$VENV/bin/python" -m pip install -q clint args
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo | test [pytest args]" >&2
    exit 2
    ;;
esac
