#!/usr/bin/env bash
# Pack what the GPU image lacks into carries for the device tool.
#
# bench/gpu-bundle.sh engine: one carry, .gpu/engine, for python3 -m bench.engine and bench.attention:
#   diffusers, ftfy, the kernels package diffusers checks for, peft (diffusers' LoRA backend), torchao
#   (the 8-bit modes), and FlashAttention's CuTe-DSL kernels as infra/flash_attention.sh installs them. Start the run with
#   `source .gpu/engine/add.sh`: it unpacks into /tmp/site and sets PYTHONPATH.
#
# peft: the image lists one, of a version nobody has read there; the engine needs >= 0.17 (pyproject)
# for its adapters, so both carries bring the version the CPU tests run (PEFT_VERSION).
#
# bench/gpu-bundle.sh [fleet]: for python3 -m bench.fleet and bench.context_parallel, two carries:
#   .gpu/a  diffusers, ftfy, c2pa-python and a static ffmpeg 7.0.2 (imageio-ffmpeg 0.6.0's, with
#           vidstab, minterpolate and libx264), unpacked at once; plus the first piece of part B
#   .gpu/b  the rest of part B: Ray, Prefect (and its server), moto's S3 server, nudenet,
#           invisible-watermark, PyWavelets, minio, ffmpeg-python, openpyxl, cryptography, langcodes
# Each stays under the device's 64 MiB carry with the working tree. Carry .gpu/a in one run and
# .gpu/b in the run right after (the machine keeps /tmp for ~30 s between runs); start the runs
# with `bash .gpu/a/add.sh` and `bash .gpu/b/add.sh`; both unpack into /tmp/site.
set -euo pipefail
PEFT_VERSION=0.21.2
root=$(git rev-parse --show-toplevel)
# The packages the device's GPU image already has (names, listed there in 2026-11): not packed again.
image_packages="$root/bench/gpu-image-packages.txt"
[ -f "$image_packages" ] || { echo "needs $image_packages (the GPU image's package list)" >&2; exit 2; }
grep -qx '/.gpu/' "$root/.git/info/exclude" || echo '/.gpu/' >> "$root/.git/info/exclude"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" "$@" \
    2> >(grep -v "^WARNING: Location" >&2)
}
if [ "${1:-fleet}" = engine ]; then
  # No dependencies: the image has diffusers' own, and kernels is only checked for by version.
  download --no-deps -d "$tmp/whl" diffusers==0.42.1 ftfy wcwidth kernels==0.17.2 "peft==$PEFT_VERSION" \
    torchao==0.17.0
  for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
  bash "$root/infra/flash_attention.sh" "$tmp/site" --python-version 3.12 --implementation cp \
    --only-binary=:all: --ignore-requires-python "${plat[@]}" 2> >(grep -v "^WARNING: Location" >&2)
  find "$tmp/site" -name '__pycache__' -prune -exec rm -rf {} +
  rm -rf "$root/.gpu/engine"; mkdir -p "$root/.gpu/engine"
  tar -cf - -C "$tmp/site" . | xz -T0 -6 > "$root/.gpu/engine/site.tar.xz"
  cat > "$root/.gpu/engine/add.sh" <<'ADD'
# Sourced at the start of a device run (bench/gpu-bundle.sh engine).
here=$(dirname "${BASH_SOURCE[0]}")
mkdir -p /tmp/site
[ -f /tmp/site/.engine ] || { xz -d < "$here/site.tar.xz" | tar -xf - -C /tmp/site && touch /tmp/site/.engine; }
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages PYTHONUNBUFFERED=1
echo "gpu bundle: engine unpacked"
ADD
  du -sh "$root/.gpu/engine"
  exit 0
fi

