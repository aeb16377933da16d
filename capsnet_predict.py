"""Ask a trained model about your own images: name the digits in each, and draw the input beside
each digit's reconstruction from its own capsule.

    python3 capsnet_predict.py IMAGE... [--out predicted.png] [--digits auto|1|2]

Any size, grey or colour, either polarity: the ink is found, cropped, scaled and centred as MNIST
was (fit_digits). One digit goes to the MNIST model, two to the MultiMNIST model.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

import cnn_baseline  # noqa: F401  (registers the CNN, so that a CNN checkpoint predicts too)
import multimnist_capsnet as mc
from multimnist_capsnet import CapsNetError, MODEL_FILE, Run

DIGIT_SIDE = 28      # an MNIST image: one digit whose ink box was scaled to fit DIGIT_BOX x
DIGIT_BOX = 20       # DIGIT_BOX keeping its aspect, then centred by its centre of mass
PAIR_BOX = 23        # median long side of the ink box of a paper's-task composite (docs/model.md)
INK_CONTRAST = 0.2   # ink: a pixel and its 3x3 mean this far above the background
WORK_SIDE = 256      # fit_digits shrinks a larger image to this long side first
MIN_LENGTH = 0.5     # a capsule at least this long names a digit; a shorter one is a guess
MNIST_MODEL_FILE = mc.installed("models/capsnet-mnist.npz")  # the shipped one-digit model
A_RGB, B_RGB = np.array([1.0, 0.1, 0.1]), np.array([0.1, 1.0, 0.1])  # digit a red, b green


def _unit_range(x: np.ndarray, path) -> np.ndarray:
    """Pixel values as float64 in [0, 1]: uint16 as 0..65535, other integers as 0..255, floats as
    0..1 when they fit, else as 0..255."""
    if x.dtype == bool:
        return x.astype(np.float64)
    if x.dtype.kind not in "uif":
        raise CapsNetError(f"{path}: pixels of type {x.dtype} are not numbers")
    top = 65535 if x.dtype == np.uint16 else 255
    is_float = x.dtype.kind == "f"
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise CapsNetError(f"{path} contains NaN or infinite pixels")
    lo, hi = x.min(), x.max()
    if is_float and lo >= 0 and hi <= 1:
        return x
    if lo < 0 or hi > top:
        raise CapsNetError(f"{path}: pixel values {lo:g}..{hi:g} are outside 0..{top}")
    return x / top


def read_image(path) -> np.ndarray:
    """The image at path (any format imageio reads, or .npy) as float64 (H, W) in [0, 1], grey as
    stored: colour becomes luminance, alpha is dropped. Anything else is a CapsNetError naming
    the file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            x = np.load(path, allow_pickle=False)
        else:
            import imageio.v3 as iio
            with warnings.catch_warnings():  # imageio's plugins warn as it tries each in turn
                warnings.simplefilter("ignore")
                x = iio.imread(path)
    except FileNotFoundError:
        raise CapsNetError(f"{path} does not exist") from None
    except Exception as e:  # imageio and np.load raise many types for a file they cannot read
        raise CapsNetError(f"{path} is not a readable image ({type(e).__name__})") from None
    x = np.asarray(x)
    if x.size == 0:
        raise CapsNetError(f"{path} is empty")
    if x.ndim == 3 and x.shape[2] in (1, 3, 4):
        x = x[..., :3] if x.shape[2] > 1 else x[..., 0]             # alpha dropped
    x = _unit_range(x, path)
    if x.ndim == 3 and x.shape[2] == 3:
        x = x @ np.array([0.299, 0.587, 0.114])                     # (H, W) luminance
    if x.ndim != 2:
        raise CapsNetError(f"{path} has shape {x.shape}; expected a grey or colour image")
    return x


