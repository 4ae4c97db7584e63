#!/usr/bin/env bash
# Set up lowshot on a fresh machine (Debian, Python >= 3.10, CPU or GPU).
#   bash scripts/setup.sh          library + CLI + default data (Fashion-MNIST)
#   bash scripts/setup.sh --test   also the test extras (pytest, hypothesis, scikit-learn, safetensors, tensorboard, headless Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# 1. PyTorch first, pinned: an unpinned `torch` would pull GBs of CUDA wheels on a CPU machine.
#    (On a GPU machine, install the torch build you want beforehand; any torch>=2.4 is kept.)
if ! "$PY" -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi

# 2. lowshot itself (editable), with the test extras when asked.
if [ $want_test = 1 ]; then
  "$PY" -m pip install -q -e ".[test]"
else
  "$PY" -m pip install -q -e .  # matplotlib (figures) is a core dependency
fi

# 3. Fashion-MNIST, the default data: Debian's package when missing and apt is usable.
apt_ok() { command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; }; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_updated=0
apt_install() {  # apt_install PKG...: one `apt-get update` per set-up (a new machine has no package lists)
  [ $apt_updated = 1 ] || { $SUDO apt-get update -qq; apt_updated=1; }
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ] && [ ! -f "${LOWSHOT_DATA:-/nonexistent}/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  if apt_ok; then
    apt_install dataset-fashion-mnist
  else
    echo "Fashion-MNIST not found and apt-get is not usable here. Either:" >&2
    echo "  - run 'lowshot data download fashion_mnist' (needs internet; stores it under \$LOWSHOT_DATA/fashion-mnist)," >&2
    echo "  - or put the four IDX .gz files in \$LOWSHOT_DATA/fashion-mnist/." >&2
  fi
fi

# 4. Headless Chromium for the report-rendering test (tests skip it when absent).
if [ $want_test = 1 ] && ! command -v chromium >/dev/null && apt_ok; then
  apt_install chromium 2>/dev/null || echo "note: chromium not installed; the HTML rendering test will be skipped" >&2
fi
echo "lowshot set up: $("$PY" -c 'import lowshot, torch; print("lowshot", lowshot.__version__, "torch", torch.__version__)')"
