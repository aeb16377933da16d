#!/usr/bin/env bash
# The affNIST-like experiment (docs/affnist.md): 3 models x 3 seeds on expanded MNIST, 4 epochs
# each, two at a time with one core each, then the shared-target choice, the scores and figures.
# (The seed-0 CapsNet runs in runs/affnist/runs were started with --epochs 5; report reads their
# first 4, which are those of a 4-epoch run.)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OPENBLAS_NUM_THREADS=1
for seed in 0 1 2; do for model in capsnet3 capsnet1 cnn; do echo "$model $seed"; done; done |
  xargs -P 2 -L 1 sh -c 'python3 bench/affnist.py train "$0" --seed "$1" --epochs 4 \
    --out runs/affnist/runs > "runs/affnist/runs/$0_s$1.log" 2>&1'
python3 bench/affnist.py report --epochs 4
