#!/usr/bin/env bash
# The 120-minute MNIST run (issue 22): shipped-model capacity (Conv1 64, 16 capsule types), digit
# biases, averaged weights, the TF reference's decay (0.96 per 2000 steps), both cores. Its
# 60-minute point is the last epoch that ended before 60 minutes (the decay does not depend on the
# run's length). --foreground: timeout signals the run alone, not its process group, so the one
# SIGINT arrives once.
cd "$(dirname "$0")/../.."
exec timeout --foreground -s INT 120m python3 multimnist_capsnet.py --task mnist --seed 0 \
  --conv1-channels 64 --primary-types 16 --digit-bias --bias-init 0.1 --ema 0.999 \
  --lr-decay 0.96 --lr-decay-steps 2000 --n-epochs 1000 --workers 2 --quiet \
  --save runs/mnist/long_s0.npz --metrics-json runs/mnist/long_s0.json