download -d "$tmp/whl" diffusers==0.42.1 ftfy ray==2.60.0 'minio<8' ffmpeg-python prefect==3.8.8 \
  'fastapi>=0.139,<0.151' 'sqlalchemy<2.1' 'moto[s3]==5.2.1' flask flask-cors nudenet==3.4.2 \
  invisible-watermark==0.2.0 PyWavelets c2pa-python==0.38.0 openpyxl pydantic-settings typer langcodes \
  "peft==$PEFT_VERSION"
download --no-deps -d "$tmp/ffmpeg" imageio-ffmpeg==0.6.0

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
for w in "$tmp"/whl/*.whl; do
  n=$(norm "$(basename "$w" | cut -d- -f1)")
  # The image has torch, CUDA and OpenCV (headless); imageio-ffmpeg's newest ffmpeg is too big to carry.
  case "$n" in torch|triton|nvidia-*|opencv-python|imageio-ffmpeg) continue ;; esac
  [ "$n" != peft ] && grep -qx "$n" "$image_packages" && continue
  case "$n" in diffusers|ftfy|wcwidth|c2pa-python|peft) dest=a ;; *) dest=b ;; esac
  mkdir -p "$tmp/$dest"; unzip -q -o "$w" -d "$tmp/$dest"
done
mkdir -p "$tmp/a/bin"
unzip -q -o -j "$tmp"/ffmpeg/*.whl 'imageio_ffmpeg/binaries/ffmpeg-*' -d "$tmp/a/bin"
mv "$tmp"/a/bin/ffmpeg-* "$tmp/a/bin/ffmpeg"; chmod +x "$tmp/a/bin/ffmpeg"
rm -rf "$tmp/b/ray/jars"; find "$tmp" -name '*.js.map' -delete
find "$tmp/a" "$tmp/b" -name '__pycache__' -prune -exec rm -rf {} +
rm -rf "$root/.gpu/a" "$root/.gpu/b"; mkdir -p "$root/.gpu/a" "$root/.gpu/b"
tar -cf - -C "$tmp/a" . | xz -T0 -9 > "$root/.gpu/a/a.tar.xz"
tar -cf - -C "$tmp/b" . | xz -T0 -9 > "$tmp/b.tar.xz"
# Part B's first piece rides with part A, filling that carry to ~63 MB.
room=$(( 63000000 - $(stat -c %s "$root/.gpu/a/a.tar.xz") ))
head -c "$room" "$tmp/b.tar.xz" > "$root/.gpu/a/b.tar.xz.00"
tail -c +"$((room + 1))" "$tmp/b.tar.xz" > "$root/.gpu/b/b.tar.xz.01"
cat > "$root/.gpu/a/add.sh" <<'ADD'
#!/usr/bin/env bash
# Part A of the GPU bundle (bench/gpu-bundle.sh): unpacked now; part B's first piece stashed for the next run.
set -e
here=$(dirname "$0")
mkdir -p /tmp/site /tmp/gpu-parts
[ -f /tmp/site/.a ] || { xz -d < "$here/a.tar.xz" | tar -xf - -C /tmp/site; touch /tmp/site/.a; }
cp "$here"/b.tar.xz.00 /tmp/gpu-parts/
echo "gpu bundle: part A unpacked; B piece 0 stashed"
ADD
cat > "$root/.gpu/b/add.sh" <<'ADD'
#!/usr/bin/env bash
# Part B of the GPU bundle (bench/gpu-bundle.sh): needs part A's run right before this one.
set -e
here=$(dirname "$0")
[ -f /tmp/site/.b ] && exit 0
[ -f /tmp/gpu-parts/b.tar.xz.00 ] || { echo "gpu bundle: carry .gpu/a in the run before this one" >&2; exit 1; }
cat /tmp/gpu-parts/b.tar.xz.00 "$here"/b.tar.xz.01 | xz -d | tar -xf - -C /tmp/site
touch /tmp/site/.b
echo "gpu bundle: part B unpacked"
ADD
chmod +x "$root"/.gpu/a/add.sh "$root"/.gpu/b/add.sh
du -sh "$root/.gpu/a" "$root/.gpu/b"
