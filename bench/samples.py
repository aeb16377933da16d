"""Images to try capsnet_predict.py on, drawn from MNIST's test split, and how the shipped model
reads many such images.

    python3 bench/samples.py mnist OUTDIR [--n 4] [--seed 0]       # digits and composites, as made
    python3 bench/samples.py examples write OUTDIR [--seed 0]      # the images a new user tries
    python3 bench/samples.py examples score [--n 1000] [--seed 0]  # the shipped model on many

mnist: for each k < n, OUTDIR/digit_k_L.png, one 28x28 test digit of label L, as MNIST stores it,
and OUTDIR/composite_k_A_B.png, a 36x36 composite of the paper's task (two test digits of labels
A and B, each shifted by up to 4 px, added and clipped). The labels are in the file names, so that
the prediction can be checked by eye.

examples write: OUTDIR/digit100_L.png, one test digit of label L drawn 3x larger (bilinear), black
on white, in a 100x100 image; OUTDIR/photo_L.jpg, another as a 120x90 colour JPEG (quality 70) of
dark ink on light-grey paper lit unevenly (brighter to the right, darker in the corners) with
noise in every pixel (s.d. 0.05); OUTDIR/blank.png, a white 100x100 image.

examples score: n test digits as MNIST stores them, as digit100 and as photo images (read with
--digits 1: top-1, and how often the longest capsule reaches 0.5), and n composites of the paper's
task as they are and drawn 3x larger, black on white, in a 120x120 image (read with two digits:
set accuracy of the two longest capsules, and how often both are named, i.e. are right and reach
0.5).

MNIST is fetched into its cache first if it is not there.
"""
import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import capsnet_predict as cp  # noqa: E402
import mnist_fetch  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402


# ----------------------------------------------------------------------------------------------
# mnist: test digits and composites as the data has them (was mnist_samples.py)

def mnist_samples(args, mnist) -> None:
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
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


# ----------------------------------------------------------------------------------------------
# examples: the images a new user would try first, and how the shipped model reads them (was
# predict_examples.py)

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
    big[6:90, 12:96] = cp.resize(d, 84, 84)
    return 1 - big


def photo(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 digit in [0, 1] on a 120x90 colour photo of paper (paper_photo)."""
    ink = np.zeros((90, 120))
    ink[8:83, 30:105] = cp.resize(d, 75, 75)
    return paper_photo(ink, rng)


def jpeg(rgb: np.ndarray) -> np.ndarray:
    """rgb uint8 through a quality-70 JPEG and back, as luminance in [0, 1]."""
    back = iio.imread(iio.imwrite("<bytes>", rgb, extension=".jpg", quality=70))
    return back @ np.array([0.299, 0.587, 0.114]) / 255


def examples_write(args, mnist) -> None:
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


def examples_score(args, mnist) -> None:
    run = mc.load_checkpoint(args.model)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(mnist["test_x"]), args.n, replace=False)
    x, y = mnist["test_x"][idx] / 255, mnist["test_y"][idx]
    pairs = mc.make_pairs(mnist["test_x"], mnist["test_y"], args.n, rng, min_iou=0.0,
                          overlay="clip-sum")

    def lengths(images, n_digits):
        img = [cp.to_canvas(cp.ink_on_black(im)[0], run.cfg.canvas, n_digits)[0] for im in images]
        return mc.class_scores(mc.predict(run.eval_params, run.cfg, np.stack(img)))

    print(f"the shipped model, {args.n} MNIST test digits (read as one digit)")
    for name, images in (("28x28, as stored", x), ("100x100, 3x, black on white", map(digit100, x)),
                         ("120x90 photo JPEG", (jpeg(photo(d, rng)) for d in x))):
        s = lengths(images, 1)
        print(f"  {name:32s} top-1 {(s.argmax(1) == y).mean():.3f}   longest >= 0.5 "
              f"{(s.max(1) >= 0.5).mean():.3f}")
    print(f"{args.n} composites of the paper's task (read as two digits)")
    big = lambda c: np.pad(1 - cp.resize(c, 108, 108), 6, constant_values=1)  # noqa: E731
    for name, images in (("36x36, as made", pairs["x"] / 255),
                         ("120x120, 3x, black on white", (big(c) for c in pairs["x"] / 255))):
        s = lengths(images, 2)
        right = (np.sort(mc.top2(s), 1) == np.sort(pairs["labels"], 1)).all(1)
        named = right & (np.sort(s, 1)[:, -2] >= cp.MIN_LENGTH)
        print(f"  {name:32s} set acc {right.mean():.3f}   both named (>= 0.5) {named.mean():.3f}")


# ----------------------------------------------------------------------------------------------
# The command line

def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="samples.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND",
                           parser_class=mc.ArgumentParser)
    mn = sub.add_parser("mnist", help="test digits and composites as PNGs (was mnist_samples.py)",
                        description="Write OUTDIR/digit_k_L.png (a 28x28 test digit of label L) "
                        "and OUTDIR/composite_k_A_B.png (a 36x36 composite of the paper's task) "
                        "for each k < --n, for capsnet_predict.py.")
    mn.add_argument("outdir", help="created if missing")
    mn.add_argument("--n", type=int, default=4, help="images of each kind (default: %(default)s)")
    mn.set_defaults(fn=mnist_samples)
    ex = sub.add_parser("examples", help="the images a new user tries first, and how the shipped "
                        "model reads many (was predict_examples.py)",
                        description="examples write OUTDIR: a 100x100 digit, a noisy photo JPEG, "
                        "a blank page; examples score: how the shipped model reads many such "
                        "images.")
    how = ex.add_subparsers(dest="how", required=True, metavar="{write,score}",
                            parser_class=mc.ArgumentParser)
    w = how.add_parser("write", help="write the three example images",
                       description="Write OUTDIR/digit100_L.png, OUTDIR/photo_L.jpg and "
                       "OUTDIR/blank.png.")
    w.add_argument("outdir", help="created if missing")
    w.set_defaults(fn=examples_write)
    s = how.add_parser("score", help="how the shipped model reads many such images",
                       description="Top-1 and the 0.5 threshold on --n test digits as stored, "
                       "drawn larger and photographed; set accuracy on --n composites as made "
                       "and drawn larger.")
    s.add_argument("--n", type=int, default=1000,
                   help="digits and composites (default: %(default)s)")
    s.add_argument("--model", default=str(mc.MODEL_FILE),
                   help="the model read (default: the shipped MultiMNIST model)")
    s.set_defaults(fn=examples_score)
    for q in (mn, w, s):
        q.add_argument("--seed", type=int, default=0, help="which digits (default: %(default)s)")
        q.add_argument("--data-dir", default=None,
                       help="MNIST cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
        q.set_defaults(prog=q.prog)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args, mnist_fetch.load_mnist(args.data_dir))
    except mc.CapsNetError as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
