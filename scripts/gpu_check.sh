#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU, in order of what matters most within one
# 10-minute run: the GPU tests, a profile of where an epoch's time goes, the fast path's
# benchmark (compiled, bf16, NHWC, data on the device: images/s and MFU) and profile, then the earlier
# workload for comparison. Each step gets what is left of DEADLINE_S (default 590 s); steps
# can be picked: `bash scripts/gpu_check.sh tests profile fast baseline` (default: all four).
# Logs and the merged bench/results.json go to $OUT (default gpu-check/). A machine whose
# Python lacks MLflow gets it from wheels in .whl/ (docs/harness.md, "On a GPU", says how they
# are fetched: scripts/gpu_wheels.sh); nothing else is installed.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + ${DEADLINE_S:-590}))
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests profile fast baseline)

if ! "$PYTHON" -c "import mlflow" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    install=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
    # Into the interpreter's own environment, else (read-only there) beside it.
    if ! "${install[@]}" .whl/*.whl; then
        "${install[@]}" --target /tmp/mlflow-wheels .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/mlflow-wheels" PATH="$PATH:/tmp/mlflow-wheels/bin"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import mlflow, lightning, torch, dlharness.training.train
print('torch', torch.__version__, 'lightning', lightning.__version__, 'mlflow', mlflow.__version__,
      'gpu', torch.cuda.get_device_name(0))" || exit 1
# Triton builds a small C launcher per kernel: --compile needs a C compiler on the machine.
command -v cc >/dev/null || echo "gpu_check: no C compiler (cc): the --compile steps will fail"

status=0
# Runs "$@" with a timeout of its share of what is left (at most $1 seconds), logged to $2.
step() {
    local most=$1 log=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "gpu_check: no time left for $log" | tee "$OUT/$log"
        status=1
        return
    fi
    local limit=$((left < most ? left : most))
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log" || status=1
    echo "gpu_check: $log took $((SECONDS - started)) s (limit $limit s)"
}

for name in "${STEPS[@]}"; do
    case $name in
    tests)
        step 170 gpu-tests.log "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/integration/test_gpu.py \
            tests/integration/test_tracker.py::test_real_gpu_is_described tests/integration/test_cli.py -k "gpu or bad_input"
        ;;
    profile)
        # The second epoch of the 2026-11-26 workload (batch 256, uncompiled), as dlharness runs it.
        step 90 profile-on-device.log "$PYTHON" bench/gpu_profile.py --workload \
            gpu_heavy_data_on_device --variant c --epochs 2 --out "$OUT/profile-on-device.json"
        ;;
    fast)
        step 330 bench-fast.log "$PYTHON" bench/tracking_cost.py --device gpu --repeats 2 \
            --variants abc --workloads gpu_fast
        # After the benchmark, whose compilations Inductor's cache keeps for this one.
        step 90 profile-fast.log "$PYTHON" bench/gpu_profile.py --workload gpu_fast --variant c \
            --epochs 3 --out "$OUT/profile-fast.json"
        ;;
    baseline)
        step 200 bench-on-device.log "$PYTHON" bench/tracking_cost.py --device gpu --repeats 2 \
            --variants abc --workloads gpu_heavy_data_on_device
        ;;
    *)
        echo "gpu_check: unknown step $name (tests, profile, fast, baseline)" >&2
        exit 2
        ;;
    esac
done
cp bench/results.json "$OUT/results.json"
exit $status
