#!/usr/bin/env bash
# The wheels the GPU check needs on a GPU machine that has no package registry (docs/benchmarks/README.md,
# "The GPU check"): the packages the project imports that its image lacks, at the versions installed on
# this developer machine (the versions the test suite ran with), for CPython 3.12 on manylinux x86-64.
#
#     bash scripts/gpu_wheels.sh            # into .whl/ (ignored by git), then prints the sizes
#     WITH="bitsandbytes==0.48.2" bash scripts/gpu_wheels.sh   # optional extras, if they fit
#
# Exits 1 when the wheels and the repository together pass the 64 MiB a GPU call can carry.
# PyAV is left out on purpose (36 MB): the check keeps its clips in memory without it.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT_MIB=64
DEST=.whl
PACKAGES=(diffusers torchao pydantic pydantic_core pydantic-settings typing-inspection annotated-types
          python-dotenv importlib-metadata typing-extensions)

version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

specs=()
for name in "${PACKAGES[@]}"; do
    specs+=("$name==$(version "$name")")
done
# shellcheck disable=SC2206
specs+=(${WITH:-})

rm -rf "$DEST" && mkdir -p "$DEST"
for spec in "${specs[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
done

ls -1 "$DEST"
# What a GPU call carries: the tracked and untracked-not-ignored files, and the wheels.
python3 - "$DEST" "$LIMIT_MIB" <<'PY'
import subprocess, sys
from pathlib import Path

dest, limit = Path(sys.argv[1]), int(sys.argv[2])
def size(paths):
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True)
tree = size(p for p in listed.stdout.decode().split("\0") if p)
wheels = size(dest.glob("*.whl"))
mib = 2**20
print(f"wheels {wheels / mib:.1f} MiB + working tree {tree / mib:.1f} MiB = {(wheels + tree) / mib:.1f} MiB of {limit} MiB")
if wheels + tree > limit * mib:
    sys.exit("over the limit: carry fewer wheels (drop WITH=...)")
PY
