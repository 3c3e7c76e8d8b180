#!/usr/bin/env bash
# The GPU check: one prepared script, under 8 minutes on one H200, one JSON file of results.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check
#
# 1. Python: PIRL_PYTHON if set, else the first python3 / python whose torch sees a CUDA device, else a fresh
#    venv with torch==2.14.1 torchvision==0.29.1. Missing project dependencies are installed with pip; on a
#    machine without a network, point PIRL_WHEELS at a folder of wheels (pip download omegaconf ... -d DIR;
#    see docs/gpu.md) and they are installed from there alone.
# 2. Stages (benchmarks/gpu_check.py), each time-limited, a failure recorded and the next one run: the
#    CUDA-marked tests, the ResNet-50 step at paper sizes with AMP, the batched views on the device, a PIRL
#    run of about 2 minutes (does the loss fall?) and kNN of that run on the device.
# Results: OUT_DIR/gpu_check.json (rewritten after every stage), stage logs under OUT_DIR/logs/.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-$PWD/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"

has_cuda_torch() { timeout 120 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

PY=${PIRL_PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && has_cuda_torch "$candidate"; then PY=$(command -v "$candidate"); break; fi
    done
fi
if [ -z "$PY" ]; then
    VENV=${PIRL_VENV:-${TMPDIR:-/tmp}/pirl-gpu-venv}
    echo "[gpu_check] no torch with CUDA found: making $VENV"
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 || {
        echo "[gpu_check] could not install torch"; }
    PY=$VENV/bin/python
fi
echo "[gpu_check] python: $PY"

# The project's own dependencies (torch and torchvision come from the step above), and pytest for the tests.
missing=()
for pair in omegaconf:omegaconf yaml:pyyaml safetensors:safetensors tqdm:tqdm sklearn:scikit-learn \
            matplotlib:matplotlib PIL:pillow numpy:numpy tensorboard:tensorboard pytest:pytest hypothesis:hypothesis; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[gpu_check] installing: ${missing[*]}"
    if [ -n "${PIRL_WHEELS:-}" ]; then
        "$PY" -m pip install -q --no-index --find-links "$PIRL_WHEELS" --no-build-isolation "${missing[@]}" \
            || echo "[gpu_check] some packages did not install from $PIRL_WHEELS"
    else
        timeout 300 "$PY" -m pip install -q "${missing[@]}" || echo "[gpu_check] some packages did not install"
    fi
fi

cd "$REPO"
# Ten minutes at most, whatever happens inside: the stages' own limits add up to less.
timeout -k 10 590 "$PY" benchmarks/gpu_check.py "$OUT_DIR" "${@:2}"
status=$?
echo "[gpu_check] results: $OUT_DIR/gpu_check.json (exit $status)"
exit $status
