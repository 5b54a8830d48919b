#!/usr/bin/env bash
# MLflow and what it needs, as wheels for the GPU machines lent to this project (Python 3.12,
# x86-64, no network), into .whl/ (git-ignored) for scripts/gpu_check.sh to install there.
# Run it here, where the package registry answers. It leaves out what that machine's image
# already holds (ON_DEVICE: the names of MLflow's dependencies in its package list, read
# 2026-11-17), so that what travels stays small: ≈35 MiB of the 64 MiB a device call carries.
# Then: the device tool's run with command "bash scripts/gpu_check.sh" and carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${MLFLOW_VERSION:-$(.venv/bin/python -c 'import mlflow; print(mlflow.__version__)' 2>/dev/null || echo 3.17.2)}
ON_DEVICE="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
click cloudpickle contourpy cycler fonttools frozenlist h11 idna jinja2 joblib kiwisolver
markupsafe matplotlib multidict narwhals numpy packaging pandas pillow propcache protobuf pyarrow
pyparsing python-dateutil pyyaml requests scikit-learn scipy six threadpoolctl tqdm
typing-extensions urllib3 werkzeug yarl zipp"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d "$scratch" "mlflow==$VERSION"

rm -rf .whl
mkdir .whl
for wheel in "$scratch"/*.whl; do
    # A wheel's name up to its version, in the normal form (lower case, runs of -_. as -).
    name=$(basename "$wheel" | sed -E 's/-[0-9].*//' | tr 'A-Z_.' 'a-z--')
    case " $(echo $ON_DEVICE) " in
    *" $name "*) ;;
    *) cp "$wheel" .whl/ ;;
    esac
done
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), for mlflow $VERSION in .whl/"
