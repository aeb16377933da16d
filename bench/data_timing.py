"""Time the data path: MNIST into an empty cache (first call), from the cache (second call), and
60,000 MultiMNIST training pairs on both task definitions.

    python3 bench/data_timing.py            # uses a fresh temporary cache; needs the network
    python3 bench/data_timing.py --cached   # only the cached load and the pairs (default cache)
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimnist_capsnet as m  # noqa: E402


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cached", action="store_true", help="skip the first (fetching) call")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = None if args.cached else tmp
        if not args.cached:
            t, _ = timed(lambda: m.load_mnist(cache))
            print(f"load_mnist, empty cache (fetch, verify, convert, store) {t:7.2f} s")
        t, mnist = timed(lambda: m.load_mnist(cache))
        print(f"load_mnist, from the cache                            {t:7.2f} s")
    for name, kw in (("the IoU >= 0.8 task", dict(min_iou=0.8)),
                     ("the paper's task", dict(min_iou=0.0, overlay="clip-sum"))):
        ts = [timed(lambda: m.make_pairs(mnist["train_x"], mnist["train_y"], 60_000,
                                         np.random.default_rng(seed), **kw))[0]
              for seed in range(3)]
        print(f"make_pairs 60,000, {name:<35}{statistics.median(ts):7.2f} s (median of 3)")


if __name__ == "__main__":
    main()