def ink_on_black(x: np.ndarray, background: str = "auto") -> tuple[np.ndarray, bool]:
    """x as white ink on black, as MNIST is, and whether it was inverted. 'auto': ink is the
    minority of the pixels, so it drags the mean away from the median, below it for dark ink on
    light paper (then inverted); 'white' always inverts, 'black' never."""
    invert = background == "white" or (background == "auto" and x.mean() < np.median(x))
    return (1 - x if invert else x), bool(invert)


def _mean3(x: np.ndarray) -> np.ndarray:
    """Each pixel's 3x3 neighbourhood mean (edges repeated): a stroke keeps its level, a lone
    noisy pixel loses 8/9 of it."""
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _background(x: np.ndarray) -> np.ndarray:
    """The background's level under uneven light: a quadratic surface in (row, col) fitted by
    least squares to the darker half of x (the ink is the minority), then twice more to the
    pixels it leaves less than INK_CONTRAST / 2 below (the white ink is left out)."""
    h, w = x.shape
    r, c = np.mgrid[:h, :w].reshape(2, -1) / max(h, w)
    basis = np.stack([np.ones_like(r), r, c, r * r, r * c, c * c], 1)
    keep = x.ravel() <= np.median(x)
    for _ in range(3):
        fit = basis @ np.linalg.lstsq(basis[keep], x.ravel()[keep], rcond=None)[0]
        keep = x.ravel() - fit < INK_CONTRAST / 2
    return fit.reshape(h, w)


