#!/usr/bin/env bash
# Issue 10's GPU check, in one run (about 5 minutes on one H100/H200 with 16 cores): the data path's
# images/s with 8 and 16 workers, then 200 bf16 training steps of the ViT-B/32 CLIP at batch 256
# fed through each augmentation path by 12 workers (data-wait share, step time, MFU).
# PHOTOS: a folder of photos (default ../shared/data/photos). Results go to ${OUT:-bench_out}/.
set -uo pipefail
out=${OUT:-bench_out}; mkdir -p "$out"
photos=${PHOTOS:-../shared/data/photos}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
for w in 8 16; do
  timeout 150 python3 bench/loader.py --photos "$photos" --size 256 --samples 2048 --batch-size 256 --seconds 6 \
      --workers $w --device cuda --rounds 1 2>&1 | tee "$out/loader_w$w.txt"
done
timeout 330 python3 bench/loader.py --photos "$photos" --size 256 --samples 1024 --batch-size 256 --workers 12 \
    --train-steps 200 --device cuda --precision bf16 --impls fast device torchvision 2>&1 | tee "$out/train_w12.txt"
