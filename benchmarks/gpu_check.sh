#!/usr/bin/env bash
# The prepared GPU checks, one call each on a machine with an NVIDIA GPU (results go to $OUT, default ./gpu_out):
#   bash benchmarks/gpu_check.sh bench   # ResNet-50 224 px, batch 128, bf16 autocast + channels_last: CE / reg / self
#   bash benchmarks/gpu_check.sh study   # the Fashion-MNIST study of docs/results, larger, seeds run side by side
# Needs torch with CUDA; timm >= 1.0.31 is installed from a wheel in .devcarry/ when the machine has an older one,
# and Fashion-MNIST's four idx .gz files are read from .devcarry/ (or Debian's package folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

if ! "$PY" -c 'import timm, sys; sys.exit(tuple(map(int, timm.__version__.split(".")[:3])) < (1, 0, 31))' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/timm-*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__,
"|", torch.cuda.get_device_name(), "|", __import__("os").cpu_count(), "CPU cores")'
} | tee "$OUT/machine.txt"

case "${1:-}" in
  bench)
    "$PY" -m benchmarks.overhead --device cuda --amp-bf16 --section "${SECTION:-all}" --models resnet50:3x224x224:128 \
      --loss-sizes 128x100,256x1000 --steps 30 --markdown "$OUT/gpu_bench.md" 2>&1 | tee "$OUT/gpu_bench.log"
    ;;
  study)
    SEEDS=${SEEDS:-0 1 2}
    SOURCE=.devcarry
    [ -f "$SOURCE/train-images-idx3-ubyte.gz" ] || SOURCE=/usr/share/datasets/fashion-mnist
    DATA=/tmp/fashion-mnist
    "$PY" -m timm_tfkd.cli fashion-mnist "$DATA" --train-size "${TRAIN_SIZE:-30000}" --val-size 5000 --source "$SOURCE"
    STUDY=(-m timm_tfkd.cli study --data-dir "$DATA" --out /tmp/study --model "${MODEL:-resnet18}" --epochs "${EPOCHS:-10}"
           --device cuda --extra="--num-classes 10 --img-size 28 --in-chans 1 --mean 0.286 --std 0.353 -b 256 --lr 0.2
           --warmup-epochs 1 --weight-decay 5e-4 --scale 0.75 1 --ratio 0.9 1.1 --color-jitter 0 --hflip 0.5 --crop-pct 1
           --amp --amp-dtype bfloat16
           --channels-last -j ${WORKERS:-5}")
    # One study process per seed side by side (runs of one seed depend on each other, seeds do not), then one
    # pass over all seeds that finds every run finished and writes the combined tables.
    pids=()
    for seed in $SEEDS; do
      timeout "${STUDY_TIMEOUT:-420}" "$PY" "${STUDY[@]}" --seeds "$seed" > "$OUT/study_seed$seed.log" 2>&1 &
      pids+=($!)
    done
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    # The combined pass only reports when every run is finished (it would otherwise train what is missing).
    [ "$failed" = 0 ] && "$PY" "${STUDY[@]}" --seeds $SEEDS 2>&1 | tail -n 40 | tee "$OUT/study.log"
    cp /tmp/study/results.md /tmp/study/results.csv /tmp/study/results.png "$OUT/" 2>/dev/null
    tail -n 5 "$OUT"/study_seed*.log
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh bench|study" >&2
    exit 2
    ;;
esac
