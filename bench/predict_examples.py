"""The images a new user would try `multimnist_capsnet.py predict` on first, from MNIST's test
split, and how the shipped model reads many of them.

    python3 bench/predict_examples.py write OUTDIR [--seed 0]
    python3 bench/predict_examples.py score [--n 1000] [--seed 0]

write: OUTDIR/digit100_L.png, one test digit of label L drawn 3x larger (bilinear), black on white,
in a 100x100 image; OUTDIR/photo_L.jpg, another as a 120x90 colour JPEG (quality 70) of dark ink on
light-grey paper lit unevenly (brighter to the right, darker in the corners) with noise in every
pixel (s.d. 0.05); OUTDIR/blank.png, a white 100x100 image.

score: n test digits as MNIST stores them, as digit100 and as photo images (read with --digits 1:
top-1, and how often the longest capsule reaches 0.5), and n composites of the paper's task as
they are and drawn 3x larger, black on white, in a 120x120 image (read with two digits: set
accuracy of the two longest capsules, and how often both are named, i.e. are right and reach 0.5).
"""
import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimnist_capsnet as mc  # noqa: E402


def paper_photo(ink: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """ink (H, W) in [0, 1] -> uint8 (H, W, 3): dark ink on unevenly lit paper, noisy."""
    h, w = ink.shape
    r, c = np.mgrid[:h, :w] / [[[h]], [[w]]] - 0.5
    paper = 0.75 + 0.15 * c - 0.3 * (r * r + c * c)
    lum = paper * (1 - 0.8 * ink) + rng.normal(0, noise, ink.shape)
    return np.round(255 * np.clip(lum[..., None] * [1.05, 1.0, 0.9], 0, 1)).astype(np.uint8)


def digit100(d: np.ndarray) -> np.ndarray:
    """A 28x28 digit in [0, 1] drawn 3x larger, black on white, in a 100x100 image."""
    big = np.zeros((100, 100))
    big[6:90, 12:96] = mc.resize(d, 84, 84)
    return 1 - big


def photo(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 digit in [0, 1] on a 120x90 colour photo of paper (paper_photo)."""
    ink = np.zeros((90, 120))
    ink[8:83, 30:105] = mc.resize(d, 75, 75)
    return paper_photo(ink, rng)


def write(args, mnist) -> None:
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    (i, j), digits = rng.choice(len(mnist["test_x"]), 2, replace=False), mnist["test_x"] / 255
    names = (f"digit100_{mnist['test_y'][i]}.png", f"photo_{mnist['test_y'][j]}.jpg", "blank.png")
    images = (np.round(255 * digit100(digits[i])).astype(np.uint8), photo(digits[j], rng),
              np.full((100, 100), 255, np.uint8))
    for name, img in zip(names, images):
        extra = dict(quality=70) if name.endswith(".jpg") else {}
        mc.atomic_write(out / name, iio.imwrite("<bytes>", img, extension=Path(name).suffix,
                                                **extra))
    print(*(out / n for n in names))


def score(args, mnist) -> None:
    run = mc.load_checkpoint(mc.MODEL_FILE)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(mnist["test_x"]), args.n, replace=False)
    x, y = mnist["test_x"][idx] / 255, mnist["test_y"][idx]
    pairs = mc.make_pairs(mnist["test_x"], mnist["test_y"], args.n, rng, min_iou=0.0,
                          overlay="clip-sum")

    def lengths(images, n_digits):
        img = [mc.to_canvas(mc.ink_on_black(im)[0], run.cfg.canvas, n_digits)[0] for im in images]
        return mc.class_scores(mc.predict(run.eval_params, run.cfg, np.stack(img)))

    print(f"the shipped model, {args.n} MNIST test digits (read as one digit)")
    for name, images in (("28x28, as stored", x), ("100x100, 3x, black on white", map(digit100, x)),
                         ("120x90 photo JPEG", (jpeg(photo(d, rng)) for d in x))):
        s = lengths(images, 1)
        print(f"  {name:32s} top-1 {(s.argmax(1) == y).mean():.3f}   longest >= 0.5 "
              f"{(s.max(1) >= 0.5).mean():.3f}")
    print(f"{args.n} composites of the paper's task (read as two digits)")
    big = lambda c: np.pad(1 - mc.resize(c, 108, 108), 6, constant_values=1)
    for name, images in (("36x36, as made", pairs["x"] / 255),
                         ("120x120, 3x, black on white", (big(c) for c in pairs["x"] / 255))):
        s = lengths(images, 2)
        right = (np.sort(mc.top2(s), 1) == np.sort(pairs["labels"], 1)).all(1)
        named = right & (np.sort(s, 1)[:, -2] >= mc.MIN_LENGTH)
        print(f"  {name:32s} set acc {right.mean():.3f}   both named (>= 0.5) {named.mean():.3f}")


def jpeg(rgb: np.ndarray) -> np.ndarray:
    """rgb uint8 through a quality-70 JPEG and back, as luminance in [0, 1]."""
    back = iio.imread(iio.imwrite("<bytes>", rgb, extension=".jpg", quality=70))
    return back @ np.array([0.299, 0.587, 0.114]) / 255


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the three example images")
    w.add_argument("outdir", help="created if missing")
    s = sub.add_parser("score", help="how the shipped model reads many such images")
    s.add_argument("--n", type=int, default=1000, help="digits and composites (default: %(default)s)")
    for q in (w, s):
        q.add_argument("--seed", type=int, default=0, help="which digits (default: %(default)s)")
        q.add_argument("--data-dir", default=None, help="MNIST cache (default: the module's)")
    args = p.parse_args()
    try:
        mnist = mc.load_mnist(args.data_dir)
    except mc.CapsNetError as e:
        print(f"predict_examples.py: error: {e}", file=sys.stderr)
        return 1
    (write if args.cmd == "write" else score)(args, mnist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
