#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned requirements, and the
# Fashion-MNIST data from Debian's dataset-fashion-mnist package when it is missing.
# Sourced by run.sh and test.sh; safe to run again (it only does what is missing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${FEDSUITE_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.requirements-installed"
if [ ! -f "$stamp" ] || ! cmp -s "$here/requirements.txt" "$stamp"; then
    echo "setup: installing requirements (torch 2.14.1 from this machine's disk, about a minute)" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" >&2
    cp "$here/requirements.txt" "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist
if [ ! -f "$fmnist/train-images-idx3-ubyte.gz" ] && [ ! -d "$here/data/FashionMNIST/raw" ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
    if command -v apt-get >/dev/null; then
        echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)" >&2
        $sudo apt-get install -y -q dataset-fashion-mnist >&2 \
            || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q dataset-fashion-mnist >&2; } \
            || echo "setup: could not install dataset-fashion-mnist; put the IDX files in ./data/FashionMNIST/raw" >&2
    fi
fi
export PATH="$venv/bin:$PATH"
