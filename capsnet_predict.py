"""Ask a trained model about your own images: name the digits in each, and draw the input beside
each digit's reconstruction from its own capsule.

    python3 capsnet_predict.py IMAGE... [--out predicted.png] [--digits auto|1|2]

Any size, grey or colour, either polarity: an image that already follows MNIST's convention is
taken as it is (as_made), any other is cropped, scaled and centred as MNIST was (fit_digits).
--digits auto counts the digits with a small convolutional network on the image normalised as
one digit and as two, weighed with how well each shipped model redraws it (count_scores); one
digit goes to the MNIST model, two to the MultiMNIST model.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cnn_baseline  # the counter's layers; importing it registers the CNN, so that a CNN
                     # checkpoint predicts too
import multimnist_capsnet as mc
from multimnist_capsnet import CapsNetError, MODEL_FILE, Run

DIGIT_SIDE = 28      # an MNIST image: one digit whose ink box was scaled to fit DIGIT_BOX x
DIGIT_BOX = 20       # DIGIT_BOX keeping its aspect, then centred by its centre of mass
PAIR_BOX = 23        # median long side of the ink box of a paper's-task composite (docs/model.md)
INK_CONTRAST = 0.2   # ink: a pixel and its 3x3 mean this far above the background
WORK_SIDE = 256      # fit_digits shrinks a larger image to this long side first
FINE_SIDE = 128      # and enlarges a smaller one to this long side before taking its ink's box
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
    stored: colour becomes luminance, and where an alpha channel makes a pixel see-through, it
    shows white paper behind it, as a browser does. Anything else is a CapsNetError naming the
    file."""
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
    x = _unit_range(x, path)
    if x.ndim == 3 and x.shape[2] in (2, 4):  # drawing apps save black ink on see-through black
        x = x[..., :-1] * x[..., -1:] + (1 - x[..., -1:])           # (H, W, 1 or 3) on white
    if x.ndim == 3 and x.shape[2] in (1, 3):
        x = x[..., 0] if x.shape[2] == 1 else x @ np.array([0.299, 0.587, 0.114])  # (H, W)
    if x.ndim != 2:
        raise CapsNetError(f"{path} has shape {x.shape}; expected a grey or colour image")
    return x


BORDER_GAP = 0.5     # a frame this much darker or lighter than the median pixel is the paper


