"""Images to try capsnet_predict.py on, drawn from MNIST's test split, and how the shipped model
reads many such images.

    python3 bench/samples.py mnist OUTDIR [--n 4] [--seed 0]       # digits and composites, as made
    python3 bench/samples.py examples write OUTDIR [--seed 0]      # the images a new user tries
    python3 bench/samples.py examples score [--n 1000] [--seed 0]  # the shipped model on many
    python3 bench/samples.py count train [--out FILE]              # --digits auto's counter
    python3 bench/samples.py count held COUNTER... [--shifts]      # counters on held-out images
    python3 bench/samples.py count fuse [--out FILE]               # weighed with redrawings
    python3 bench/samples.py count features [--figure PNG]         # what else it could weigh
    python3 bench/samples.py count score [--n 500] [--out FILE]    # measured on test images

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

count train: the pixel counter (models/count_cnn.npz) on 3 drawings each of n training digits
and n composites of the paper's task, each at a random size and polarity, from 50,000 of the
60,000 training digits (the split by --seed); its threshold, the one that makes the worst group's
right count largest, on --held of each kind drawn at 28, 36, 64 and 200 px (resampled) and
filling a 28x28 frame, either polarity at random, from the other 10,000. --distort: half the
fit digits turned, sheared and stretched at random, anew each drawing.

count fuse: the count's weights (the counter's logit, the MNIST model's reconstruction error on
the one-digit view, the MultiMNIST model's on the two-digit view) by logistic regression on
--held held-out training images of each kind at each size, its threshold maximin; 2-fold
cross-validated right counts against the counter alone.

count features: the same, on the same images, for other sets of inputs the count could weigh
(fewer, or both models' capsule lengths too): which would help.

count score: n test digits and n test composites, drawn at each size in both polarities: per
group, the right count of --digits auto (with its binomial standard error) and the digits named
right with auto and with the true count forced (--digits 1|2), and their paired difference with
its standard error (--mixed: one group a size, each image in a random polarity); then the MNIST
convention: all raw test digits and n raw composites read as they are and after to_canvas, and n
test digits scaled to fill 28x28 against the same at 64x64, with no flag.

MNIST is fetched into its cache first if it is not there.
"""
import argparse
import concurrent.futures
import io
import os
import sys
import time
from typing import NamedTuple
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import capsnet_predict as cp  # noqa: E402
import mnist_fetch  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402
from common import commit, cpu_model  # noqa: E402


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


