#!/usr/bin/env bash
# Put real datasets in place: Fashion-MNIST from Debian's dataset-fashion-mnist package.
set -euo pipefail
FMNIST_DIR=/usr/share/datasets/fashion-mnist
REPO_RAW="$(cd "$(dirname "$0")/.." && pwd)/data/FashionMNIST/raw"
# Every rank of every run reads the training split: keep a decompressed copy in data/ (55 MB;
# the loader prefers it), so that a 16-rank start-up does not gunzip it 16 times.
unpacked() {  # unpacked DIR: decompressed copies of DIR's *.gz in data/FashionMNIST/raw
  local gz
  [ "$1" = "$REPO_RAW" ] && return 0
  mkdir -p "$REPO_RAW"
  for gz in "$1"/*-ubyte.gz; do
    [ -f "$gz" ] || continue
    [ -f "$REPO_RAW/$(basename "$gz" .gz)" ] || gunzip -c "$gz" > "$REPO_RAW/$(basename "$gz" .gz)"
  done
}
for dir in "$FMNIST_DIR" "${SCADLES_DATA_DIR:-/nonexistent}/FashionMNIST/raw" "$REPO_RAW"; do
  if compgen -G "$dir/train-images-idx3-ubyte*" >/dev/null; then
    unpacked "$dir"
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
  test -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" && { unpacked "$FMNIST_DIR"
    echo "data: Fashion-MNIST installed in $FMNIST_DIR"; exit 0; }
fi
echo "data: Fashion-MNIST not found in $FMNIST_DIR; install it with 'apt-get install dataset-fashion-mnist'" \
     "or put the four *-ubyte.gz files in data/FashionMNIST/raw/ (torchvision layout)" >&2
exit 1
