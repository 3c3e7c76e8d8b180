#!/usr/bin/env bash
# Every speed and memory benchmark, one after the other, on an otherwise idle machine.
# Each benchmark prints JSON lines with its own baseline measured in the same process; they are collected in
# $OUT (default docs/results/benchmarks.jsonl), each line tagged with the benchmark that printed it.
#
#   bash benchmarks/all.sh CIFAR10_JPEG.tar.gz [docs/results/benchmarks.jsonl]
set -euo pipefail
DATA=${1:?usage: benchmarks/all.sh CIFAR10_DATA [OUT.jsonl]}
OUT=${2:-docs/results/benchmarks.jsonl}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$(dirname "$OUT")"
: > "$OUT"

run() {  # run NAME CMD...: keep the JSON lines, tagged with NAME
    local name=$1; shift
    echo "== $name: $*" >&2
    "$@" 2>/dev/null | { grep '^{' || true; } | sed "s/^{/{\"bench\": \"$name\", /" | tee -a "$OUT"
}

# A full step against the trunk alone: the first cpu-quick (32 px), the 64 px reference setting (dense scoring against a 50k bank,
# and against a 1.28M bank, where both 4,096 and 32,000 negatives are gathered rows; once more with the dense path
# forced at 32,000 (the threshold before gathered_scores), and once with a float16 bank), and ResNet-50 at the
# paper's sizes.
run step $PY benchmarks/step.py --image-size 32 --patch-size 9 --batch 64 --num-samples 10000 --negatives 8192
run step $PY benchmarks/step.py --image-size 64 --patch-size 18 --batch 64 --num-samples 50000 --negatives 4096 32000
run step $PY benchmarks/step.py --image-size 64 --patch-size 18 --batch 64 --num-samples 1281167 \
    --negatives 4096 32000
run step $PY benchmarks/step.py --image-size 64 --patch-size 18 --batch 64 --num-samples 1281167 \
    --negatives 32000 --dense-ratio 64
run step $PY benchmarks/step.py --image-size 64 --patch-size 18 --batch 64 --num-samples 1281167 \
    --negatives 4096 32000 --bank-dtype float16
run step $PY benchmarks/step.py --arch resnet50 --image-size 224 --patch-size 64 --batch 16 --num-samples 1281167 \
    --negatives 4096 32000 --steps 2 --rounds 2
# One loss term scored densely against gathered rows: where the dense-scoring threshold comes from.
run bank_scoring $PY benchmarks/bank_scoring.py --num-samples 1281167 --batch 64 --negatives 4096 32000 128000
run bank_scoring $PY benchmarks/bank_scoring.py --num-samples 50000 --batch 64 --negatives 1024 2048 4096 8192
# The data pipeline per thread: real CIFAR-10 JPEGs, and photo-sized synthetic JPEGs (500x375).
run data $PY benchmarks/data.py --data "$DATA" --images 500 --batched --batch 64
run data $PY benchmarks/data.py --images 256 --synthetic-size 500x375 --batched --batch 64 --settings 64px paper
# Peak memory of a step, and of the bank and negatives alone.
run memory $PY benchmarks/memory.py --image-size 64 --patch-size 18 --batch 64 --negatives 4096 32000
run bank_memory $PY benchmarks/bank_memory.py
# 1 against 2 processes on the CPU (torchrun, gloo), same global batch.
run scaling $PY benchmarks/scaling.py --procs 1 2 --images 1024 --batch 64 --epochs 1
