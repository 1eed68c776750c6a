#!/usr/bin/env bash
# Put real datasets in place: Fashion-MNIST from Debian's dataset-fashion-mnist package.
set -euo pipefail
FMNIST_DIR=/usr/share/datasets/fashion-mnist
REPO_RAW="$(cd "$(dirname "$0")/.." && pwd)/data/FashionMNIST/raw"
for dir in "$FMNIST_DIR" "${SCADLES_DATA_DIR:-/nonexistent}/FashionMNIST/raw" "$REPO_RAW"; do
  if compgen -G "$dir/train-images-idx3-ubyte*" >/dev/null; then
    echo "data: Fashion-MNIST present in $dir"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  echo "data: installing Debian package dataset-fashion-mnist"
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  test -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" && { echo "data: Fashion-MNIST installed in $FMNIST_DIR"; exit 0; }
fi
echo "data: Fashion-MNIST not found in $FMNIST_DIR; install it with 'apt-get install dataset-fashion-mnist'" \
     "or put the four *-ubyte.gz files in data/FashionMNIST/raw/ (torchvision layout)" >&2
exit 1
