"""How the two MultiMNIST tasks differ: class frequencies and bounding-box IoU.

    python3 bench/task_stats.py > runs/task_stats.md   # 60,000 training pairs of each task, seed 0

The IoU >= 0.8 task (the default) demands IoU >= 0.8 for every pair and merges by max; the paper's
task shifts each digit independently by up to 4 px (IoU unconstrained) and adds then clips the
two images.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimnist_capsnet as m  # noqa: E402


def stats(mnist, min_iou, n=60_000, seed=0):
    pairs = m.make_pairs(mnist["train_x"], mnist["train_y"], n, np.random.default_rng(seed),
                         min_iou=min_iou)
    freq = np.bincount(pairs["labels"].ravel(), minlength=10) / n  # share of pairs with digit k
    a, b = m.bounding_boxes(pairs["a"]), m.bounding_boxes(pairs["b"])
    return freq, pairs["iou"], m.box_intersection(a, b) / m.box_area(a)


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    mnist = m.load_mnist()
    tasks = (("the IoU >= 0.8 task", stats(mnist, 0.8)), ("the paper's task", stats(mnist, 0.0)))
    print("| digit | " + " | ".join(str(k) for k in range(10)) + " |")
    print("|---|" + "---|" * 10)
    for name, (freq, _, _) in tasks:
        print(f"| {name} | " + " | ".join(f"{100 * f:.1f}%" for f in freq) + " |")
    print("\n| task | mean IoU | 5% | 25% | median | 75% | 95% | IoU >= 0.8 | mean overlap of a's box |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, iou, overlap) in tasks:
        q = np.quantile(iou, [0.05, 0.25, 0.5, 0.75, 0.95])
        print(f"| {name} | {iou.mean():.3f} | " + " | ".join(f"{x:.3f}" for x in q)
              + f" | {100 * (iou >= 0.8).mean():.1f}% | {100 * overlap.mean():.1f}% |")


if __name__ == "__main__":
    main()
