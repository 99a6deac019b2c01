#!/usr/bin/env bash
# `make demo`: Tf-KD-reg on real data (Fashion-MNIST) on CPU, in well under 10 minutes on 2 cores.
# A 1-channel ResNet-18 at 28 px, 20k training images, 4 epochs; reports top-1 / NLL / ECE on the
# validation split carved from the training set, and where the checkpoint is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/fashion-mnist}
OUT=${OUT:-output/demo}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "Fashion-MNIST is not installed; installing Debian's dataset-fashion-mnist..."
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null
  else
    sudo -n true 2>/dev/null && (sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist) >/dev/null || {
      echo "demo: cannot install dataset-fashion-mnist without root: run 'apt-get install -y dataset-fashion-mnist' as root" >&2
      exit 1
    }
  fi
fi

"$PY" -m timm_tfkd.cli fashion-mnist "$DATA" --train-size 20000 --val-size 5000 --test-size 2000
rm -rf "$OUT/reg-resnet18"
"$PY" train_tfkd.py --data-dir "$DATA" --model resnet18 --num-classes 10 --in-chans 1 --img-size 28 \
  --mean 0.286 --std 0.353 --scale 0.75 1 --ratio 0.9 1.1 --color-jitter 0 --hflip 0.5 \
  -b 128 --lr 0.1 --epochs 4 --warmup-epochs 0 --sched cosine --weight-decay 5e-4 -j 2 \
  --tfkd-mode reg --tfkd-formula paper --tfkd-alpha 0.1 --tfkd-temperature 20 \
  --output "$OUT" --experiment reg-resnet18 --log-interval 40
