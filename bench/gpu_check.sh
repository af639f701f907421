#!/usr/bin/env bash
# The GPU figures of the README's benchmark table, in one run (about 8 minutes on one H100):
# CLIP and MAE train steps at batch 256 in bf16 against open_clip / HF ViTMAE, with and without
# compile and checkpointing, and CLIP's feature-cached accumulation (128 x 4, eager and compiled)
# against one step of 512.
# Results go to ${OUT:-bench_out}/. Needs open_clip (the bench extra) next to torch and timm.
set -uo pipefail
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/gpu.txt"
python3 bench/clip_speed.py --device cuda --batch-size 256 --steps 15 --warmup 3 --precision bf16 \
    --variants open_clip ours ours_compile ours_ckpt 2>&1 | tee "$out/clip_b256_bf16.txt"
python3 bench/clip_speed.py --device cuda --batch-size 512 --steps 10 --warmup 3 --precision bf16 \
    --variants ours ours_cached ours_cached_compile --accum 4 2>&1 | tee "$out/clip_b512_accum.txt"
python3 bench/mae_speed.py --device cuda --batch-size 256 --steps 15 --warmup 3 --rounds 1 --precision bf16 2>&1 \
    | tee "$out/mae_b256_bf16.txt"
