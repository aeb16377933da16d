#!/usr/bin/env bash
# The 120-minute MNIST run at the paper's size (issue 22, point 3: does the faithful network beat
# the shipped size's plateau?): Conv1 256, 32 capsule types, decoder 512/1024 (--preset paper,
# 8.2M parameters); otherwise long.sh's recipe: digit biases, averaged weights, 0.96 per 2000
# steps, both cores. --foreground: timeout signals the run alone, so the one SIGINT arrives once.
cd "$(dirname "$0")/../.."
exec timeout --foreground -s INT 120m python3 multimnist_capsnet.py --task mnist --seed 0 \
  --preset paper --digit-bias --bias-init 0.1 --ema 0.999 \
  --lr-decay 0.96 --lr-decay-steps 2000 --n-epochs 1000 --workers 2 --quiet \
  --save runs/mnist/long_paper_s0.npz --metrics-json runs/mnist/long_paper_s0.json
