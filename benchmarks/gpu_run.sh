#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, as run on a lent GPU machine (the `device` tool).
#
#   bash benchmarks/gpu_run.sh perf     # CUDA test subset + benchmarks/perf.py --device cuda
#   bash benchmarks/gpu_run.sh tests    # the test suite with torch on CUDA
#   bash benchmarks/gpu_run.sh large    # benchmarks/large_model.py: a 2.4 GB model
#
# That machine has its own Python with torch, onnx, onnxruntime (CPU build), numpy, typer
# and rich, and no network: onnx2pytorch travels as a wheel in .whl/ (git-ignored) and is
# installed to /tmp/site; the project runs from the checkout (PYTHONPATH). Results go to
# $OUT (the folder the device tool brings back), or ./gpu-results when run elsewhere.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "$(nproc) CPU cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
    python3 -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), '| onnx', onnx.__version__, '| onnxruntime',
o.__version__, o.get_available_providers())"
}

case "${1:-perf}" in
perf)
    machine | tee "$OUT/machine.txt"
    # compress with --device auto picks CUDA here: the pipeline's tests on the GPU path
    timeout 240 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
        tests/test_compress.py tests/test_stats.py tests/test_instrument.py \
        tests/test_sequential.py tests/test_neurons.py tests/test_cli.py 2>&1 |
        tail -15 | tee "$OUT/tests.txt"
    python3 benchmarks/perf.py --device cuda --sizes 1e6 1e7 1e8 --rows 256 1024 4096 \
        --outputs 10 --max-rss-gb 100 --json "$OUT/gpu_perf.json" 2>&1 | tee "$OUT/gpu_perf.md"
    ;;
tests)
    machine | tee "$OUT/machine.txt"
    # the whole suite with torch on CUDA (--device auto); test_exporters needs skl2onnx,
    # which that machine lacks
    timeout 420 python3 -m pytest -q -n 12 -p no:cacheprovider --ignore=tests/test_exporters.py \
        2>&1 | tail -40 | tee "$OUT/tests.txt"
    ;;
large)
    machine | tee "$OUT/machine.txt"
    python3 benchmarks/large_model.py --weights 600e6 --methods ec magnitude --rows 64 \
        --max-rss-gb 110 2>&1 | tee "$OUT/large_model.md"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh perf|tests|large" >&2
    exit 2
    ;;
esac
