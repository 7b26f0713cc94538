#!/usr/bin/env bash
# Installs what wanfactory needs on a fresh Debian machine (CPU): system tools, then the project.
# torch==2.13.0 goes first: any other torch spec would pull several GB of CUDA packages here.
# A GPU host installs its own CUDA torch first and can run the same script with SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
missing=""
command -v ffmpeg >/dev/null || missing="$missing ffmpeg"
command -v radosgw >/dev/null || missing="$missing radosgw"
command -v ceph-mon >/dev/null || missing="$missing ceph-mon"
command -v ceph-osd >/dev/null || missing="$missing ceph-osd"
command -v chromium >/dev/null || missing="$missing chromium"
# Fonts for the visible watermark's label and the contact sheets.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$missing fonts-dejavu-core"
# opencv-python (pulled by invisible-watermark) loads libGL and glib at import.
ldconfig -p | grep -q "libGL.so.1 " || missing="$missing libgl1"
ldconfig -p | grep -q "libgthread-2.0.so.0 " || missing="$missing libglib2.0-0"
if [ -n "$missing" ]; then
  echo "installing system packages:$missing"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ "${SKIP_TORCH:-0}" != 1 ]; then
  python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q -e ".[dev]"
echo "wanfactory installed: $(command -v wanfactory)"
