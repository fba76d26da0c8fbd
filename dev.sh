#!/usr/bin/env bash
# Set-up and run commands for a fresh machine (Linux, Python 3.10+).
#   ./dev.sh demo   train a tiny reward LoRA on CPU with embedded random-weight models
#   ./dev.sh test   run the test suite (the ComfyUI tier too when COMFYUI_PATH is set)
#   ./dev.sh lint   ruff check . with pyproject's [tool.ruff] (CI runs it before the tests)
# Set-up is skipped while the requirement files it installed are unchanged: a stamp in the venv
# holds their sha256 (delete .venv/.dev-setup-* to force it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
# torch is normally the user's ComfyUI's; here we pin the release the tests use.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

fingerprint() {  # sha256 of the torch pins and the given files
  { printf '%s\n' "${TORCH_PINS[@]}"; cat "$@"; } | sha256sum | cut -d' ' -f1
}

# once STAMP STEP FILES...: run STEP unless STAMP holds the fingerprint of FILES, then record it
once() {
  local stamp=$1 step=$2 want
  shift 2
  want=$(fingerprint "$@")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  "$step"
  echo "$want" >"$stamp"
}

install_dev() {
  "$VENV/bin/python" -m pip install -q "${TORCH_PINS[@]}"
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
}

install_comfyui() {
  # The ComfyUI tier loads the pack inside that ComfyUI: give it our requirements.
  DS_BUILD_OPS=0 "$COMFYUI_PATH/.venv/bin/python" -m pip install -q -r requirements-dev.txt
}

install_reference() {
  # Reference implementations for the exactness tests: they pin old libraries, so no deps; the few
  # small imports they need beyond ours come from the -deps file.
  "$VENV/bin/python" -m pip install -q --no-deps -r tests/requirements-reference.txt
  "$VENV/bin/python" -m pip install -q -r tests/requirements-reference-deps.txt
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  once "$VENV/.dev-setup-dev" install_dev requirements.txt requirements-dev.txt
  if [ -n "${COMFYUI_PATH:-}" ] && [ -x "$COMFYUI_PATH/.venv/bin/python" ]; then
    once "$COMFYUI_PATH/.venv/.wan-reward-lora-setup" install_comfyui requirements.txt requirements-dev.txt
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
    once "$VENV/.dev-setup-reference" install_reference tests/requirements-reference.txt \
      tests/requirements-reference-deps.txt
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    setup
    shift
    exec "$VENV/bin/ruff" check . "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo | test [pytest args] | lint [ruff args]" >&2
    exit 2
    ;;
esac
