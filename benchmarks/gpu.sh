#!/usr/bin/env bash
# benchmarks/pipeline.py's GPU figures, on a machine with an NVIDIA GPU, python3
# with torch (CUDA), timm, onnx, onnxruntime, tifffile, pyarrow, click, psutil
# and nvidia-ml-py, and no internet. What else it needs comes as wheels in WHEELS
# (default .whl): lightly, imagecodecs, pyproj, catchment-mae itself, and
# onnxruntime-gpu for the embed part, either as its wheel or as the installed
# package packed into ortgpu.tar.xz and split into pieces (ORT_PIECES, default
# /tmp/ort: `tar -C site -cJ onnxruntime | split -b 56M - ortgpu.tar.xz.`, and
# the output of `cat ortgpu.tar.xz.* | sha256sum` in ortgpu.sha256), for
# transfers that take one piece at a time.
#
# Usage: bash benchmarks/gpu.sh train|embed|all [more pipeline.py options]
# (DEVICE=cpu runs the same on the CPU, to try the script.) Writes its log to
# $OUT/gpu-PART.log (or /tmp) as well as to stdout.
set -euo pipefail
part=${1:-all}
shift || true
case $part in
train | embed | all) ;;
*) echo "usage: bash benchmarks/gpu.sh train|embed|all [pipeline.py options]" >&2; exit 2 ;;
esac
repo=$(pwd)
wheels=$(realpath "${WHEELS:-.whl}")
pieces=${ORT_PIECES:-/tmp/ort}
site=/tmp/cmae-site
data=/tmp/cmae-dems # kept between calls on the same machine: generated once
log=${OUT:-/tmp}/gpu-$part.log

# Installed once per machine, again when the wheels change (a rebuilt cmae).
wheels_sum=$(cat "$wheels"/*.whl | sha256sum)
if [ "$(cat "$site/.installed" 2>/dev/null)" != "$wheels_sum" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$wheels"/*.whl
    echo "$wheels_sum" >"$site/.installed"
fi
export PYTHONPATH=$site PYTHONUNBUFFERED=1

if [ "$part" != train ] && [ "${DEVICE:-cuda}" = cuda ] && ! python3 -c "import onnxruntime as o, sys; \
        sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    (cd "$pieces" && cat ortgpu.tar.xz.* | sha256sum --quiet -c ortgpu.sha256)
    cat "$pieces"/ortgpu.tar.xz.* | python3 -c "import sys, tarfile; \
        tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$site', filter='data')"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    df -h /dev/shm | tail -1 || true # the ring ahead of a GPU: at most half its free space
    python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, \
        'onnxruntime', o.__version__, o.get_available_providers())"
    case $part in
    train)
        set -- --parts train --train-model vit_small_patch16_224 --train-batch 128 \
            --precision bf16 --files 4000 --train-files 4000 --epochs 6 --repeats 2 \
            --train-runs "cache,pass first" "$@" ;;
    embed)
        set -- --parts embed --files 2000 --repeats 3 "$@" ;;
    all)
        set -- --parts embed,train --train-model vit_small_patch16_224 --train-batch 128 \
            --precision bf16 --files 4000 --train-files 4000 --epochs 6 --repeats 2 \
            --train-runs "cache,pass first" "$@" ;;
    esac
    # Not from the checkout: `python -m catchment_mae...` (the command's runs)
    # would import its catchment_mae folder, which lacks batch/ and export/.
    cd /tmp
    python3 "$repo/benchmarks/pipeline.py" --device "${DEVICE:-cuda}" --data "$data" "$@"
} 2>&1 | tee "$log"