def ink_on_black(x: np.ndarray, background: str = "auto") -> tuple[np.ndarray, bool]:
    """x as white ink on black, as MNIST is, and whether it was inverted. 'auto': the paper is
    what the image's frame (its outer rows and columns) mostly shows, when that is BORDER_GAP
    away from the median pixel (a bold digit filling the frame, its ink the majority); else ink
    is the minority of the pixels, so it drags the mean away from the median, below it for dark
    ink on light paper (then inverted). 'white' always inverts, 'black' never."""
    if background == "auto":
        frame = np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]))
        med = np.median(x)
        invert = frame > med if abs(frame - med) >= BORDER_GAP else x.mean() < med
    else:
        invert = background == "white"
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
        b = basis[keep]  # least squares by the normal equations: 6x6, 20x faster than lstsq
        fit = basis @ np.linalg.solve(b.T @ b + 1e-9 * np.eye(6), b.T @ x.ravel()[keep])
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
    out); the ink (_ink) at least half as bright as its 90th percentile becomes 1 and all else 0,
    found at FINE_SIDE at least: a smaller image's ink and the pixels next to it (no noise
    elsewhere) are enlarged to it by linear interpolation first, so that a 28x28 digit takes the
    path of the same digit drawn at 64x64 or 200x200, not a 28-px staircase; that ink's box is
    area-averaged to fit DIGIT_BOX (one digit) or PAIR_BOX (two, spread as in MultiMNIST); its
    centre of mass goes to the canvas centre (moved back inside when the box would cross an
    edge)."""
    how = ""
    if max(x.shape) > WORK_SIDE:
        h, w = (max(1, round(n * WORK_SIDE / max(x.shape))) for n in x.shape)
        x, how = resize(x, h, w), f"shrunk to {w}x{h}; "
    d, ink = _ink(x)
    if not ink.any():
        return None, "no ink"
    level = np.percentile(d[ink], 90) / 2
    fy = fx = 1.0                            # how much larger the ink's box was taken
    if max(x.shape) < FINE_SIDE:
        h, w = (max(1, round(n * FINE_SIDE / max(x.shape))) for n in x.shape)
        fy, fx = h / x.shape[0], w / x.shape[1]
        d = resize(np.where(_mean3(ink.astype(np.float64)) > 0, np.maximum(d, 0), 0), h, w)
        ink, how = d >= INK_CONTRAST, f"enlarged to {w}x{h}; "
    ink &= d >= level
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    (r0, r1), (c0, c1) = rows[[0, -1]], cols[[0, -1]]
    crop = ink[r0:r1 + 1, c0:c1 + 1].astype(np.float64)
    scale = (DIGIT_BOX if n_digits == 1 else PAIR_BOX) / max(crop.shape)
    box_w, box_h = (c1 - c0 + 1) / fx, (r1 - r0 + 1) / fy     # in the image's own pixels
    h, w = (max(1, round(n * scale)) for n in crop.shape)
    small = resize(crop, h, w)
    com = [(small.sum(1 - ax) * (np.arange(small.shape[ax]) + 0.5)).sum() / small.sum()
           for ax in (0, 1)]
    top, left = (int(np.clip(round(canvas / 2 - c), 0, canvas - n)) for c, n in zip(com, (h, w)))
    out = np.zeros((canvas, canvas), np.uint8)
    out[top:top + h, left:left + w] = np.round(255 * small)
    return out, (f"{how}ink >= {level:.2f} above the background, its box {box_w:.0f}x"
                 f"{box_h:.0f} at row {r0 / fy:.0f}, col {c0 / fx:.0f} scaled "
                 f"x{scale * max(r1 - r0 + 1, c1 - c0 + 1) / max(box_w, box_h):.3g} to {w}x{h}, "
                 f"centred by mass in {canvas}x{canvas}")


INK_LEVEL = 0.1       # a pixel this bright is ink when the convention is checked (MNIST: 25/255)
MNIST_SPAN = (19, 20)  # the long side of an MNIST digit's ink box (all 60,000 training digits)
CLEAN = 0.05          # an image whose median pixel is this dark has a black background already
AS_MADE = "taken as it is"  # to_canvas's words for an image that already follows the convention


def _centre_of_mass(x: np.ndarray) -> np.ndarray:
    """(row, col) of x's centre of mass, pixel centres at +0.5, as fit_digits places it."""
    return np.array([(x.sum(1 - ax) * (np.arange(x.shape[ax]) + 0.5)).sum() / x.sum()
                     for ax in (0, 1)])


