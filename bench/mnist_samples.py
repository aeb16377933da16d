"""Write test images for `multimnist_capsnet.py predict`, drawn from the MNIST test split.

    python3 bench/mnist_samples.py OUTDIR [--n 4] [--seed 0]

For each k < n: OUTDIR/digit_k_L.png, one 28x28 test digit of label L, as MNIST stores it; and
OUTDIR/composite_k_A_B.png, a 36x36 composite of the paper's task (two test digits of labels A and
B, each shifted by up to 4 px, added and clipped). The labels are in the file names, so that the
prediction can be checked by eye.
"""
import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimnist_capsnet as mc  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", help="created if missing")
    p.add_argument("--n", type=int, default=4, help="images of each kind (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which digits (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="MNIST cache (default: the module's)")
    args = p.parse_args()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        mnist = mc.load_mnist(args.data_dir)
    except mc.CapsNetError as e:
        print(f"mnist_samples.py: error: {e}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    pairs = mc.make_pairs(mnist["test_x"], mnist["test_y"], args.n, rng, min_iou=0.0,
                          overlay="clip-sum")
    for k, i in enumerate(rng.choice(len(mnist["test_x"]), args.n, replace=False)):
        digit = out / f"digit_{k}_{mnist['test_y'][i]}.png"
        iio.imwrite(digit, mnist["test_x"][i])
        a, b = pairs["labels"][k]
        composite = out / f"composite_{k}_{a}_{b}.png"
        iio.imwrite(composite, pairs["x"][k])
        print(digit, composite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
