#!/usr/bin/env bash
# The training runtime itself under DeepSpeed (what bench/clip_speed.py does not cover: the engine, its
# torch_autocast bf16, the data path, telemetry): the CLIP stage on the bundled emoji for
# ${STEPS:-60} steps at micro-batch ${MICRO:-256} in ${PRECISION:-bf16}, eager then train.compile=true,
# then micro-batch MICRO/4 x 4 with cached accumulation. Each run's log lines (samples/s, MFU,
# data wait, peak memory) go to ${OUT:-bench_out}/runtime_*.jsonl; the runs themselves to a
# temporary folder; EXTRA adds key=value overrides to every run. About 5 minutes on one H100/H200
# (plus compiling); on a CPU, for a smoke test:
#   CONFIG=configs/clip_tiny.yaml STEPS=3 MICRO=8 PRECISION=fp32 WORKERS=1 bash bench/gpu_runtime.sh
set -uo pipefail
out=${OUT:-bench_out}; mkdir -p "$out"
steps=${STEPS:-60}; micro=${MICRO:-256}; precision=${PRECISION:-bf16}; workers=${WORKERS:-12}
tmp=$(mktemp -d)
export PYTHONUNBUFFERED=1
python3 -m tokenizer.train --corpus data/corpus/en.txt data/corpus/ko.txt --vocab-size 16384 --out "$tmp/tok" \
    > "$tmp/tok.log" 2>&1 || { tail -5 "$tmp/tok.log"; exit 1; }
status=0
run() {  # NAME OVERRIDES...
  local name=$1; shift
  local log_every=$(( steps < 10 ? 1 : 10 ))
  deepspeed --num_gpus 1 --master_port "$(python3 -c "from launch.runtime.dist import free_port; print(free_port())")" launch/clip.py --config "${CONFIG:-configs/clip.yaml}" \
      "data.tokenizer=$tmp/tok" "run.out_dir=$tmp/$name" "train.steps=$steps" "train.precision=$precision" \
      "train.num_workers=$workers" "run.log_every=$log_every" freeze.image_epochs=0 val_every=0 \
      augment.impl=device ${EXTRA:-} "$@" > "$tmp/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then echo "runtime $name failed ($rc):"; tail -20 "$tmp/$name.log"; status=1; return; fi
  cp "$tmp/$name/metrics.jsonl" "$out/runtime_$name.jsonl"
  python3 - "$tmp/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if "train/samples_per_s" in x]
last = rows[-1] if rows else {}
keys = ("train/samples_per_s", "train/mfu", "train/data_wait_share", "train/peak_mem_gib", "train/loss")
print(f"{sys.argv[2]:<16} step {last.get('step')}: " + ", ".join(f"{k[6:]} {last.get(k, float('nan')):.4g}" for k in keys))
PY
}
run micro${micro} "train.micro_batch_size=$micro"
run micro${micro}_compile "train.micro_batch_size=$micro" train.compile=true
run cached$((micro / 4))x4 "train.micro_batch_size=$((micro / 4))" train.grad_accum=4
rm -rf "$tmp"
exit $status
