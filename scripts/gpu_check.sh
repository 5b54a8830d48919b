#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU: the GPU tests, then the GPU
# section of the benchmark (merged into bench/results.json). Logs go to $OUT (default
# gpu-check/). A machine whose Python lacks MLflow gets it from wheels in .whl/ (the README's
# "GPU" section says how they are fetched); nothing else is installed.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import mlflow" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    install=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
    # Into the interpreter's own environment, else (read-only there) beside it.
    if ! "${install[@]}" .whl/*.whl; then
        "${install[@]}" --target /tmp/mlflow-wheels .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/mlflow-wheels" PATH="$PATH:/tmp/mlflow-wheels/bin"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import mlflow, lightning, torch, dlharness.app.train
print('torch', torch.__version__, 'lightning', lightning.__version__, 'mlflow', mlflow.__version__,
      'gpu', torch.cuda.get_device_name(0))" || exit 1

status=0
# Seconds per step (10 s imports per process): the whole script fits in 10 minutes.
timeout 200 "$PYTHON" bench/tracking_cost.py --device gpu --repeats 3 --workloads gpu_heavy_data_on_device \
    2>&1 | tee "$OUT/bench-on-device.log" || status=1
timeout 150 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py \
    tests/test_tracker.py::test_real_gpu_is_described tests/test_cli.py -k "gpu or bad_input" \
    2>&1 | tee "$OUT/gpu-tests.log" || status=1
timeout 200 "$PYTHON" bench/tracking_cost.py --device gpu --repeats 3 --workloads gpu_heavy \
    2>&1 | tee "$OUT/bench-loader.log" || status=1
cp bench/results.json "$OUT/results.json"
exit $status
