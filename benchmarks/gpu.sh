#!/usr/bin/env bash
# Issue 15's GPU checks in one script, for a machine with a CUDA GPU, torch with CUDA and no TVM (the .gpu
# bundle brings it): zoo correctness on CUDA, then ResNet-50 / BERT-base against eager and torch.compile,
# then MetaSchedule tuning on the GPU and the reuse of its database.
# Prepare here, in the project root:   bash ../shared/tools/gpu-bundle.sh        (writes .gpu/, ~61 MiB)
# There (carry .gpu):                   bash benchmarks/gpu.sh 2>&1 | tee $OUT/gpu.log
# Exit status 1 when a zoo model is wrong on CUDA. Checked on the CPU with: python benchmarks/bench_gpu.py --smoke --zoo --bench --tune
set -uo pipefail
cd "$(dirname "$0")/.."
source .gpu/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 470 python3 benchmarks/bench_gpu.py --zoo --bench --tune
