#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one go, for a CUDA machine (about 10 minutes in all).
#   OUT=outputs/gpu bash benchmarks/gpu_session.sh         # on the GPU machine: every part logs and writes under $OUT
#   SMOKE=1 OUT=outputs/gpu-smoke bash benchmarks/gpu_session.sh  # on a CPU: every part at toy sizes, to check the plumbing
# Parts run in order of value and each has its own time limit, so a slow or failing one costs only itself; the summary
# at the end gives each part's exit status and seconds. LPIPS uses a random VGG (no download on the machine): same cost.
# A machine with torch, accelerate and safetensors but without diffusers, lpips or datasets (and no internet): fetch
# their wheels on a connected machine first (`bash benchmarks/gpu_wheels.sh` writes them into .whl/), copy the
# checkout with .whl/, and this script installs them with --no-deps into /tmp/site before it starts.
set -u
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu RES=64 BATCH=2 REP=1 ENC_SIZES="64 128" BIG=256 TILE=128 STEPS=4 PRECISION=no FP16=no
  T_STEP=300 T_ENC=300 T_TILED=300 T_RUN=300 T_FP16=300
else  # limits sum to 570 s, under one device call's 600 s: the whole script is one `run`
  DEV=cuda RES=256 BATCH=32 REP=10 ENC_SIZES="512 1024" BIG=4096 TILE=512 STEPS=200 PRECISION=bf16 FP16=fp16
  T_STEP=150 T_ENC=60 T_TILED=60 T_RUN=120 T_FP16=60
fi
if [ -d .whl ] && [ "${SMOKE:-0}" != 1 ]; then  # carried wheels: the packages the device image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going whatever it returns
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$SUMMARY"
  tail -n 8 "$OUT/$name.log"
}

train_run() {  # train_run NAME PRECISION STEPS: a short accelerate run of the kl-f8 config, exported at the end
  python3 -m accelerate.commands.launch --config_file configs/accelerate/single-process.yaml training/train.py \
    --config configs/kl-f8.yaml \
    "train.output_dir=$OUT/$1" "train.mixed_precision=$2" "train.max_steps=$3" "train.log_every=$(( $3 / 4 + 1 ))" \
    "train.checkpoint_every=$3" "train.image_every=$3" "data.resolution=$RES" "train.batch_size=$BATCH" \
    loss.perceptual_pretrained=false
}
export -f train_run  # `timeout` runs programs, not shell functions: the parts call it through bash -c
export OUT RES BATCH

part env 30 python3 -c "
import importlib.metadata as m, torch
print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))
for name in ('diffusers', 'lpips', 'datasets', 'accelerate', 'pyarrow', 'fsspec', 'huggingface-hub'):
    print(name, m.version(name))
import diffusers, lpips, datasets  # a missing or clashing package shows here, before the parts that need it
"
part train_step "$T_STEP" python3 benchmarks/run.py --device "$DEV" --config configs/kl-f8.yaml --resolution "$RES" \
  --batch-size "$BATCH" --only train --repeats "$REP" --json "$OUT/train_step.json"
for size in $ENC_SIZES; do
  part "encode_$size" "$T_ENC" python3 benchmarks/run.py --device "$DEV" --config configs/kl-f8.yaml --resolution "$size" \
    --batch-size 4 --only encode --no-tiled --repeats "$REP" --json "$OUT/encode_$size.json"
done
part tiled_memory "$T_TILED" python3 benchmarks/tiled_memory.py --device "$DEV" --config configs/kl-f8.yaml --sizes "$BIG" \
  --tile "$TILE" --json "$OUT/tiled_memory.json"
part train_run "$T_RUN" bash -c 'train_run "$@"' _ run "$PRECISION" "$STEPS"
part diffusers_load 30 python3 -c "
import sys; from diffusers import AutoencoderKL
m = AutoencoderKL.from_pretrained(sys.argv[1]); print('diffusers loads it:', dict(scaling_factor=m.config.scaling_factor))
" "$OUT/run/vae"
part fp16_run "$T_FP16" bash -c 'train_run "$@"' _ fp16 "$FP16" "$(( STEPS / 3 + 1 ))"
echo "summary ($SUMMARY):"
cat "$SUMMARY"
