#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, as run on a lent GPU machine (the `device` tool).
#
#   bash benchmarks/gpu_run.sh check    # whether onnxruntime runs on CUDA there
#   bash benchmarks/gpu_run.sh perf     # benchmarks/perf.py --device cuda
#   bash benchmarks/gpu_run.sh tests    # the test suite with torch on CUDA
#   bash benchmarks/gpu_run.sh large    # benchmarks/large_model.py: a 2.4 GB model
#
# That machine has its own Python with torch, onnx, onnxruntime (CPU build), numpy, typer
# and rich, and no network: onnx2pytorch travels as a wheel in .whl/ (git-ignored) and is
# installed to /tmp/site; the project runs from the checkout (PYTHONPATH). The
# onnxruntime-gpu wheel (255 MB) is too large to travel in one call (64 MiB): where
# ORT_GPU_ARCHIVE names a .tar.xz of its unpacked files, reassembled there beforehand, it is
# unpacked into /tmp/site, ahead of the CPU build, and finds CUDA 13 and cuDNN 9 in the
# nvidia-* packages that torch brings (LD_LIBRARY_PATH). Results go to $OUT (the folder the
# device tool brings back), or ./gpu-results when run elsewhere.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if [ -n "${ORT_GPU_ARCHIVE:-}" ] && [ ! -d /tmp/site/onnxruntime ]; then
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site')" \
        "$ORT_GPU_ARCHIVE"
fi
nvidia_libs=$(find "$(python3 -c 'import site; print(site.getsitepackages()[0])')/nvidia" \
    -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "$(nproc) CPU cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
    python3 -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), '| onnx', onnx.__version__, '| onnxruntime',
o.__version__, o.get_available_providers())"
    python3 -c "from ecprune_onnx import runtime; print('onnxruntime on CUDA:', runtime.cuda_usable())"
}

case "${1:-perf}" in
check)  # whether onnxruntime runs on CUDA here, with its error where it does not
    machine | tee "$OUT/machine.txt"
    python3 -c "
import numpy as np, onnxruntime as o
from ecprune_onnx import runtime
s = o.InferenceSession(runtime._probe_model().SerializeToString(),
    providers=runtime.with_options([runtime.CUDA_PROVIDER]))
print(s.get_providers(), s.get_provider_options()[runtime.CUDA_PROVIDER]['use_tf32'])
s.run(None, {'x': np.zeros(1, np.float32)})"
    ;;
perf)
    machine | tee "$OUT/machine.txt"
    python3 benchmarks/perf.py --device cuda --sizes 1e6 1e7 1e8 --rows 256 1024 4096 \
        --outputs 10 --max-rss-gb 100 --json "$OUT/gpu_perf.json" 2>&1 | tee "$OUT/gpu_perf.md"
    # the other target case: 16 Hutchinson probes for 1000 outputs
    python3 benchmarks/perf.py --device cuda --sizes 1e7 1e8 --rows 4096 --outputs 1000 \
        --max-rss-gb 100 --json "$OUT/gpu_perf_1000.json" 2>&1 | tee "$OUT/gpu_perf_1000.md"
    ;;
tests)
    machine | tee "$OUT/machine.txt"
    # the whole suite with torch on CUDA (--device auto); test_exporters needs skl2onnx,
    # which that machine lacks
    timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -n 12 -p no:cacheprovider -rfE \
        --ignore=tests/test_exporters.py 2>&1 | tail -60 | tee "$OUT/tests.txt"
    ;;
large)
    machine | tee "$OUT/machine.txt"
    python3 benchmarks/large_model.py --weights 600e6 --methods ec magnitude --rows 64 \
        --max-rss-gb 110 2>&1 | tee "$OUT/large_model.md"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh check|perf|tests|large" >&2
    exit 2
    ;;
esac
