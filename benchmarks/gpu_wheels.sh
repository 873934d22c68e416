#!/usr/bin/env bash
# Wheels that gpu_session.sh needs on an offline CUDA machine whose Python 3.12 environment lacks them.
#   bash benchmarks/gpu_wheels.sh        # writes .whl/ (ignored by git, about 7 MiB); copy it with the checkout
# Such a machine typically holds torch, accelerate, safetensors, numpy, pandas, pyarrow, xxhash, fsspec,
# huggingface-hub, regex, requests, scipy and tqdm; these are the rest. The versions are the ones the test suite passes
# with; gpu_session.sh installs them with --no-deps into /tmp/site.
set -euo pipefail
DEST=${DEST:-.whl}
WHEELS="diffusers==0.42.1 lpips==0.1.4 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==8.7.0"
mkdir -p "$DEST"
# shellcheck disable=SC2086  # WHEELS is a list of requirement words
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" $WHEELS
ls -l "$DEST"
