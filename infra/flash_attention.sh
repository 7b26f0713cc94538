#!/usr/bin/env bash
# Install FlashAttention's CuTe-DSL kernels (flash_attn.cute) into one folder, for the engine's
# "auto" attention on Hopper and Blackwell GPUs (wan_engine/attention.py; measured in bench/README.md).
#
#   infra/flash_attention.sh TARGET [pip options...]
#   export PYTHONPATH=TARGET:TARGET/nvidia_cutlass_dsl/python_packages:$PYTHONPATH
#
# Why a folder of its own, put on PYTHONPATH, rather than the environment's site-packages:
# - flash_attn.cute is Python code written for nvidia-cutlass-dsl 4.1.0 (the DSL's API moves between
#   releases), and that DSL asks for cuda-python < 13, while CUDA 13 torch environments carry
#   cuda-bindings 13; the folder's cuda-bindings 12.9 shadows it for the DSL alone (torch does not use it).
# - PyPI has flash-attn only as an sdist whose build compiles the FlashAttention-2 CUDA extension for
#   an hour; the CuTe-DSL kernels need none of it, so only that subpackage is taken from the sdist,
#   under an empty flash_attn/__init__.py (the sdist's imports the extension).
# pip options pass through, e.g. `--python-version 3.12 --platform manylinux_2_28_x86_64
# --only-binary=:all:` to fill a folder for another machine (bench/gpu-bundle.sh engine does).
set -euo pipefail
target=${1:?usage: infra/flash_attention.sh TARGET [pip options...]}
shift
FLASH_ATTN_VERSION=2.8.3.post2
mkdir -p "$target/flash_attn"
python3 -m pip install -q --no-deps --upgrade --target "$target" "$@" \
  nvidia-cutlass-dsl==4.1.0 cuda-bindings==12.9.4
python3 - "$target" "$FLASH_ATTN_VERSION" <<'PY'
import io, re, sys, tarfile, urllib.request
from pathlib import Path

target, version = Path(sys.argv[1]), sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/flash-attn/").read().decode()
url = re.search(rf'href="([^"#]*flash_attn-{re.escape(version)}\.tar\.gz)', index).group(1)
with tarfile.open(fileobj=io.BytesIO(urllib.request.urlopen(url).read())) as sdist:
    prefix = f"flash_attn-{version}/flash_attn/"
    members = [m for m in sdist.getmembers() if m.name.startswith(prefix + "cute/") and m.isfile()]
    for member in members:
        member.name = member.name.removeprefix(prefix)
        sdist.extract(member, target / "flash_attn", filter="data")
(target / "flash_attn" / "__init__.py").write_text(f'"""flash_attn.cute only, from flash-attn {version}."""\n')
print(f"flash_attn.cute ({len(members)} files) from flash-attn {version} in {target}")
PY
