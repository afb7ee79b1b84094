#!/usr/bin/env bash
# Download the wheels the one-GPU acceptance check (bench/gpu_check.py) needs on an air-gapped GPU node
# whose image has only CUDA, Python 3.12, torch, transformers and safetensors (with their dependencies):
# megatron-core, omegaconf and psutil, pinned as in requirements-gpu.txt, for CPython 3.12 on manylinux
# x86-64. Never torch, NVIDIA or vLLM wheels. The project itself runs from its source checkout there.
#
#   tools/gpu_bundle.sh [OUT_DIR]            # here, with the package registry; default OUT_DIR: gpu_bundle
#   # there, with the checkout and OUT_DIR copied along (at most 64 MiB in all):
#   python3 -m pip install --no-index --no-deps --target /tmp/megatron-rl-site OUT_DIR/*.whl
#   PYTHONPATH=/tmp/megatron-rl-site:$PWD python3 bench/gpu_check.py
#
# It fails if a wheel is missing for that platform, if a torch/NVIDIA/CUDA wheel came along, or if the
# folder exceeds LIMIT_MIB (64). It prints each wheel, its size and what it requires (all of which the
# image must have: torch, numpy, packaging and PyYAML).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-gpu_bundle}
PYTHON=${PYTHON:-python3}   # any python with pip; the wheels are chosen for 3.12 whatever its version
LIMIT_MIB=${LIMIT_MIB:-64}
PACKAGES=(megatron-core omegaconf psutil)

pins=()
for package in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${package}==" requirements-gpu.txt || true)
  if [[ -z $pin ]]; then
    echo "error: requirements-gpu.txt pins no ${package}" >&2
    exit 1
  fi
  pins+=("$pin")
done

rm -rf "$OUT"
mkdir -p "$OUT"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64 manylinux_2_12_x86_64 manylinux_2_5_x86_64; do
  platforms+=(--platform "$platform")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${platforms[@]}" --dest "$OUT" "${pins[@]}"

shopt -s nullglob nocaseglob
forbidden=("$OUT"/torch-* "$OUT"/nvidia* "$OUT"/cuda* "$OUT"/vllm* "$OUT"/triton-*)
shopt -u nocaseglob
if [[ ${#forbidden[@]} -gt 0 ]]; then
  echo "error: the bundle must not carry ${forbidden[*]}" >&2
  exit 1
fi
wheels=("$OUT"/*.whl)
if [[ ${#wheels[@]} -ne ${#PACKAGES[@]} ]]; then
  echo "error: expected ${#PACKAGES[@]} wheels in $OUT, found ${#wheels[@]}" >&2
  exit 1
fi
mib() { awk -v bytes="$1" 'BEGIN { printf "%.2f", bytes / 1048576 }'; }
total=0
for wheel in "${wheels[@]}"; do
  size=$(stat -c %s "$wheel")
  total=$((total + size))
  requires=$("$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(name).decode().splitlines()
print(", ".join(line.split(":", 1)[1].strip() for line in lines
                if line.startswith("Requires-Dist:") and "extra ==" not in line) or "nothing")
EOF
)
  printf '%s  %s MiB  requires: %s\n' "$(basename "$wheel")" "$(mib "$size")" "$requires"
done
checkout=0
if git rev-parse --git-dir > /dev/null 2>&1; then
  checkout=$(git ls-files -z | du -cb --files0-from=- 2> /dev/null | tail -n 1 | cut -f 1)
fi
echo "total: $(mib "$total") MiB in $OUT (limit $LIMIT_MIB MiB); with the checkout's tracked files" \
  "($(mib "$checkout") MiB): $(mib $((total + checkout))) MiB"
if [[ $total -gt $((LIMIT_MIB * 1048576)) ]]; then
  echo "error: the bundle exceeds ${LIMIT_MIB} MiB" >&2
  exit 1
fi