def _ink(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """White-on-black x -> (x above its background; the ink mask: the pixels that stand
    INK_CONTRAST above the background, and so does their 3x3 mean, which a lone noisy pixel's
    does not)."""
    d = x - _background(x)
    return d, (d >= INK_CONTRAST) & (_mean3(np.maximum(d, 0)) >= INK_CONTRAST)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) resampling weights: shrinking, each output pixel is the mean of the input
    span it covers (area averaging, as MNIST's anti-aliasing); enlarging, linear interpolation."""
    scale = n_in / n_out
    j = np.arange(n_in)
    if scale > 1:
        lo = np.arange(n_out)[:, None] * scale
        w = np.clip(np.minimum(lo + scale, j + 1) - np.maximum(lo, j), 0, None)
    else:
        centre = (np.arange(n_out) + 0.5) * scale - 0.5
        w = np.maximum(0, 1 - np.abs(j - centre[:, None]))
    return w / w.sum(1, keepdims=True)


def resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, ...) -> (h, w, ...) by _resize_matrix along both axes."""
    x = np.tensordot(_resize_matrix(x.shape[0], h), x, axes=(1, 0))
    return np.moveaxis(np.tensordot(_resize_matrix(x.shape[1], w), x, axes=(1, 1)), 0, 1)


def fit_digits(x: np.ndarray, canvas: int, n_digits: int) -> tuple[np.ndarray | None, str]:
    """MNIST's normalisation for any image: white-on-black float x (H, W) -> uint8 (canvas,
    canvas) and what was done, or (None, why) when x has no ink.

    MNIST's digits were binary scans, scaled so that their ink's box fits 20x20 keeping its
    aspect, anti-aliased by the scaling, and placed with their centre of mass at the centre of
    28x28. So here: an image larger than WORK_SIDE is first shrunk to it (fine noise averages
    out); the ink (_ink) at least half as bright as its 90th percentile becomes 1 and all else 0;
    that ink's box is area-averaged to fit DIGIT_BOX (one digit) or PAIR_BOX (two, spread as in
    MultiMNIST); its centre of mass goes to the canvas centre (moved back inside when the box
    would cross an edge)."""
    how = ""
    if max(x.shape) > WORK_SIDE:
        h, w = (max(1, round(n * WORK_SIDE / max(x.shape))) for n in x.shape)
        x, how = resize(x, h, w), f"shrunk to {w}x{h}; "
    d, ink = _ink(x)
    if not ink.any():
        return None, "no ink"
    level = np.percentile(d[ink], 90) / 2
    ink &= d >= level
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    (r0, r1), (c0, c1) = rows[[0, -1]], cols[[0, -1]]
    crop = ink[r0:r1 + 1, c0:c1 + 1].astype(np.float64)
    scale = (DIGIT_BOX if n_digits == 1 else PAIR_BOX) / max(crop.shape)
    h, w = (max(1, round(n * scale)) for n in crop.shape)
    small = resize(crop, h, w)
    com = [(small.sum(1 - ax) * (np.arange(small.shape[ax]) + 0.5)).sum() / small.sum()
           for ax in (0, 1)]
    top, left = (int(np.clip(round(canvas / 2 - c), 0, canvas - n)) for c, n in zip(com, (h, w)))
    out = np.zeros((canvas, canvas), np.uint8)
    out[top:top + h, left:left + w] = np.round(255 * small)
    return out, (f"{how}ink >= {level:.2f} above the background, its box {c1 - c0 + 1}x"
                 f"{r1 - r0 + 1} at row {r0}, col {c0} scaled x{scale:.3g} to {w}x{h}, centred "
                 f"by mass in {canvas}x{canvas}")


def to_canvas(x: np.ndarray, canvas: int, n_digits: int) -> tuple[np.ndarray | None, str]:
    """Any white-on-black image as the model's uint8 input, and what was done: the model's own
    size (canvas x canvas) is taken as it is, a 28x28 MNIST digit placed at the centre of a larger
    canvas, any other size normalised by fit_digits. (None, why) when there is no ink."""
    if x.shape != (canvas, canvas) and (x.shape != (DIGIT_SIDE,) * 2 or canvas < DIGIT_SIDE):
        return fit_digits(x, canvas, n_digits)
    if not _ink(x)[1].any():
        return None, "no ink"
    img = np.round(x * 255).astype(np.uint8)
    if x.shape[0] == canvas:
        return img, f"{canvas}x{canvas}: the model's size, taken as it is"
    return (mc.place(img[None], np.zeros(1, int), np.zeros(1, int), canvas)[0],
            f"{DIGIT_SIDE}x{DIGIT_SIDE} digit placed at the centre of {canvas}x{canvas}")


def choose_model(digits: str, shape, checkpoint: str | None) -> tuple[Path, int]:
    """Which model reads an image of this shape, and how many digits to look for in it.

    --digits '1' or '2' says how many; 'auto': one in a 28x28 image (MNIST's size), else two.
    --checkpoint, when given, reads everything. Otherwise one digit goes to the MNIST model once
    models/capsnet-mnist.npz ships, and until then to the MultiMNIST model (its longest capsule);
    two digits always go to the MultiMNIST model. A one-digit model answers one (cfg.n_labels)."""
    n = 1 if digits == "1" or (digits == "auto" and tuple(shape) == (DIGIT_SIDE,) * 2) else 2
    if checkpoint:
        return Path(checkpoint), n
    return (MNIST_MODEL_FILE if n == 1 and MNIST_MODEL_FILE.exists() else MODEL_FILE), n


def digits_found(scores: np.ndarray, n: int) -> list[int]:
    """The up to n highest-scoring classes of scores (J,) that reach MIN_LENGTH, highest first."""
    return [int(k) for k in np.argsort(-scores, kind="stable")[:n] if scores[k] >= MIN_LENGTH]


def answer(scores: np.ndarray, n: int, what: str = "capsule length") -> str:
    """The line predict prints for an image whose scores (J,) are what's (capsule lengths),
    looking for n digits: e.g. '9 and 3  (capsule lengths 0.95, 0.66)'."""
    found, order = digits_found(scores, n), np.argsort(-scores, kind="stable")
    if not found:
        return (f"no digit found  (the longest {what}, {order[0]}'s, is {scores[order[0]]:.2f}; "
                f"a digit needs {MIN_LENGTH:.2f})")
    text = (" and ".join(map(str, found)) + f"  ({what}{'s' * (len(found) > 1)} "
            + ", ".join(f"{scores[k]:.2f}" for k in found))
    if len(found) < n:
        nxt = order[len(found)]
        text += f"; no second digit: the next, {nxt}, is {scores[nxt]:.2f}"
    return text + ")"


def image_writable(out: str) -> str | None:
    """Why --out cannot be written (its folder, or a format imageio cannot write), else None."""
    if why := mc.check_writable(out):
        return why
    suffix = Path(out).suffix.lower()
    try:
        import imageio.v3 as iio
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            iio.imwrite("<bytes>", np.zeros((2, 2, 3), np.uint8), extension=suffix)
    except Exception:  # the plugins raise many types for a format they lack
        return (f"cannot write {out}: no image format for the suffix '{suffix}'" if suffix else
                f"cannot write {out}: give it a suffix that names an image format (.png, .jpg)")
    return None


def build_predict_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="capsnet_predict.py",
                       description="Name the digits in each image: the longest digit capsules "
                                   f"of a trained CapsNet, those at least {MIN_LENGTH} long. "
                                   "Each file that cannot be read is one line on stderr; the "
                                   "others are still answered, and the exit status is 1.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG, JPEG or .npy, any size, grey or colour, either polarity; the model's "
                        f"own size ({DIGIT_SIDE}x{DIGIT_SIDE} digit, 36x36 composite) is taken as "
                        "it is, any other is normalised as MNIST was (--verbose says how)")
    shipped = Path("models", MODEL_FILE.name)
    p.add_argument("--checkpoint", default=None,
                   help=f"a model or a --save checkpoint (default: the shipped model, {shipped})")
    p.add_argument("--digits", choices=("1", "2", "auto"), default="auto",
                   help=f"how many digits each image holds; auto: one if it is {DIGIT_SIDE}x"
                        f"{DIGIT_SIDE}, else two (default: %(default)s)")
    p.add_argument("--background", choices=("auto", "black", "white"), default="auto",
                   help="the image's background; auto: the side the median pixel is on (ink is "
                        "the minority) (default: %(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="print how each image was cropped and scaled, and all ten capsule lengths")
    p.add_argument("--out", default=None,
                   help="an image (its suffix names the format): per input, the image as read, "
                        "the model's input, the reconstructions from the first digit's capsule "
                        "(red) and the second's (green) (default: none)")
    return p


def predict_main(argv) -> int:
    parser = build_predict_parser()
    args = parser.parse_args(argv)
    err = lambda msg: print(f"{parser.prog}: error: {msg}", file=sys.stderr)
    if args.out and (why := image_writable(args.out)):
        err(f"--out: {why}")  # as training's output flags: exit 1, before any work
        return 1
    runs, rows, failed = {}, [], 0
    try:
        if args.checkpoint:  # a bad one is reported before any image is read
            _model(runs, Path(args.checkpoint), args)
        for path in args.images:
            try:
                x = read_image(path)
            except CapsNetError as e:  # this file only: the others are still answered
                err(e)
                failed += 1
                continue
            rows.append(_predict_one(path, x, args, runs))
        if args.out and rows:
            _write_predictions(args.out, rows)
            print(f"wrote {args.out}")
    except CapsNetError as e:
        err(e)
        return 1
    return 1 if failed else 0


def _model(runs: dict, path: Path, args) -> Run:
    """The run at path, loaded once, checked against the flags."""
    if path not in runs:
        run = mc.load_checkpoint(path)
        if args.digits == "2" and run.cfg.n_labels == 1:
            raise CapsNetError(f"--digits 2: {path} is a one-digit model ({DIGIT_SIDE}x"
                               f"{DIGIT_SIDE})")
        if args.out and run.cfg.model != "capsnet":
            raise CapsNetError(f"--out draws the capsules' reconstructions; the {run.cfg.model} "
                               f"in {path} has none")
        runs[path] = run
    return runs[path]


def _predict_one(path, x: np.ndarray, args, runs: dict) -> tuple:
    """Print predict's answer for the image x read from path; -> its row of the --out figure:
    (x as white on black, the model's input or None, the found digits' reconstructions)."""
    ckpt, n = choose_model(args.digits, x.shape, args.checkpoint)
    run = _model(runs, ckpt, args)
    cfg, params = run.cfg, run.eval_params
    n = min(n, cfg.n_labels)
    ink, inverted = ink_on_black(x, args.background)
    img, how = to_canvas(ink, cfg.canvas, n)
    found, scores = [], None
    if img is None:
        print(f"{path}: no digit found  (no ink)")
    else:
        out = mc.predict(params, cfg, img[None])                          # (1, J, E) or (1, J)
        scores = mc.class_scores(out, cfg)[0]
        found = digits_found(scores, n)
        what = mc.score_name(cfg)
        print(f"{path}: {answer(scores, n, what)}")
    if args.verbose:
        print(f"  {x.shape[1]}x{x.shape[0]}{', inverted' if inverted else ''}; {how}; "
              f"model {ckpt.name}, {n} digit{'s' * (n > 1)}")
        if scores is not None:
            print("  all ten: " + "  ".join(f"{k}:{sk:.2f}" for k, sk in enumerate(scores)))
    recon = [mc.reconstruct(params, out, np.array([k]))[0] for k in found] if args.out else []
    return ink, img, recon


def _cell(x: np.ndarray, side: int) -> np.ndarray:
    """An (h, w, 3) image in [0, 1] scaled to fit a black side x side cell, keeping its aspect:
    by whole pixels when it is small (the model's pixels stay visible), else resampled."""
    h, w = x.shape[:2]
    k = side // max(h, w)
    x = np.repeat(np.repeat(x, k, 0), k, 1) if k >= 1 else resize(
        x, max(1, h * side // max(h, w)), max(1, w * side // max(h, w)))
    out = np.zeros((side, side, 3))
    t, left = (side - x.shape[0]) // 2, (side - x.shape[1]) // 2
    out[t:t + x.shape[0], left:left + x.shape[1]] = np.clip(x, 0, 1)
    return out


def _write_predictions(out, rows) -> None:
    """One row per image: the image as read (white on black), the model's input, the
    reconstruction from the first digit's capsule in red and from the second's in green (black
    when there is none), in cells of 4 model pixels per pixel, written as out's suffix says."""
    import imageio.v3 as iio
    side = 4 * max(img.shape[0] if img is not None else DIGIT_SIDE for _, img, _ in rows)
    grey = lambda a: np.repeat(np.asarray(a, np.float64)[..., None], 3, 2)
    gap = np.full((side, 4, 3), 0.5)
    lines = []
    for ink, img, recon in rows:
        s = int(round(math.sqrt(recon[0].size))) if recon else 1
        tints = [r.reshape(s, s)[..., None] * rgb for r, rgb in zip(recon, (A_RGB, B_RGB))]
        tints += [np.zeros((1, 1, 3))] * (2 - len(tints))
        cells = [grey(ink), grey(img / 255) if img is not None else np.zeros((1, 1, 3)), *tints]
        line = [part for c in cells for part in (_cell(c, side), gap)][:-1]
        lines += [np.concatenate(line, 1), np.full((4, len(cells) * (side + 4) - 4, 3), 0.5)]
    fig = np.round(255 * np.concatenate(lines[:-1])).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = iio.imwrite("<bytes>", fig, extension=Path(out).suffix.lower())
    try:
        mc.atomic_write(Path(out), data)
    except OSError as e:
        raise CapsNetError(f"cannot write {out}: {e.strerror}") from None


def main(argv=None) -> int:
    try:
        return predict_main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141  # as a shell reports a pipe's writer ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
