#!/usr/bin/env bash
# Prepare an aarch64 Python 3.11 with the TVM runtime, run under qemu-aarch64 (docs/toolchain.md#rpc-and-qemu,
# "ARM64 under qemu"). `tensorfold rpc-server --qemu-arm64` and the arm64 tests use it.
#
#   needs: apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user debootstrap
#   output: ${TENSORFOLD_ARM64_ROOT:-$HOME/.cache/tensorfold/arm64}/{rootfs,site,READY}
#
# Idempotent: a finished root (READY present, same recipe) is left as it is; a half-done
# one is redone. Takes ~1-2 min on a fresh machine (debootstrap ~30 s, wheels ~40 MB).
set -euo pipefail

ROOT_DIR="${TENSORFOLD_ARM64_ROOT:-$HOME/.cache/tensorfold/arm64}"
ROOTFS="$ROOT_DIR/rootfs"
SITE="$ROOT_DIR/site"
# The x86 side pins these (pyproject.toml); the remote runtime must be the same TVM.
WHEELS="apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes typing_extensions psutil cloudpickle tornado"
RECIPE="bookworm python3 libstdc++6 | $WHEELS"

if [[ -f "$ROOT_DIR/READY" && "$(cat "$ROOT_DIR/READY")" == "$RECIPE" ]]; then
    echo "arm64 runtime already prepared in $ROOT_DIR"
    exit 0
fi

for tool in debootstrap qemu-aarch64 dpkg; do
    if ! command -v "$tool" >/dev/null; then
        echo "prepare-arm64-runtime: '$tool' is missing; run:" >&2
        echo "  apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user debootstrap" >&2
        exit 1
    fi
done

rm -rf "$ROOTFS" "$SITE" "$ROOT_DIR/READY"
mkdir -p "$ROOT_DIR"

echo "[1/3] debootstrap (arm64, minbase, foreign) into $ROOTFS"
# --foreign: only download and place the packages; the second stage would need binfmt.
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,libstdc++6 bookworm "$ROOTFS" \
    > "$ROOT_DIR/debootstrap.log" 2>&1 || { tail -20 "$ROOT_DIR/debootstrap.log" >&2; exit 1; }

echo "[2/3] unpacking the .debs (--foreign leaves them packed)"
for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
    dpkg -x "$deb" "$ROOTFS"
done
test -x "$ROOTFS/usr/bin/python3.11"

echo "[3/3] aarch64 wheels into $SITE"
# manylinux2014_aarch64 finds nothing for TVM 0.27: ask for manylinux_2_28.
python3 -m pip install --quiet --target "$SITE" --platform manylinux_2_28_aarch64 --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 $WHEELS

echo "checking: import tvm under qemu-aarch64"
PYTHONPATH="$SITE" TVM_USE_RUNTIME_LIB=1 qemu-aarch64 -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" \
    -c "import platform, tvm; print('aarch64 python', platform.python_version(), platform.machine(), 'tvm', tvm.__version__)"

echo "$RECIPE" > "$ROOT_DIR/READY"
echo "arm64 runtime prepared in $ROOT_DIR"
