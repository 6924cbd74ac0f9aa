#!/usr/bin/env bash
# Create bench/.venv-hest: hestcore 1.0.4 (HEST-1k's own patcher) beside, not inside, the project venv.
#
# hestcore declares scanpy, pytorch-lightning, datasets, ... as dependencies, but the module the
# benchmark calls (hestcore.wsi: OpenSlide read_region + cv2.resize) imports only the packages
# installed below. Installing it with --no-deps and exactly those keeps the venv small (no torch)
# while running hestcore's own unmodified code. OpenSlide itself comes from the openslide-bin wheel.
#
# Usage: bash bench/setup_hest_venv.sh [PYTHON]     (default python3; re-running is a no-op)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${1:-python3}
VENV=.venv-hest
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import hestcore.wsi" 2>/dev/null; then
  echo "$VENV ready"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --no-deps "hestcore==1.0.4"
# What hestcore/wsi.py and hestcore/vst_save_utils.py import, plus psutil for the benchmark.
"$VENV/bin/python" -m pip install --quiet \
  "openslide-python>=1.3.1" openslide-bin opencv-python-headless geopandas shapely numpy pillow tqdm h5py psutil
"$VENV/bin/python" -c "import hestcore.wsi, openslide; print('hestcore', __import__('importlib.metadata').metadata.version('hestcore'), 'openslide', openslide.__library_version__)"
