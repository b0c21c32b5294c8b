#!/bin/sh
# The checks only a GPU can make, as one run for a lent device machine (issue 15): the CUDA
# tests (the captured step's capture and replays among them, NOTE [Captured step]) and the
# memory bench at batch 64 and 200, whose daemon+graph row is the replayed step.
#
# The data does not travel with the checkout (../shared stays here). Before the run, here:
#   echo /.gpu-shared/ >> .git/info/exclude
#   mkdir -p .gpu-shared/data/cifar10 .gpu-shared/models
#   cp ../shared/data/cifar10/test_batch ../shared/data/cifar10/batches.meta \
#      .gpu-shared/data/cifar10/ && cp ../shared/models/resnet20_cifar10.th .gpu-shared/models/
# then call the device tool with carry [".gpu-shared"] and the command
#   sh benchmarks/gpu-check.sh
# (timeout about 500 s). The folder is never committed. The machine's python3 holds torch;
# surgeon_core needs nothing else from the project's dependencies.
set -u
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 SURGEON_SHARED_DIR=.gpu-shared
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$out/device.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_cuda.py \
    2>&1 | tee "$out/test-cuda.txt"
for batch in 64 200; do
    timeout 120 python3 -m surgeon_core.bench memory --device cuda --batch-size "$batch" \
        --steps 20 2>&1 | tee "$out/memory-b$batch.txt"
done
