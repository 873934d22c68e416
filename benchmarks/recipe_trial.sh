#!/bin/bash
# One recipe trial on the validation photos: train configs/quickstart.yaml with the given overrides on one CPU thread,
# then measure the export with benchmarks/colour_axes.py (colour wheel, hue chart, and the validation folder).
#
#   bash benchmarks/recipe_trial.sh VAL_DIR OUT_DIR NAME [overrides...]
#   e.g. kl-autoencoder sample-photos outputs/val --set validation
#        bash benchmarks/recipe_trial.sh outputs/val outputs/trials l16c1 model.architecture.latent_channels=16 loss.chroma_weight=1
#
# Writes OUT_DIR/NAME/ (the run), OUT_DIR/NAME.json (per-image results) and appends the summary to
# OUT_DIR/summary.txt. Training is deterministic for a seed on one machine and thread count, so a trial reproduces
# its numbers; BENCHMARKS.md ("The quickstart recipe chosen on validation photos") lists the trials run.
set -euo pipefail
val=$1; out=$2; name=$3; shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export OMP_NUM_THREADS=1
start=$(date +%s)
python "$root/training/train.py" --config "$root/configs/quickstart.yaml" train.output_dir="$out/$name" \
    train.overwrite=true "$@" > "$out/$name.log" 2>&1
end=$(date +%s)
python "$root/benchmarks/colour_axes.py" "$out/$name/vae" --folder "$val" --json "$out/$name.json" > "$out/$name.colour"
{ echo "$name train_s=$((end - start)) $*"; cat "$out/$name.colour"; } >> "$out/summary.txt"