def _moved_by_whole_pixels(x: np.ndarray, canvas: int) -> tuple[np.ndarray | None, tuple]:
    """x (H, W) on a black canvas x canvas with its centre of mass within a pixel of the centre,
    moved by whole pixels only (no resampling), as MNIST centred its digits; (None, ...) when
    that would cut ink off. -> (uint8 image, (dy, dx) the move from x's centred placement)."""
    com = _centre_of_mass(x) + (np.array([canvas, canvas]) - x.shape) / 2
    off = canvas / 2 - com
    move = np.where(np.abs(off) <= 1, 0, np.round(off)).astype(int)  # MNIST: within 1 px
    top, left = ((canvas - n) // 2 + d for n, d in zip(x.shape, move))
    out = np.zeros((canvas + 2 * max(x.shape),) * 2)
    pad = max(x.shape)
    out[pad + top:pad + top + x.shape[0], pad + left:pad + left + x.shape[1]] = x
    inside = out[pad:pad + canvas, pad:pad + canvas]
    if inside.sum() < x.sum() - 1e-9:
        return None, tuple(move)
    return np.round(255 * inside).astype(np.uint8), tuple(move)


def as_made(x: np.ndarray, canvas: int, n_digits: int) -> tuple[np.ndarray | None, str]:
    """x (H, W) as the model's uint8 input (canvas, canvas) when it already follows the
    convention of the images that model learnt from, without resampling; else (None, '').

    Both need a black background (median pixel under CLEAN). Two digits: a canvas-sized image
    whose ink box spans at least MNIST_SPAN[0], as a composite is made (two MNIST digits, each
    shifted), is taken as it is. One digit: an ink box with MNIST's long side (MNIST_SPAN), at
    any image size, is moved by whole pixels to centre its mass (unmoved within a pixel, as
    MNIST's are), unless that would cut ink off."""
    if np.median(x) >= CLEAN or not (ink := x >= INK_LEVEL).any():
        return None, ""
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    if n_digits == 2:
        if x.shape != (canvas, canvas) or side < MNIST_SPAN[0]:
            return None, ""
        return (np.round(255 * x).astype(np.uint8),
                f"{canvas}x{canvas}, ink box {side} px: a composite as the model's were made, "
                f"{AS_MADE}")
    if not MNIST_SPAN[0] <= side <= MNIST_SPAN[1]:
        return None, ""
    img, move = _moved_by_whole_pixels(x, canvas)
    if img is None:
        return None, ""
    where = (f"moved by {move[0]:+d}, {move[1]:+d} px to centre its mass" if any(move) else
             "its mass centred")
    return img, (f"ink box {side} px, MNIST's: {AS_MADE}, {where} in {canvas}x{canvas}")


def to_canvas(x: np.ndarray, canvas: int, n_digits: int) -> tuple[np.ndarray | None, str]:
    """Any white-on-black image (H, W) as the model's uint8 input (canvas, canvas), and what was
    done: as_made when it already follows MNIST's convention, else normalised by fit_digits.
    (None, why) when there is no ink."""
    img, how = as_made(x, canvas, n_digits)
    if img is not None and _ink(x)[1].any():  # faint specks are no digit, in any convention
        return img, how
    return fit_digits(x, canvas, n_digits)


# ----------------------------------------------------------------------------------------------
# How many digits: the image is normalised as one digit (28x28) and as two (36x36), as each
# shipped model would read it, and a small convolutional network on both views, the pixel counter,
# says one or two. Trained on 50,000 training digits and composites of them, drawn at many sizes
# in both polarities, its threshold chosen on the other 10,000 (`python3 bench/samples.py count
# train`, runs/predict/count_train.txt); the test set only measures. Its logit is weighed with how
# well the MNIST model redraws the one-digit view and the MultiMNIST model the two-digit one
# (count fuse, runs/predict/count_fuse.txt, fitted on those 10,000 and cross-validated there).
# Those models learnt all 60,000 training digits, so their redrawings of them may flatter them:
# the test set says how much it helps on digits they never saw (docs/model.md).


@dataclass
class Views:
    """N white-on-black images as each shipped model reads them (to_canvas)."""
    ink: np.ndarray      # (N,) bool: has the image any ink
    ones: np.ndarray     # (N, 28, 28) uint8: the MNIST model's input (zeros without ink)
    twos: np.ndarray     # (N, 36, 36) uint8: the MultiMNIST model's input
    hows: list           # N (one's how, two's how): what to_canvas did


def both_views(images) -> Views:
    """Both models' inputs for the white-on-black float images (each (H, W), any size)."""
    ones, twos, hows = [], [], []
    for x in images:
        a, how_a = to_canvas(x, 28, 1)
        b, how_b = to_canvas(x, 36, 2)
        ones.append(np.zeros((28, 28), np.uint8) if a is None else a)
        twos.append(np.zeros((36, 36), np.uint8) if b is None else b)
        hows.append((how_a, how_b))
    return Views(np.array([h[0] != "no ink" for h in hows]), np.stack(ones), np.stack(twos), hows)


# The pixel counter: cnn_baseline's layers (two 5x5 convolutions, each with a 2x2 max pool, and
# one hidden fully connected layer) on both views as two channels.

COUNT_MODEL_FILE = mc.installed("models/count_cnn.npz")  # the shipped counter


def counter_input(ones: np.ndarray, twos: np.ndarray) -> np.ndarray:
    """The counter's input (N, 36, 36, 2) float32 in [0, 1]: the 36x36 views (N, 36, 36) and
    the 28x28 ones (N, 28, 28) centred beside them, both uint8."""
    x = np.zeros((len(twos), 36, 36, 2), np.float32)
    x[..., 0] = twos / 255
    x[:, 4:32, 4:32, 1] = ones / 255
    return x


def counter_views(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """counter_input's two views back from x (N, 36, 36, 2): (ones (N, 28, 28), twos (N, 36,
    36))."""
    return x[:, 4:32, 4:32, 1], x[..., 0]


def counter_forward(x: np.ndarray, p: dict) -> tuple[np.ndarray, tuple]:
    """x (N, 36, 36, 2) -> (the logit of two digits (N,), cache)."""
    logits, cache = cnn_baseline.cnn_forward(p, x)                          # (N, 1)
    return logits[:, 0], cache


def counter_backward(ds: np.ndarray, cache: tuple) -> dict:
    """ds (N,) the upstream gradient of the logits -> {name: its gradient}."""
    return cnn_baseline.cnn_backward(ds[:, None], cache)


def counter_loss(p: dict, x: np.ndarray, y: np.ndarray, l2: float = 0.0) -> tuple[float, dict]:
    """The mean cross-entropy of the counter on x (N, 36, 36, 2) with targets y (N,) in {0, 1}
    (1: two digits), plus l2 / 2 times the weights' squares -> (loss, {name: gradient})."""
    s, cache = counter_forward(x, p)
    weights = [k for k in p if k.endswith("_w")]
    loss = np.mean(np.logaddexp(0, s) - y * s) + l2 / 2 * sum((p[k] ** 2).sum() for k in weights)
    grads = counter_backward(((mc.sigmoid(s) - y) / len(x)).astype(x.dtype), cache)
    for k in weights:
        grads[k] = grads[k] + l2 * p[k]
    return float(loss), grads


_COUNTERS: dict = {}


def load_counter(path: Path = None) -> dict | None:
    """The counter at path (default COUNT_MODEL_FILE) as float32 {its cnn_ arrays..., threshold},
    loaded once; None when the file is missing, a CapsNetError when it is no counter."""
    path = Path(path or COUNT_MODEL_FILE)
    if path not in _COUNTERS:
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                counter = {k: f[k].astype(np.float32) for k in f.files}
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise CapsNetError(f"{path} is not a readable counter ({type(e).__name__})") from None
        if not {"cnn_out_w", "threshold"} <= set(counter):
            raise CapsNetError(f"{path}: not a counter (count train writes one)")
        _COUNTERS[path] = counter
    return _COUNTERS[path]


def redraw_errors(run: Run, x: np.ndarray, most: int, caps=None) -> np.ndarray:
    """(N, most) how badly run redraws the uint8 views x (N, H, W): the log of the mean squared
    error of its reconstruction from its longest capsule, then from its two longest (added and
    clipped at 1, as the paper's composites are), up to most. caps: run's capsules (N, J, E) on
    x, when a caller has them already."""
    v = mc.predict(run.eval_params, run.cfg, x) if caps is None else caps          # (N, J, E)
    order = np.argsort(-mc.class_scores(v, run.cfg), 1, kind="stable")          # (N, J)
    target, recon, out = x.reshape(len(x), -1) / 255, 0, []                        # (N, HW)
    for k in range(most):
        recon = np.clip(recon + mc.reconstruct(run.eval_params, v, order[:, k]), 0, 1)
        out.append(np.log(((recon - target) ** 2).mean(1) + 1e-4))
    return np.stack(out, 1)


def capsules(one: Run, two: Run, ones: np.ndarray, twos: np.ndarray) -> tuple:
    """Both shipped models' capsules, each on its own view: (one's (N, J, E) on the one-digit
    views ones (N, 28, 28), two's on the two-digit views twos (N, 36, 36)), both uint8; the
    count weighs them (count_features) and the answer reuses them."""
    return (mc.predict(one.eval_params, one.cfg, ones), mc.predict(two.eval_params, two.cfg, twos))


def count_features(logits: np.ndarray, ones: np.ndarray, twos: np.ndarray, one: Run, two: Run,
                   caps=(None, None)) -> np.ndarray:
    """(N, 4) what the count weighs: the counter's logits (N,); how badly the MNIST model one
    redraws the one-digit views ones (N, 28, 28) uint8 from its longest capsule; how badly the
    MultiMNIST model two redraws the two-digit views twos (N, 36, 36) from its longest capsule
    and from its two longest (redraw_errors). A composite squeezed into one digit's box is no
    digit the MNIST decoder can draw, and a lone digit leaves the second capsule nothing to add;
    a bold lone digit is still a digit. caps: one's capsules on ones and two's on twos, each
    None unless a caller has it."""
    return np.c_[logits, redraw_errors(one, ones, 1, caps[0]), redraw_errors(two, twos, 2, caps[1])]


def count_scores(v: Views, counter: dict = None, one: Run | None = None, two: Run | None = None,
                 caps=(None, None)) -> np.ndarray:
    """(N,) the count's score for the views v, two digits above 0: with the MNIST model one, the
    MultiMNIST model two and a counter that has count fuse's weights, count_features weighed by
    them (caps: one's capsules on v.ones and two's on v.twos, each if computed); else the
    counter's logit less its threshold."""
    counter = counter or load_counter()
    logits = counter_forward(counter_input(v.ones, v.twos), counter)[0]
    if one is None or two is None or "fuse_w" not in counter:
        return logits - counter["threshold"]
    feats = count_features(logits, v.ones, v.twos, one, two, caps)
    return feats @ counter["fuse_w"] + counter["fuse_b"][0]


def choose_model(n: int, checkpoint: str | None) -> Path:
    """Which model reads an image that holds n digits: --checkpoint, when given, reads
    everything; else one digit goes to the MNIST model and two to the MultiMNIST model (one
    digit too, while the MNIST model is missing: its longest capsule)."""
    if checkpoint:
        return Path(checkpoint)
    return MNIST_MODEL_FILE if n == 1 and MNIST_MODEL_FILE.exists() else MODEL_FILE


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
                   help="PNG, JPEG or .npy, any size, grey or colour, either polarity; an image "
                        "that already follows MNIST's convention (a digit's ink box 20 px long, "
                        "a 36x36 composite) is taken as it is, any other is normalised as MNIST "
                        "was (--verbose says how)")
    shipped = [str(Path("models", f.name)) for f in (MNIST_MODEL_FILE, MODEL_FILE)]
    p.add_argument("--checkpoint", default=None,
                   help="a model or a --save checkpoint, to read every image with (default: "
                        f"the shipped models, {shipped[0]} for one digit, {shipped[1]} for two)")
    p.add_argument("--digits", choices=("1", "2", "auto"), default="auto",
                   help="how many digits each image holds; auto: the shipped models count "
                        "them, from how well one digit and two explain the image, at any size "
                        "(default: %(default)s)")
    p.add_argument("--background", choices=("auto", "black", "white"), default="auto",
                   help="the paper's colour; auto: its edge's, where that stands out from the "
                        "median pixel, else the majority's (ink is the minority) (default: "
                        "%(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="print how each image was cropped and scaled, the count's score "
                        "(auto), and all ten capsule lengths")
    p.add_argument("--out", default=None,
                   help="an image (its suffix names the format): per input, the image as read, "
                        "the model's input, the reconstructions from the first digit's capsule "
                        "(red) and the second's (green), titled, each digit and capsule length "
                        "under it (default: none)")
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


@dataclass
class Row:
    """One image's row of the --out figure."""
    name: str                  # the file, as given
    ink: np.ndarray            # (H, W) the image as read, white on black
    img: np.ndarray | None     # (canvas, canvas) uint8 the model's input; None without ink
    found: list                # the digits named, first first
    lengths: list              # their capsule lengths
    recon: list                # their reconstructions, each (canvas * canvas,) in [0, 1]
    model: str = ""            # the model's file name
    n: int = 2                 # how many digits were looked for


def how_many(ink: np.ndarray, args, runs: dict) -> tuple[int, str, Views | None, dict]:
    """How many digits to look for in the white-on-black image ink: --digits 1|2 as given; auto
    asks the count (count_scores), which a one-digit --checkpoint needs not. -> (n, why
    in words for --verbose, both models' views of the image or None, {(model file, digits):
    its capsules (1, J, E) on that view, None where the count read none})."""
    if args.digits != "auto":
        return int(args.digits), f"--digits {args.digits}", None, {}
    if args.checkpoint and _model(runs, Path(args.checkpoint), args).cfg.n_labels == 1:
        return 1, "a one-digit model", None, {}
    if load_counter() is None:
        return 2, f"auto, without {COUNT_MODEL_FILE.name} to count with", None, {}
    v = both_views([ink])
    if not v.ink[0]:
        return 1, "no ink to count", v, {}
    one = two = None  # the count weighs their redrawings when both are there
    caps = (None, None)
    if MNIST_MODEL_FILE.exists() and MODEL_FILE.exists():
        one, two = _model(runs, MNIST_MODEL_FILE, args), _model(runs, MODEL_FILE, args)
        caps = capsules(one, two, v.ones, v.twos)                          # (1, J, E) each
    score = count_scores(v, None, one, two, caps)[0]
    read = {(MNIST_MODEL_FILE, 1): caps[0], (MODEL_FILE, 2): caps[1]}  # None: not read
    return (2 if score > 0 else 1), f"auto: the count's score {score:+.2f}, two above 0", v, read


def _predict_one(path, x: np.ndarray, args, runs: dict) -> Row:
    """Print predict's answer for the image x read from path; -> its row of the --out figure."""
    ink, inverted = ink_on_black(x, args.background)
    n, why, v, read = how_many(ink, args, runs)
    ckpt = choose_model(n, args.checkpoint)
    run = _model(runs, ckpt, args)
    cfg, params = run.cfg, run.eval_params
    if v is not None and (cfg.canvas, n) in ((28, 1), (36, 2)):  # the count's view: no second pass
        img, how = (v.ones, v.twos)[n - 1][0], v.hows[0][n - 1]
        img = img if v.ink[0] else None
    else:
        img, how = to_canvas(ink, cfg.canvas, n)
    out = read.get((ckpt, n))                 # the count read this view with this model already
    if out is None and img is not None:
        out = mc.predict(params, cfg, img[None])                      # (1, J, E) or (1, J)
    found, scores = [], None
    if img is None:
        print(f"{path}: no digit found  (no ink)")
    else:
        scores = mc.class_scores(out, cfg)[0]
        found = digits_found(scores, n)
        print(f"{path}: {answer(scores, n, mc.score_name(cfg))}")
    if args.verbose:
        print(f"  {x.shape[1]}x{x.shape[0]}{', inverted' if inverted else ''}; {how}; "
              f"model {ckpt.name}, {n} digit{'s' * (n > 1)} ({why})")
        if scores is not None:
            print("  all ten: " + "  ".join(f"{k}:{sk:.2f}" for k, sk in enumerate(scores)))
    recon = [mc.reconstruct(params, out, np.array([k]))[0] for k in found] if args.out else []
    return Row(str(path), ink, img, found, [float(scores[k]) for k in found], recon, ckpt.name, n)


FIGURE_CELL = 1.45   # inches a cell of the --out figure takes, at 100 dpi
COLUMNS = ("as read (ink white)", "model input", "first digit (red)", "second digit (green)")


def _tinted(recon: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """A reconstruction (canvas * canvas,) in [0, 1] as an (s, s, 3) image in colour rgb."""
    s = int(round(math.sqrt(recon.size)))
    return recon.reshape(s, s)[..., None] * rgb


def _missing(row: Row, k: int) -> str:
    """The words under the empty reconstruction cell of digit k (0: first, 1: second)."""
    if row.img is None:
        return ""
    if k >= row.n:
        return "one digit counted"
    return f"none at {MIN_LENGTH:.2f}" if k == 0 else f"no second at {MIN_LENGTH:.2f}"


def prediction_figure(rows: list[Row]):
    """The --out figure, a matplotlib Figure drawn on Agg: one row per image, four titled
    columns: the image as read (white on black), the model's input, the reconstruction from the
    first digit's capsule (red) and from the second's (green), each digit and capsule length
    written under it, the file beside its row; a thin grey frame round every image, so that a
    black or white one still shows where it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4 * FIGURE_CELL + 0.4, len(rows) * (FIGURE_CELL + 0.25) + 0.35),
                 dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 4, squeeze=False)
    fig.subplots_adjust(left=0.4 / fig.get_figwidth(), right=0.99, wspace=0.08, hspace=0.3,
                        top=1 - 0.3 / fig.get_figheight(), bottom=0.2 / fig.get_figheight())
    for row, ax in zip(rows, axes):
        canvas = row.img.shape[0] if row.img is not None else DIGIT_SIDE
        cells = [np.repeat(row.ink[..., None], 3, 2),
                 np.repeat((row.img if row.img is not None else np.zeros((canvas,) * 2))[
                     ..., None] / 255, 3, 2)]
        cells += [_tinted(r, rgb) for r, rgb in zip(row.recon, (A_RGB, B_RGB))]
        cells += [np.zeros((canvas, canvas, 3))] * (4 - len(cells))
        words = [f"{row.ink.shape[1]}x{row.ink.shape[0]}",
                 f"{Path(row.model).stem}, {canvas}x{canvas}" if row.img is not None else "no ink"]
        words += [f"{d}, length {n:.2f}" for d, n in zip(row.found, row.lengths)]
        words += [_missing(row, k) for k in range(len(row.found), 2)]
        for a, cell, text in zip(ax, cells, words):
            a.imshow(np.clip(cell, 0, 1), interpolation="nearest")
            a.set_xticks([]), a.set_yticks([])
            for spine in a.spines.values():
                spine.set_color("#999"), spine.set_linewidth(0.8)
            a.set_xlabel(text, fontsize=8, labelpad=2)
        name = row.name if len(row.name) <= 24 else "…" + row.name[-23:]
        ax[0].set_ylabel(name, fontsize=8)
    for a, title in zip(axes[0], COLUMNS):
        a.set_title(title, fontsize=9)
    fig.canvas.draw()
    return fig


def _write_predictions(out, rows: list[Row]) -> None:
    """prediction_figure written as out's suffix says."""
    import imageio.v3 as iio
    rgb = np.asarray(prediction_figure(rows).canvas.buffer_rgba())[..., :3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = iio.imwrite("<bytes>", rgb, extension=Path(out).suffix.lower())
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
