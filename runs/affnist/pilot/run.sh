#!/usr/bin/env bash
# A pilot of the pipeline, not the experiment: one epoch of each small model on --task expanded,
# seed 0, then both scored on expanded MNIST and the affNIST-like set. (Intel Xeon model 207, 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../../.."
python3 multimnist_capsnet.py --task expanded --seed 0 --n-epochs 1 --quiet \
  --save runs/affnist/pilot/capsnet_small_s0.npz --metrics-json runs/affnist/pilot/capsnet_small_s0.json
python3 cnn_baseline.py --task expanded --seed 0 --n-epochs 1 --quiet --cnn-conv1 32 --cnn-conv2 32 \
  --cnn-conv3 16 --cnn-fc 96 --cnn-fc2 64 \
  --save runs/affnist/pilot/cnn_32_s0.npz --metrics-json runs/affnist/pilot/cnn_32_s0.json
python3 bench/affnist.py score runs/affnist/pilot/capsnet_small_s0.npz runs/affnist/pilot/cnn_32_s0.npz \
  > runs/affnist/pilot/score.md
