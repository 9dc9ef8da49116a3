#!/usr/bin/env bash
# Sets up ns-4d-methods in ./.venv: the pinned torch/torchvision pair, nerfstudio, diffusers and the package.
#   ./setup.sh            install for use
#   ./setup.sh --dev      also the test tools (pytest, playwright) and, as root, Debian's chromium for the viewer test
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[test]"; fi

"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras}"

# ns-render writes videos with ffmpeg; use the static build from imageio-ffmpeg when the system has none.
if ! command -v ffmpeg >/dev/null; then
  ln -sf "$(.venv/bin/python -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" .venv/bin/ffmpeg
fi

if [[ -n "$extras" ]] && ! command -v chromium >/dev/null; then
  if [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Debian's 'chromium' package to run the browser viewer test (it is skipped without it)"
  fi
fi
echo "ready: source .venv/bin/activate"