def stroke(p, q, width: float, side: int = 200) -> np.ndarray:
    """A (side, side) bool pen stroke from p to q, (row, col), width pixels wide."""
    r, c = np.mgrid[:side, :side]
    p, q = np.asarray(p, float), np.asarray(q, float)
    d = q - p
    t = np.clip(((r - p[0]) * d[0] + (c - p[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(r - p[0] - t * d[0], c - p[1] - t * d[1]) <= width / 2


def examples_hand(args, mnist) -> None:
    """Lone digits as a user brings them, black on white: test digit 0 at 200x200, a thick 7
    drawn with two strokes at 200x200, test digits 1-10 at 112x112, and 11-15 filling a 28x28
    frame (those white on black, as MNIST); and one that needs --background: test digit 0 cut
    to its ink's box, 120 px tall, drawn with a pen 15 px wider, so that ink fills half the
    image and most of its edge."""
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = mnist["test_x"] / 255, mnist["test_y"]
    u8 = lambda a: np.round(255 * np.clip(a, 0, 1)).astype(np.uint8)
    images = {f"test0_200x200_{y[0]}.png": u8(1 - cp.resize(x[0], 200, 200)),
              "thick7_200x200.png": u8(1 - (stroke((40, 45), (40, 155), 22)
                                            | stroke((40, 155), (170, 85), 22)))}
    images.update({f"test{i}_112x112_{y[i]}.png": u8(1 - cp.resize(x[i], 112, 112))
                   for i in range(1, 11)})
    images.update({f"test{i}_filling28_{y[i]}.png": frame_filling(mnist["test_x"][i])
                   for i in range(11, 16)})
    rows, cols = np.flatnonzero(x[0].any(1)), np.flatnonzero(x[0].any(0))
    crop = x[0][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    tall = cp.resize(crop, 120, round(120 * crop.shape[1] / crop.shape[0]))
    images[f"bold_test0_{y[0]}.png"] = 255 - widened(u8(tall), 15)
    for name, img in images.items():
        mc.atomic_write(out / name, iio.imwrite("<bytes>", img, extension=".png"))
    print(*(out / n for n in images))


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
# count: how many digits --digits auto finds, fitted on training images, measured on test images

SIDES = (28, 36, 64, 200)                     # each image drawn at these sizes (square, px)
FILLED = "28 filled"                          # and at 28x28 with its ink box filling the frame
POLARITIES = ("white on black", "black on white")
KINDS = ("digits", "composites")              # MNIST digits; composites of the paper's task


def drawn(img: np.ndarray, side, polarity: str) -> np.ndarray:
    """uint8 image (28x28 digit or 36x36 composite) drawn at side x side (resampled when it is
    another size, as cp.resize does; side FILLED: frame_filling), stored as 8 bits in the
    polarity -> float (side, side) in [0, 1], as read_image returns a PNG of it."""
    if side == FILLED:
        x = frame_filling(img) / 255
    else:
        x = img / 255 if img.shape[0] == side else np.clip(cp.resize(img / 255, side, side), 0, 1)
    u8 = np.round(255 * x)
    return (255 - u8 if polarity == "black on white" else u8) / 255


class Source(NamedTuple):
    images: np.ndarray   # (n, 28, 28) digits or (n, 36, 36) composites, uint8
    labels: np.ndarray   # (n, 1) or (n, 2) int64
    hidden: np.ndarray   # (n,) the larger share of either source digit's ink on the other's (0)


def hidden_ink(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) for composites of the placed digits a and b (n, H, W) uint8: the larger of the two
    digits' shares of ink (pixels of at least 128) that lies on the other's ink."""
    a, b = a >= 128, b >= 128
    both = (a & b).sum((1, 2))
    return np.maximum(both / np.maximum(a.sum((1, 2)), 1), both / np.maximum(b.sum((1, 2)), 1))


def source_images(mnist, split: str, n: int, seed: int) -> dict:
    """n digits and n composites of the paper's task from one split: {kind: Source}."""
    rng = np.random.default_rng(seed)
    x, y = mnist[f"{split}_x"], mnist[f"{split}_y"]
    idx = rng.choice(len(x), n, replace=False)
    pairs = mc.make_pairs(x, y, n, rng, min_iou=0.0, overlay="clip-sum")
    return {"digits": Source(x[idx], y[idx].astype(np.int64)[:, None], np.zeros(n)),
            "composites": Source(pairs["x"], pairs["labels"], hidden_ink(pairs["a"], pairs["b"]))}


def read_auto(images, models) -> dict:
    """What capsnet_predict.py answers for float images (white or black background), with
    --digits auto and with the true count forced: {count (N,) the rule's, found1 and found2 (N
    lists) the digits named as one digit (--digits 1) and as two (--digits 2)}."""
    one, two = models
    v = cp.both_views([cp.ink_on_black(x)[0] for x in images])
    caps = cp.capsules(one, two, v.ones, v.twos)  # (N, J, E) each: read once, used twice
    s1, s2 = mc.class_scores(caps[0]), mc.class_scores(caps[1])
    return dict(count=np.where(cp.count_scores(v, None, one, two, caps) > 0, 2, 1),
                found1=[cp.digits_found(s, 1) for s in s1],
                found2=[cp.digits_found(s, 2) for s in s2])


def named_right(found: list, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the digits named are exactly the labels (N, k), each at least MIN_LENGTH."""
    return np.array([sorted(f) == sorted(lab.tolist()) for f, lab in zip(found, labels)])


def named_auto(g: dict, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: --digits auto names exactly the labels (N, k): the one-digit reading where
    read_auto's g counted one, else the two-digit one (which names one digit when only one
    capsule reaches MIN_LENGTH, so a lone digit counted two may still be named right)."""
    return np.where(g["count"] == 1, named_right(g["found1"], labels),
                    named_right(g["found2"], labels))


def count_groups(mnist, split, n, seed, polarities, models, log) -> dict:
    """Every (kind, side, polarity) group of n images from split: {group: (read_auto, Source)}.
    The polarity 'mixed' draws each image in one of POLARITIES at random."""
    out = {}
    for kind, src in source_images(mnist, split, n, seed).items():
        for side in SIDES + (FILLED,):
            for pol in polarities:
                rng = np.random.default_rng([seed, 28 if side == FILLED else side, side == FILLED])
                pols = rng.choice(POLARITIES, n) if pol == "mixed" else [pol] * n
                t0 = time.perf_counter()
                g = read_auto([drawn(im, side, q) for im, q in zip(src.images, pols)], models)
                out[kind, side, pol] = g, src
                log(f"  {kind} at {side} px, {pol}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def maximin_bias(scores: dict, step: float = 0.01, span: float = 3) -> float:
    """The shift of the bias that makes the worst group's right-count share largest: scores
    {group: (scores (N,), two (N,) bool)}; ties go to the shift nearest 0."""
    shifts = np.arange(-span, span + step / 2, step)
    worst = [min(((s + b > 0) == two).mean() for s, two in scores.values()) for b in shifts]
    best = np.flatnonzero(np.isclose(worst, max(worst)))
    return float(shifts[best[np.argmin(np.abs(shifts[best]))]])


def header(args, what: str) -> list[str]:
    """The report's first lines: the command (every option that shapes it) and the machine."""
    more = "".join(f" --{k} {getattr(args, k)}" for k in ("renders", "held", "channels", "fc",
                                                          "epochs") if hasattr(args, k))
    more += " --distort" * getattr(args, "distort", False) + " --mixed" * getattr(args, "mixed",
                                                                                   False)
    files = "".join(f" {f}" for f in getattr(args, "counters", ())) + " --shifts" * getattr(
        args, "shifts", False)
    files += f" --counter {args.counter}" if hasattr(args, "counter") else ""
    n = f" --n {args.n}" * (args.n is not None)
    return [f"# python3 bench/samples.py count {args.how}{files}{n}{more} --seed "
            f"{args.seed}: {what}",
            f"# {cpu_model()}, {os.cpu_count()} cores; commit "
            f"{getattr(args, 'commit', None) or commit()}"]


def training_pools(mnist, seed: int) -> dict:
    """The training split in two, by seed: {'fit': 50,000 digits the pixel counter learns from,
    'held': the other 10,000, from which count train chooses its threshold}, each as a split
    named 'train'."""
    order = np.random.default_rng(seed).permutation(len(mnist["train_x"]))
    return {name: {"train_x": mnist["train_x"][idx], "train_y": mnist["train_y"][idx]}
            for name, idx in (("fit", order[:50000]), ("held", order[50000:]))}


def random_side(rng: np.random.Generator):
    """One of SIDES, FILLED or any side 28..200, each of the six as likely."""
    k = rng.integers(len(SIDES) + 2)
    return SIDES[k] if k < len(SIDES) else FILLED if k == len(SIDES) else int(rng.integers(28, 201))


PENS = (1, 1, 2, 3)  # the counter's training images: as written (half), or a pen 2 or 3 px wider


def widened(img: np.ndarray, pen: int) -> np.ndarray:
    """The uint8 image with every stroke drawn by a pen pen - 1 px wider: the largest pixel of
    each pen x pen window (pen 1: as it is). Users' pens are bolder than MNIST's."""
    p = np.pad(img, (pen // 2, (pen - 1) // 2))
    h, w = img.shape
    return np.max([p[i:i + h, j:j + w] for i in range(pen) for j in range(pen)], axis=0)


def drawn_views(images: np.ndarray, sides: list, pols: list, pens: list) -> np.ndarray:
    """Each uint8 image widened by its pen and drawn at its side in its polarity, as the counter
    sees it: -> (N, 36, 36, 2) uint8 (cp.counter_input's channels, unscaled: 8 bits an entry)."""
    v = cp.both_views([cp.ink_on_black(drawn(widened(im, k), s, q))[0]
                       for im, s, q, k in zip(images, sides, pols, pens)])
    return np.round(255 * cp.counter_input(v.ones, v.twos)).astype(np.uint8)


def draw_all(images: np.ndarray, sides: list, pols: list, pens: list) -> np.ndarray:
    """drawn_views in one process a core (drawing is Python-bound: threads would not help)."""
    cuts = [c for c in np.array_split(np.arange(len(images)), 4 * (os.cpu_count() or 1))
            if len(c)]  # no empty piece: both_views needs an image
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        jobs = [(images[c], *([a[i] for i in c] for a in (sides, pols, pens))) for c in cuts]
        return np.concatenate(list(pool.map(drawn_views, *zip(*jobs))))


def drawing_plan(rng: np.random.Generator, n: int) -> tuple[list, list, list]:
    """How count train draws n images: (sides, polarities, pens), each at random."""
    return ([random_side(rng) for _ in range(n)], list(rng.choice(POLARITIES, n)),
            list(rng.choice(PENS, n)))


def distorted(images: np.ndarray, rng: np.random.Generator, share: float = 0.5,
              turn: float = 15, shear: float = 0.3, stretch: float = 0.2) -> np.ndarray:
    """Writers the counter never saw (count train --distort): a share of the uint8 digits
    (N, H, W), each turned by up to turn degrees, sheared by up to shear and stretched along
    each axis by up to stretch, about its centre of mass (bilinear); the rest as written."""
    n, h, w = images.shape
    x = images.astype(np.float32)
    mass = x.sum((1, 2)) + 1e-9
    centre = np.stack([(x.sum(2) * np.arange(h)).sum(1), (x.sum(1) * np.arange(w)).sum(1)],
                      1) / mass[:, None]                                            # (N, 2)
    a = np.radians(rng.uniform(-turn, turn, n))
    rot = np.stack([np.cos(a), -np.sin(a), np.sin(a), np.cos(a)], 1).reshape(n, 2, 2)
    shr = np.tile(np.eye(2), (n, 1, 1))
    shr[:, 1, 0] = rng.uniform(-shear, shear, n)
    scale = rng.uniform(1 - stretch, 1 + stretch, (n, 2))[:, :, None] * np.eye(2)   # (N, 2, 2)
    back = np.linalg.inv(rot @ shr @ scale)      # each output pixel's place in the digit
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    src = np.einsum("nij,npj->npi", back, grid[None] - centre[:, None]) + centre[:, None]
    # src (N, H * W, 2): where in its digit each output pixel is read, bilinearly
    r0, c0 = np.floor(src[..., 0]).astype(int), np.floor(src[..., 1]).astype(int)
    fr, fc = src[..., 0] - r0, src[..., 1] - c0
    out = np.zeros((n, h * w), np.float32)
    flat = x.reshape(n, -1)
    for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                       (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, c = r0 + dr, c0 + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out += wt * np.where(inside, np.take_along_axis(flat, np.clip(r, 0, h - 1) * w
                                                         + np.clip(c, 0, w - 1), 1), 0)
    warped = np.round(out).clip(0, 255).astype(np.uint8).reshape(n, h, w)
    return np.where((rng.random(n) < share)[:, None, None], warped, images)


def fit_plans(pools: dict, args, rng: np.random.Generator):
    """count train's drawings of its fit images, in its order: (kind, images, drawing_plan).
    With --distort each render draws the same digits, distorted anew (by a generator of its own,
    so that rng, and so the drawing plans and the held-out images, do not change)."""
    fit = pools["fit"]

    def pool(r):  # render r's fit digits, distorted in 10 pieces (memory)
        g = np.random.default_rng([args.seed, r])
        return {"train_x": np.concatenate([distorted(c, g) for c in np.array_split(
            fit["train_x"], 10)]), "train_y": fit["train_y"]} if args.distort else fit
    renders = [source_images(pool(r), "train", args.n, args.seed)
               for r in range(args.renders if args.distort else 1)]
    for kind in KINDS:
        for r in range(args.renders):
            images = renders[r if args.distort else 0][kind].images
            yield kind, images, drawing_plan(rng, len(images))


def held_sets(pools: dict, args, rng: np.random.Generator) -> tuple[dict, dict]:
    """({(kind, size): (views (N, 36, 36, 2) uint8, two digits?)}, {kind: its Source}):
    args.held held-out training digits and composites drawn at each size, and at 64 px with a
    pen 2 px wider."""
    held, source = {}, source_images(pools["held"], "train", args.held, args.seed + 1)
    for kind, src in source.items():
        for side, pen in [(side, 1) for side in SIDES + (FILLED,)] + [(64, 3)]:
            pols, n = list(rng.choice(POLARITIES, len(src.images))), len(src.images)
            name = side if pen == 1 else f"{side}, pen +{pen - 1}"
            held[kind, name] = (draw_all(src.images, [side] * n, pols, [pen] * n),
                                kind == "composites")
    return held, source


def as_written(group: tuple) -> bool:
    """Whether a held-out (kind, size) group was drawn with the pen as written (not bolder)."""
    return group[1] in SIDES + (FILLED,)


def worst_as_written(right: dict) -> float:
    """The lowest right count {(kind, size): share} over the groups drawn as written."""
    return min(v for k, v in right.items() if as_written(k))


def held_threshold(scores: dict) -> float:
    """The threshold on the logit that makes the worst held-out group's right count largest,
    over the groups drawn with the pens as written: scores {(kind, size): (logits, two)}."""
    return -maximin_bias({k: v for k, v in scores.items() if as_written(k)}, step=0.01, span=8)


def counter_init(rng: np.random.Generator, channels: tuple, fc: int) -> dict:
    """The counter's parameters (float32): 5x5 convolutions of channels, each pooled 2x2, then
    fc ReLUs and one logit; He initialisation, zero biases (as cnn_baseline's)."""
    shapes, ins, side = {}, 2, 36
    for i, c in enumerate(channels, 1):
        shapes[f"cnn_conv{i}_w"], shapes[f"cnn_conv{i}_b"] = (5, 5, ins, c), (c,)
        ins, side = c, side // 2
    shapes.update(cnn_fc_w=(side * side * ins, fc), cnn_fc_b=(fc,), cnn_out_w=(fc, 1), cnn_out_b=(1,))
    return {k: (np.zeros(s) if k.endswith("_b") else rng.standard_normal(s) * np.sqrt(
        (1 if k == "cnn_out_w" else 2) / np.prod(s[:-1]))).astype(np.float32)
            for k, s in shapes.items()}


def counter_logits(x_u8: np.ndarray, params: dict, batch: int = 500) -> np.ndarray:
    """(N,) the counter's logits for drawn_views' images (N, 36, 36, 2) uint8."""
    return np.concatenate([cp.counter_forward(x_u8[i:i + batch] / np.float32(255), params)[0]
                           for i in range(0, len(x_u8), batch)])


def adam_fit(x, y, params: dict, epochs: int, rng, lr=1e-3, l2=1e-4, batch=128, log=print):
    """Fit the counter's params (in place) to x (N, 36, 36, 2) uint8, y (N,) by Adam on
    minibatches, the learning rate halved every third epoch."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    t, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        order, total, step = rng.permutation(len(x)), 0.0, lr * 0.5 ** (epoch // 3)
        for i in range(0, len(x), batch):
            j = order[i:i + batch]
            loss, grads = cp.counter_loss(params, x[j] / np.float32(255), y[j], l2)
            total += loss * len(j)
            t += 1
            for k, g in grads.items():
                m[k] = 0.9 * m[k] + 0.1 * g
                v2[k] = 0.999 * v2[k] + 0.001 * g * g
                params[k] -= (step * (m[k] / (1 - 0.9 ** t))
                              / (np.sqrt(v2[k] / (1 - 0.999 ** t)) + 1e-8)).astype(np.float32)
        log(f"  epoch {epoch + 1:2d}: loss {total / len(x):.4f}, lr {step:.2e}, "
            f"{time.perf_counter() - t0:.0f} s", flush=True)


def count_train(args, mnist) -> None:
    """Train the pixel counter on training images (not the test set), choose its threshold on
    other training images, write it to --model."""
    rng = np.random.default_rng(args.seed)
    pools = training_pools(mnist, args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    lines = header(args, "the pixel counter of --digits auto, trained on training images")
    lines += [f"# fitted on {args.renders} drawings of each of {args.n} digits and {args.n} "
              "composites from 50,000 training digits, each at a random size (28, 36, 64, 200, "
              "filling 28x28, or any side 28..200) and polarity, half of them with a pen 1 or 2 "
              "px wider (PENS); threshold on the other 10,000"]
    log = lambda text, **kw: (print(text, **kw), lines.append(text))
    t0 = time.perf_counter()
    xs, ys = [], []
    for kind, images, plan in fit_plans(pools, args, rng):
        xs.append(draw_all(images, *plan))
        ys.append(np.full(len(images), kind == "composites", np.float32))
    x, y = np.concatenate(xs), np.concatenate(ys)
    print(f"drew and normalised {len(x)} training images: {time.perf_counter() - t0:.0f} s")
    held, _ = held_sets(pools, args, rng)
    print(f"and {args.held} of each kind at each size to choose the threshold: "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    params = counter_init(rng, channels, args.fc)
    log(f"# input 36x36x2, 5x5 convolutions of {args.channels} channels each pooled 2x2, "
        f"{args.fc} ReLUs, {sum(v.size for v in params.values())} parameters; Adam lr 1e-3 "
        f"halved every third epoch, L2 1e-4, minibatch 128, {args.epochs} epochs")
    adam_fit(x, y, params, args.epochs, rng, log=log)
    scores = {k: (counter_logits(hx, params), np.full(len(hx), two))
              for k, (hx, two) in held.items()}
    threshold = held_threshold(scores)
    log(f"threshold on the logit: {threshold:+.2f} (the best worst held-out group, pens as "
        "written)")
    log("right count on held-out training images, mixed polarities (n each)    at 0    "
        "at the threshold")
    for (kind, side), (s, two) in scores.items():
        log(f"  {kind:10s} at {side:>9} px  n {len(s):5d}    {((s > 0) == two).mean():.3f}  "
            f"{((s > threshold) == two).mean():.3f}")
    buf = io.BytesIO()
    np.savez_compressed(buf, **params, threshold=np.float32(threshold))
    mc.atomic_write(Path(args.model), buf.getvalue())
    log(f"wrote {args.model} ({len(buf.getvalue())} bytes) in {time.perf_counter() - t0:.0f} s")
    print("predict weighs this counter's logit alone until count fuse adds its weights")
    if args.out:
        mc.atomic_write(Path(args.out), ("\n".join(lines) + "\n").encode())
        print(f"wrote {args.out}")


def counter_file(path: str) -> dict:
    """The counter saved at path (count train's --model), or a one-line error."""
    counter = cp.load_counter(Path(path))
    if counter is None:
        raise mc.CapsNetError(f"{path}: no such file")
    return counter


SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # count held --shifts: 1 px each way


def count_held(args, mnist) -> None:
    """Score counter files on count train's own held-out images (the same --seed, --n, --renders
    and --held redraw them), each at its maximin threshold; with two or more, their mean logit
    too; with --shifts, every logit the mean over the input and its 8 moves of 1 px."""
    counters = {f: counter_file(f) for f in args.counters}  # a bad file fails before the drawing
    rng = np.random.default_rng(args.seed)
    pools = training_pools(mnist, args.seed)
    for _ in range(len(KINDS) * args.renders):
        drawing_plan(rng, args.n)  # count train's draws from rng, undrawn, to reach the held-out
    held, _ = held_sets(pools, args, rng)
    shifts = SHIFTS if args.shifts else [(0, 0)]

    def logit(hx, c):  # (N,) the counter's logit, averaged over the shifts
        return np.mean([counter_logits(np.roll(hx, s, axis=(1, 2)), c) for s in shifts], 0)
    logits = {name: {k: logit(hx, c) for k, (hx, _) in held.items()}
              for name, c in counters.items()}
    if len(counters) > 1:
        logits["their mean logit"] = {k: np.mean([lg[k] for lg in logits.values()], 0)
                                      for k in held}
    lines = header(args, "counters on count train's held-out training images") + [
        f"# {'the mean logit over the input and its 8 moves of 1 px, ' * args.shifts}each at "
        "its own maximin threshold", "| group | " + " | ".join(logits) + " |",
        "|---|" + "---|" * len(logits)]
    scored = {name: {k: (lg[k], np.full(len(lg[k]), held[k][1])) for k in held}
              for name, lg in logits.items()}
    thresholds = {name: held_threshold(sc) for name, sc in scored.items()}
    right = {name: {k: ((s > thresholds[name]) == two).mean() for k, (s, two) in sc.items()}
             for name, sc in scored.items()}
    for k in held:
        lines.append(f"| {k[0]} at {k[1]} px | " + " | ".join(f"{r[k]:.3f}" for r in right.values())
                     + " |")
    worst = [worst_as_written(r) for r in right.values()]
    lines += ["| threshold | " + " | ".join(f"{t:+.2f}" for t in thresholds.values())
              + " |", "| worst group, pens as written | "
              + " | ".join(f"**{w:.3f}**" for w in worst) + " |"]
    report("\n".join(lines) + "\n", args.out)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, steps: int = 30):
    """Weights (D,) and bias of sigmoid(x @ w + b) that minimise the mean cross-entropy against
    y (N,) in {0, 1}, plus l2 / 2 |w|^2, by Newton's method: x (N, D)."""
    z = np.c_[x, np.ones(len(x))].astype(np.float64)                          # (N, D + 1)
    reg = l2 * np.diag([1.0] * x.shape[1] + [0.0])                            # the bias is free
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = mc.sigmoid(z @ w)
        hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + reg
        w = w - np.linalg.solve(hessian, z.T @ (p - y) / len(y) + reg @ w)
    return w[:-1], w[-1]


def fuse_fit(feats: dict, rows: dict) -> tuple[np.ndarray, float]:
    """count fuse's rule fitted on the rows (bool masks) of feats {group: (features (N, F), two
    (N,))}: the logistic weights, and the bias less the maximin threshold of the fitted rows."""
    w, b = fit_logistic(np.concatenate([f[rows[k]] for k, (f, _) in feats.items()]),
                        np.concatenate([two[rows[k]] for k, (_, two) in feats.items()]))
    return w, b - held_threshold({k: (f[rows[k]] @ w + b, two[rows[k]])
                                  for k, (f, two) in feats.items()})


def halves(feats: dict) -> tuple[dict, dict]:
    """count fuse's 2 folds of feats {group: (features, two)}: {group: bool mask} each."""
    even = {k: np.arange(len(f)) % 2 == 0 for k, (f, _) in feats.items()}
    return even, {k: ~h for k, h in even.items()}


def folds_right(feats: dict) -> dict:
    """{group: right count} of fuse_fit's rule on feats {group: (features (N, F), two (N,))},
    the mean over halves' 2 folds, each fitted on one and counted on the other."""
    right = {k: 0.0 for k in feats}
    for fit in halves(feats):
        w, b = fuse_fit(feats, fit)
        for k, (f, two) in feats.items():
            right[k] += ((f[~fit[k]] @ w + b > 0) == two[~fit[k]]).mean() / 2
    return right


FEATURE_NAMES = ("logit", "log MNIST redraw error", "log MultiMNIST redraw error from one capsule",
                 "from two")  # cp.count_features' columns, as count fuse's report names them


def count_fuse(args, mnist) -> None:
    """Weigh the counter's logit with both shipped models' reconstruction errors
    (count_features) by logistic regression on held-out training images, the threshold maximin;
    right counts by 2-fold cross-validation against the counter alone; write the weights into
    --model."""
    counter = counter_file(args.counter)
    models = load_shipped(counter=False)
    t0 = time.perf_counter()
    held, _ = held_sets(training_pools(mnist, args.seed), args,
                        np.random.default_rng([args.seed, 2]))
    feats = {k: (cp.count_features(counter_logits(hx, counter), *cp.counter_views(hx),
                                   *models), np.full(len(hx), two))
             for k, (hx, two) in held.items()}
    print(f"drew and read {args.held} held-out images of each kind at each size: "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    right = {"counter alone": {k: 0.0 for k in feats}, "fused": folds_right(feats)}
    for fit in halves(feats):
        t = held_threshold({k: (f[fit[k], 0], two[fit[k]]) for k, (f, two) in feats.items()})
        for k, (f, two) in feats.items():
            right["counter alone"][k] += ((f[~fit[k], 0] > t) == two[~fit[k]]).mean() / 2
    w, b = fuse_fit(feats, {k: np.ones(len(f), bool) for k, (f, _) in feats.items()})
    lines = header(args, "the count: the counter's logit and both shipped models' "
                   "reconstruction errors, weighed on held-out training images") + [
        f"# {args.counter}, models/{cp.MNIST_MODEL_FILE.name} and models/{cp.MODEL_FILE.name}; "
        "each group's right count is "
        "the mean of 2 folds: fitted (weights and maximin threshold) on one half of every "
        "group, counted on the other", "| group | n | counter alone | fused |", "|---|---|---|---|"]
    for k in feats:
        lines.append(f"| {k[0]} at {k[1]} px | {len(feats[k][0])} | "
                     f"{right['counter alone'][k]:.3f} | {right['fused'][k]:.3f} |")
    worst = {name: worst_as_written(r) for name, r in right.items()}
    lines += [f"| worst group, pens as written | | **{worst['counter alone']:.3f}** | "
              f"**{worst['fused']:.3f}** |", "",
              "fitted on all: score = " + " ".join(f"{wk:+.4f} x {name}" for wk, name in zip(
                  w, FEATURE_NAMES)) + f" {b:+.4f}, two above 0"]
    arrays = {k: v for k, v in counter.items() if not k.startswith("fuse_")}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, fuse_w=w.astype(np.float32), fuse_b=np.float32([b]))
    mc.atomic_write(Path(args.model), buf.getvalue())
    lines.append(f"wrote {args.model}")
    report("\n".join(lines) + "\n", args.out)


# count features: what else the count could weigh, each set weighed as count fuse weighs
SHIPPED = "shipped: + both redrawings"
FEATURE_SETS = {
    "counter alone": ("logit",),
    SHIPPED: ("logit", "redraw1", "redraw2"),
    "+ MNIST redrawing only": ("logit", "redraw1"),
    "+ MNIST redrawing, capsule lengths": ("logit", "redraw1", "lengths1", "lengths2"),
    "all": ("logit", "redraw1", "lengths1", "lengths2", "redraw2"),
}


def candidate_features(hx: np.ndarray, counter: dict, one: mc.Run, two: mc.Run) -> dict:
    """What the count could weigh on the counter's views hx (N, 36, 36, 2) uint8: {logit (N, 1),
    redraw1 (N, 1) and redraw2 (N, 2): cp.count_features' columns; lengths1 and lengths2 (N, J):
    each model's capsule lengths, sorted}."""
    ones, twos = cp.counter_views(hx)
    caps = cp.capsules(one, two, ones, twos)                                    # (N, J, E)
    f = cp.count_features(counter_logits(hx, counter), ones, twos, one, two, caps)  # (N, 4)
    return dict(logit=f[:, :1], redraw1=f[:, 1:2], redraw2=f[:, 2:],
                lengths1=np.sort(mc.class_scores(caps[0]), 1),
                lengths2=np.sort(mc.class_scores(caps[1]), 1))


def count_features_study(args, mnist) -> None:
    """FEATURE_SETS each weighed as count fuse weighs, cross-validated on the same held-out
    training images; how often the composites the shipped rule misses hold a 1; --figure: the
    counter's 36x36 view of some images it misses."""
    counter = counter_file(args.counter)
    if len(counter.get("fuse_w", ())) != len(FEATURE_NAMES):
        raise mc.CapsNetError(f"{args.counter} has no count fuse weights for "
                              f"{len(FEATURE_NAMES)} inputs (count fuse writes them)")
    models, pools = load_shipped(counter=False), training_pools(mnist, args.seed)
    held, source = held_sets(pools, args, np.random.default_rng([args.seed, 2]))
    labels = {kind: s.labels for kind, s in source.items()}
    feats = {k: (candidate_features(hx, counter, *models), np.full(len(hx), two))
             for k, (hx, two) in held.items()}
    right = {name: folds_right({k: (np.hstack([f[c] for c in cols]), two)
                                for k, (f, two) in feats.items()})
             for name, cols in FEATURE_SETS.items()}
    lines = header(args, "what else the count could weigh, on held-out training images") + [
        "# each set weighed as count fuse weighs (logistic regression, maximin threshold), the "
        "mean of 2 folds; redrawings: the MNIST model's of the 28x28 view from its longest "
        "capsule, the MultiMNIST model's of the 36x36 view from its longest and its two longest; "
        "capsule lengths: both models', sorted",
        "| group | n | " + " | ".join(FEATURE_SETS) + " |", "|---|---|" + "---|" * len(right)]
    for k, (f, _) in feats.items():
        lines.append(f"| {k[0]} at {k[1]} px | {len(f['logit'])} | "
                     + " | ".join(f"{r[k]:.3f}" for r in right.values()) + " |")
    worst = [worst_as_written(r) for r in right.values()]
    lines.append("| worst group, pens as written | | " + " | ".join(f"**{w:.3f}**" for w in worst)
                 + " |")
    score = {k: np.hstack([f[c] for c in FEATURE_SETS[SHIPPED]]) @ counter["fuse_w"]
             + counter["fuse_b"][0] for k, (f, _) in feats.items()}
    missed = {k: (s > 0) != feats[k][1] for k, s in score.items()}
    ones = (labels["composites"] == 1).any(1)
    pens = [k for k in feats if k[0] == "composites" and as_written(k)]
    hold = np.concatenate([ones[missed[k]] for k in pens])  # each missed composite: holds a 1?
    lines += ["", f"{args.counter}'s rule (in-sample if count fuse ran with the same --seed and "
              f"--held): composites missed, pens as written: {len(hold)} of "
              f"{len(pens) * len(ones)}; "
              f"{hold.mean() if len(hold) else 0:.2f} of those missed hold a 1, against "
              f"{ones.mean():.2f} of all composites"]
    if args.figure:
        miss_figure(args.figure, held, labels, score, missed)
        lines.append(f"wrote {args.figure}")
    report("\n".join(lines) + "\n", args.out)


def miss_figure(path: str, held: dict, labels: dict, score: dict, missed: dict,
                groups=(("composites", 28), ("digits", 64)), n: int = 10) -> None:
    """The counter's 36x36 view of the first n images of each of groups that the shipped rule
    misses, each titled with its labels and score (two above 0), written to path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(n * 1.0, len(groups) * 1.3 + 0.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), n, squeeze=False)
    for row, k in zip(axes, groups):
        idx = np.flatnonzero(missed[k])[:n]
        for a, i in zip(row, idx):
            a.imshow(held[k][0][i, ..., 0], cmap="gray", vmin=0, vmax=255)
            a.set_title(f"{'+'.join(map(str, labels[k[0]][i]))}: {score[k][i]:+.1f}", fontsize=8)
        for a in row:
            a.set_xticks([]), a.set_yticks([])
        row[0].set_ylabel(f"{k[0]}, {k[1]} px", fontsize=8)
    fig.suptitle("images the count misses (held-out training images; the count's score, two "
                 "above 0)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    mc.atomic_write(Path(path), buf.getvalue())


def count_score(args, mnist) -> None:
    """Measure --digits auto on test digits and composites, and the MNIST convention (point 2)."""
    models = load_shipped()
    pols = ("mixed",) if args.mixed else POLARITIES
    print(f"reading {args.n} test digits and composites at {SIDES} px, {', '.join(pols)}",
          flush=True)
    groups = count_groups(mnist, "test", args.n, args.seed, pols, models, print)
    lines = header(args, "--digits auto against the true count forced, on test images")
    lines += ["| images | px | polarity | n | right count (s.e.) | named right, auto | named right, "
              "forced --digits 1/2 | auto - forced (s.e.) |", "|---|---|---|---|---|---|---|---|"]
    gap = ["", "what auto - forced is made of: where the count is right, auto reads as forced does, "
           "so the whole difference lies in the miscounted images; hidden: at least half of "
           "one source digit's ink (pixels of at least 128) on the other's",
           "| images | px | polarity | miscounted | of them named right, auto | forced | "
           "hidden, of the miscounted | hidden, of all |", "|---|---|---|---|---|---|---|---|"]
    for (kind, side, pol), (g, src) in groups.items():
        k = src.labels.shape[1]
        auto = named_auto(g, src.labels)
        forced = named_right(g[f"found{k}"], src.labels)
        right, n, diff = (g["count"] == k).mean(), len(src.labels), auto.astype(float) - forced
        lines.append(f"| {kind} | {side} | {pol} | {n} | {right:.3f} ({se(right, n):.3f}) "
                     f"| {auto.mean():.3f} | {forced.mean():.3f} | {diff.mean():+.3f} "
                     f"({diff.std() / np.sqrt(n):.3f}) |")
        miss, hidden = g["count"] != k, src.hidden >= 0.5
        shares = (f"{hidden[miss].mean() if miss.any() else 0:.2f} | {hidden.mean():.2f}"
                  if k == 2 else "- | -")
        gap.append(f"| {kind} | {side} | {pol} | {miss.sum()} | {auto[miss].sum()} | "
                   f"{forced[miss].sum()} | {shares} |")
    lines += gap + ["", *convention_rows(mnist, args, models)]
    report("\n".join(lines) + "\n", args.out)


def se(p: float, n: int) -> float:
    """The binomial standard error of a share p of n."""
    return float(np.sqrt(p * (1 - p) / n))


def frame_filling(img: np.ndarray) -> np.ndarray:
    """A digit or composite whose ink box is scaled (keeping its aspect) to fill a 28x28 frame."""
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] / 255
    h, w = (max(1, round(n * 28 / max(crop.shape))) for n in crop.shape)
    out = np.zeros((28, 28))
    out[(28 - h) // 2:(28 - h) // 2 + h, (28 - w) // 2:(28 - w) // 2 + w] = cp.resize(crop, h, w)
    return np.round(255 * np.clip(out, 0, 1)).astype(np.uint8)


def convention_rows(mnist, args, models) -> list[str]:
    """Point 2: raw test digits and composites read as before (as they are) and now (to_canvas);
    frame-filling 28x28 digits against the same digits at 64x64, both with no flag."""
    one, two = models
    x, y = mnist["test_x"], mnist["test_y"].astype(np.int64)
    new = np.stack([cp.to_canvas(d / 255, 28, 1)[0] for d in x])
    before = lambda run, imgs: mc.class_scores(mc.predict(run.eval_params, run.cfg, imgs))
    s_old, s_new = before(one, x), before(one, new)
    src = source_images(mnist, "test", args.n, args.seed)
    cx, cy = src["composites"].images, src["composites"].labels
    c_new = np.stack([cp.to_canvas(c / 255, 36, 2)[0] for c in cx])
    top2 = lambda s: (np.sort(mc.top2(s), 1) == np.sort(cy, 1)).all(1).mean()
    dx, dy = src["digits"].images, src["digits"].labels
    filled = read_auto([f / 255 for f in map(frame_filling, dx)], models)
    at64 = read_auto([drawn(d, 64, "white on black") for d in dx], models)
    old_filled = before(one, np.stack([frame_filling(d) for d in dx]))
    auto = lambda g: (np.where(g["count"] == 1, named_right(g["found1"], dy), False).mean(),
                      (g["count"] == 1).mean())
    return ["the MNIST convention (to_canvas) against reading the image as it is",
            f"  all {len(x)} raw 28x28 test digits, MNIST model: top-1 as they are "
            f"{(s_old.argmax(1) == y).mean():.4f}, after to_canvas {(s_new.argmax(1) == y).mean():.4f}"
            f" ({(new != x).any((1, 2)).sum()} images changed)",
            f"  {len(cx)} raw 36x36 test composites, MultiMNIST model: set accuracy as they are "
            f"{top2(before(two, cx)):.4f}, after to_canvas {top2(before(two, c_new)):.4f} "
            f"({(c_new != cx).any((1, 2)).sum()} changed)",
            f"  {len(dx)} test digits, no flag (auto): named right / counted one",
            "    frame-filling 28x28 (ink box scaled to 28): {:.3f} / {:.3f}".format(*auto(filled)),
            "    the same digits at 64x64:                   {:.3f} / {:.3f}".format(*auto(at64)),
            f"    frame-filling 28x28 read as it is (before): top-1 "
            f"{(old_filled.argmax(1) == dy[:, 0]).mean():.3f}"]


def load_shipped(counter: bool = True) -> tuple:
    """The shipped MNIST and MultiMNIST models, which the count weighs, checking that the shipped
    counter is there too unless (counter False) the caller brings its own."""
    files = (cp.MNIST_MODEL_FILE, cp.MODEL_FILE) + (cp.COUNT_MODEL_FILE,) * counter
    if not all(f.exists() for f in files):
        raise mc.CapsNetError("count needs the shipped models, " + ", ".join(
            f"models/{f.name}" for f in files))
    return mc.load_checkpoint(cp.MNIST_MODEL_FILE), mc.load_checkpoint(cp.MODEL_FILE)


def report(text: str, out) -> None:
    print(text, end="")
    if out:
        mc.atomic_write(Path(out), text.encode())
        print(f"wrote {out}")


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
    how = ex.add_subparsers(dest="how", required=True, metavar="{write,hand,score}",
                            parser_class=mc.ArgumentParser)
    w = how.add_parser("write", help="write the three example images",
                       description="Write OUTDIR/digit100_L.png, OUTDIR/photo_L.jpg and "
                       "OUTDIR/blank.png.")
    w.add_argument("outdir", help="created if missing")
    w.set_defaults(fn=examples_write)
    h = how.add_parser("hand", help="write lone digits at 200, 112 and 28 px, and a drawn 7",
                       description="Write test digit 0 at 200x200, a thick 7 drawn at 200x200, "
                       "test digits 1-10 at 112x112 and 11-15 filling 28x28 into OUTDIR.")
    h.add_argument("outdir", help="created if missing")
    h.set_defaults(fn=examples_hand)
    s = how.add_parser("score", help="how the shipped model reads many such images",
                       description="Top-1 and the 0.5 threshold on --n test digits as stored, "
                       "drawn larger and photographed; set accuracy on --n composites as made "
                       "and drawn larger.")
    s.add_argument("--n", type=int, default=1000,
                   help="digits and composites (default: %(default)s)")
    s.add_argument("--model", default=str(mc.MODEL_FILE),
                   help="the model read (default: the shipped MultiMNIST model)")
    s.set_defaults(fn=examples_score)
    co = sub.add_parser("count", help="--digits auto: train its counter on training images, "
                        "measure it on test images",
                        description="count train: train the pixel counter of capsnet_predict.py "
                        "on training digits and composites of the paper's task; count score: "
                        f"measure it on test images drawn at {', '.join(map(str, SIDES))} px "
                        "and filling 28x28, in both polarities, against --digits 1|2, and how "
                        "the MNIST convention reads raw and frame-filling digits.")
    co_how = co.add_subparsers(dest="how", required=True, metavar="{train,held,fuse,score}",
                               parser_class=mc.ArgumentParser)
    ct = co_how.add_parser("train", help="train the pixel counter on training images",
                           description="Train the counter of --digits auto (a small convolutional "
                           "network on both normalised views) on --n training digits and --n "
                           "training composites, each drawn --renders times at a random size "
                           "and polarity; choose its threshold on --held others of each kind "
                           "at each size; write it to --model.")
    ct.set_defaults(fn=count_train, n=20000)
    ct.add_argument("--channels", default="16,32", help="each convolution's channels "
                    "(default: %(default)s)")
    ct.add_argument("--fc", type=int, default=64, help="hidden ReLUs (default: %(default)s)")
    ct.add_argument("--epochs", type=int, default=9, help="(default: %(default)s)")
    ct.add_argument("--model", default="models/count_cnn.npz",
                    help="where the counter goes (default: %(default)s)")
    ch = co_how.add_parser("held", help="score counter files on count train's held-out images",
                           description="Redraw count train's held-out training images (the same "
                           "--seed, --n, --renders and --held) and give each COUNTER's right "
                           "count per group at its own maximin threshold, their mean logit's, "
                           "and with --shifts the same over 1-px moves of the input.")
    ch.set_defaults(fn=count_held, n=20000)
    ch.add_argument("counters", nargs="+", metavar="COUNTER", help="counter .npz files")
    ch.add_argument("--shifts", action="store_true",
                    help="average each counter's logit over its input moved 1 px every way "
                    "(default: off)")
    for q in (ct, ch):
        q.add_argument("--renders", type=int, default=3, help="drawings of each (default: "
                       "%(default)s)")
        q.add_argument("--held", type=int, default=500, help="held-out images of each kind at "
                       "each size (default: %(default)s)")
    ct.add_argument("--distort", action="store_true", help="fit on digits turned, sheared and "
                    "stretched at random, half of them (default: off)")
    cf = co_how.add_parser("fuse", help="weigh the counter's logit with both models' "
                           "reconstruction errors on held-out training images",
                           description="Fit the count's weights (the counter's logit, the MNIST "
                           "model's reconstruction error on the one-digit view, the MultiMNIST "
                           "model's on the two-digit view) by logistic "
                           "regression on --held held-out training images of each kind at each "
                           "size, its threshold maximin; give 2-fold cross-validated right "
                           "counts against the counter alone; write --counter with the weights "
                           "to --model.")
    cf.set_defaults(fn=count_fuse, n=None)
    cf.add_argument("--counter", default="models/count_cnn.npz",
                    help="the counter read (default: %(default)s)")
    cf.add_argument("--model", default="models/count_cnn.npz",
                    help="where the counter with its weights goes (default: %(default)s)")
    cx = co_how.add_parser("features", help="compare what else the count could weigh",
                           description="Weigh each of FEATURE_SETS as count fuse weighs, 2-fold "
                           "cross-validated on the same --held held-out training images of each "
                           "kind at each size; count the composites the shipped rule misses that "
                           "hold a 1; --figure: the counter's view of some it misses.")
    cx.set_defaults(fn=count_features_study, n=None)
    cx.add_argument("--counter", default="models/count_cnn.npz",
                    help="the counter with count fuse's weights (default: %(default)s)")
    for q in (cf, cx):  # the shipped weights were fitted on 3,000 a group
        q.add_argument("--held", type=int, default=3000, help="held-out images of each kind at "
                       "each size (default: %(default)s)")
    cx.add_argument("--figure", default=None, help="write the misses' figure here (PNG; "
                    "default: none)")
    cs = co_how.add_parser("score", help="measure the rule on test images",
                           description="Right count and digits named right, auto against "
                           "forced, per group of test images; the MNIST convention's rows.")
    cs.set_defaults(fn=count_score, n=500)
    cs.add_argument("--mixed", action="store_true", help="one group a size, each image in a "
                    "polarity drawn at random (default: a group for each polarity)")
    for q in (ct, ch, cs):
        q.add_argument("--n", type=int, default=q.get_default("n"),
                       help="images of each kind (default: %(default)s)")
        q.add_argument("--out", default=None, help="also write the report here (default: none)")
    for q in (cf, cx):
        q.add_argument("--out", default=None, help="also write the report here (default: none)")
    for q in (mn, w, s, ct, ch, cf, cx, cs):  # hand draws fixed digits: no --seed
        q.add_argument("--seed", type=int, default=0, help="which digits (default: %(default)s)")
    for q in (mn, w, h, s, ct, ch, cf, cx, cs):
        q.add_argument("--data-dir", default=None,
                       help="MNIST cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
        q.set_defaults(prog=q.prog)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ["out", "figure"] + ["model"] * (args.fn in (count_train, count_fuse)):
        if getattr(args, flag, None) and (why := mc.check_writable(getattr(args, flag))):
            print(f"{args.prog}: error: --{flag}: {why}", file=sys.stderr)  # before any work
            return 1
    args.commit = commit()  # the code that runs, not what the tree holds when the report is written
    try:
        args.fn(args, mnist_fetch.load_mnist(args.data_dir))
    except mc.CapsNetError as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
