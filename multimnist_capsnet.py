"""CapsNet with dynamic routing on MultiMNIST, in plain NumPy.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules" (NIPS 2017). The module reads top to
bottom like the paper:
  the configuration; the MultiMNIST overlay (and the MNIST task's shifted digits); im2col
  convolution; squash; u_hat and routing by agreement; the margin loss, the decoder and the
  reconstruction loss; the whole network; the Model interface the loop trains (and the threads
  that split a batch); Adam; the training loop; MNIST read from its cache; evaluation;
  checkpoints; the training CLI.

Shapes: N batch, H/W image height/width, C channels, I primary capsules, J digit capsules (10),
D primary capsule dim (8), E digit capsule dim (16), R routing iterations. Feature maps are NHWC so
every convolution is one GEMM on contiguous rows. Every backward pass is written by hand.

Everything else is a sibling module that imports this one (this one imports none of them):
mnist_fetch.py fetches MNIST into the cache this module reads, cnn_baseline.py is the paper's CNN
baseline as a second Model, capsnet_predict.py and capsnet_serve.py ask a trained model about
your own images.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import shlex
import signal
import site
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np


class CapsNetError(Exception):
    """A problem the user can fix (bad data, bad checkpoint, bad path): reported in one line."""


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    seed: int = 0                   # fixes data, initialisation, shuffling: same seed, same metrics
    task: str = "multimnist"        # 'multimnist': two overlapping digits on 36x36; 'mnist': one
                                    # 28x28 digit (the paper's Table 1 top half; TASKS sets its size);
                                    # 'expanded': one digit anywhere on 40x40 (the affNIST setup)
    model: str = "capsnet"          # a registered Model's name: 'capsnet', or 'cnn' (the paper's
                                    # baseline, which cnn_baseline.py registers and trains)
    n_epochs: int = 8               # passes over the training pool
    n_train: int = 6000             # composites in the training pool (fresh each epoch with resample)
    n_test: int = 1000              # composites from the MNIST test split used for evaluation
    batch_size: int = 32            # composites per Adam step
    lr: float = 1e-3                # Adam step size
    lr_decay: float = 1.0           # multiply lr by this every lr_decay_steps steps (1.0: constant)
    lr_decay_steps: int = 2000      # steps per decay factor (continuous, as tf exponential_decay)
    lr_schedule: str = "exp"        # 'exp': the decay above; 'cosine': lr to 0 at the last step
    lr_warmup_steps: int = 0        # lr rises linearly from 0 over this many first steps (0: none)
    ema: float = 0.0                # decay of an average of the weights, evaluated and shipped
                                    # instead of the weights themselves (0: off; try 0.999)
    conv1_channels: int = 32        # paper: 256
    primary_types: int = 8          # capsule types in PrimaryCaps; paper: 32
    primary_dim: int = 8            # D, dims of a primary capsule (paper: 8)
    digit_dim: int = 16             # E, dims of a digit capsule (paper: 16)
    kernel: int = 9                 # Conv1 and PrimaryCaps kernel size (paper: 9)
    primary_stride: int = 2         # PrimaryCaps stride (paper: 2)
    routing_iters: int = 3          # R, routing-by-agreement iterations (paper: 3)
    routing_grad: str = "frozen"    # 'frozen': final c constant in backward; 'full': exact backward
    leaky_routing: bool = False     # TF reference option: a zero logit beside the J digit logits
                                    # takes the share of a vote that fits no digit capsule
    digit_bias: bool = False        # TF reference: a bias (J, E) added to s_j before the squash
    bias_init: float = 0.0          # initial value of every CapsNet bias (TF reference: 0.1)
    init: str = "fan-in"            # 'fan-in': He / 1/sqrt(fan-in) normals; 'truncated': the TF
                                    # reference's truncated normals (std 0.05 conv1, 0.1 others)
    margin_loss: str = "paper"      # 'paper': summed over the J classes; 'tf': the TF reference's,
                                    # averaged over them and halved (the paper's / 20)
    decoder_h1: int = 256           # decoder hidden widths; paper: 512
    decoder_h2: int = 512           # paper: 1024
    cnn_conv1: int = 512            # CNN baseline widths (paper: 512, 256, 1024; the paper's small
    cnn_conv2: int = 256            # CNN it tuned up from: 32, 64, 512); kernels 9x9 and 5x5
    cnn_fc: int = 1024              # (--task mnist: TASKS sets the paper's MNIST CNN, 256, 256,
    cnn_conv3: int = 128            # 128 channels of 5x5, fully connected 328 and 192; the third
    cnn_fc2: int = 192              # conv and second fc exist on MNIST only)
    cnn_dropout: float = 0.5        # MNIST CNN: drop probability before its softmax layer
    recon_weight: float = 0.0005    # weight of the summed reconstruction losses (paper: 0.0005)
    min_iou: float = 0.8            # bounding-box IoU every pair must reach (0: the paper's shifts)
    overlay: str = "max"            # 'max' (the IoU >= 0.8 task) or 'clip-sum' (the paper's)
    resample: bool = False          # fresh composites every epoch from all training digits
    data: str = "mnist"             # 'mnist', or 'synthetic' random glyphs (smoke tests, no MNIST)
    canvas: int = 36                # side of the MultiMNIST canvas (digit side + 2 * max_shift)
    max_shift: int = 4              # digits move by integers in [-max_shift, max_shift] per axis
    dtype: str = "float32"          # float32 trains fast; float64 for gradient checks
    eval_batch: int = 8             # composites per forward pass in evaluation (small: in cache)
    workers: int = 2                # threads that split each batch, BLAS one thread each (1: off)

    @property
    def n_classes(self) -> int:
        return 10

    @property
    def n_labels(self) -> int:
        """K, the digits per image: 2 on MultiMNIST, 1 on MNIST and expanded MNIST."""
        return 2 if self.task == "multimnist" else 1

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    def grid(self) -> tuple[int, int]:
        """Side of the Conv1 output and of the PrimaryCaps grid."""
        h1 = self.canvas - self.kernel + 1
        return h1, (h1 - self.kernel) // self.primary_stride + 1

    @property
    def n_primary(self) -> int:
        """I, the number of primary capsules."""
        return self.grid()[1] ** 2 * self.primary_types


PRESETS = {
    "small": dict(conv1_channels=32, primary_types=8, decoder_h1=256, decoder_h2=512),
    "paper": dict(conv1_channels=256, primary_types=32, decoder_h1=512, decoder_h2=1024),
}
# What --task sets unless a flag says otherwise. MNIST: every training digit shifted by up to 2 px
# (the paper's only augmentation) on its own 28x28 canvas, scored on all 10,000 test digits.
# Expanded MNIST (the paper's section 5.2, trained on before testing on affNIST): the digit at any
# whole-pixel offset 0..12 per axis on 40x40, drawn afresh each epoch; the test digits placed once
# (seed cfg.seed). Its CNN is section 5.2's "traditional" one: the MNIST CNN's three 5x5
# convolutions, each with 2x2 max pooling, and dropout, at widths giving the small CapsNet's 2.6M
# parameters.
TASKS = {
    "multimnist": dict(n_train=6000, n_test=1000),
    "mnist": dict(canvas=28, max_shift=2, n_train=60000, n_test=10000, cnn_conv1=256,
                  cnn_conv2=256, cnn_conv3=128, cnn_fc=328, cnn_fc2=192),
}
TASKS["expanded"] = dict(TASKS["mnist"], canvas=40, max_shift=6, cnn_conv1=32, cnn_conv2=64,
                         cnn_conv3=128, cnn_fc=704, cnn_fc2=192)


FLAGLESS = ("canvas", "max_shift", "eval_batch")  # set by --task or by a library caller


def flag(name: str) -> str:
    """The command-line flag that sets Config field name ('n_epochs' -> '--n-epochs'), so that an
    error names what the user typed; the field's own name for the few that no flag sets."""
    return name if name in FLAGLESS else "--" + name.replace("_", "-")


POSITIVE = ("n_epochs", "n_train", "n_test", "batch_size", "lr_decay_steps", "conv1_channels",
            "primary_types", "primary_dim", "digit_dim", "kernel", "primary_stride",
            "routing_iters", "decoder_h1", "decoder_h2", "cnn_conv1", "cnn_conv2", "cnn_fc",
            "cnn_conv3", "cnn_fc2", "eval_batch", "workers")
CHOICES = dict(routing_grad=("frozen", "full"), lr_schedule=("exp", "cosine"),
               init=("fan-in", "truncated"), margin_loss=("paper", "tf"),
               overlay=("max", "clip-sum"), task=tuple(TASKS),
               data=("mnist", "synthetic"), dtype=("float32", "float64"))
UNIT = dict(min_iou="[0, 1)", ema="[0, 1)", cnn_dropout="[0, 1)")  # fields that live in [0, 1)


def validate(cfg: Config) -> None:
    """Raise CapsNetError naming the flag (flag()) of the first field that cannot work."""
    def bad(name, what):
        raise CapsNetError(f"{flag(name)} must be {what}, got {getattr(cfg, name)!r}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            bad(name, "positive")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            bad(name, " or ".join(map(repr, allowed)))
    for name in ("lr", "lr_decay"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            bad(name, "a positive finite number")
    for name, interval in UNIT.items():
        if not 0 <= getattr(cfg, name) < 1:
            bad(name, f"in {interval}")
    if not (math.isfinite(cfg.recon_weight) and cfg.recon_weight >= 0):
        bad("recon_weight", "a finite number >= 0")
    if not math.isfinite(cfg.bias_init):
        bad("bias_init", "a finite number")
    for name, low, high in (("lr_warmup_steps", 0, math.inf), ("seed", 0, math.inf),
                            ("workers", 1, 64), ("routing_iters", 1, 100)):
        if not low <= getattr(cfg, name) <= high:
            bad(name, f">= {low}" if high == math.inf else f"at most {high}")
    if cfg.batch_size > cfg.n_train:
        raise CapsNetError(f"{flag('batch_size')} ({cfg.batch_size}) is larger than "
                           f"{flag('n_train')} ({cfg.n_train})")
    if cfg.n_labels == 1 and (cfg.n_train > 60000 or cfg.n_test > 10000):
        raise CapsNetError(f"MNIST has 60000 training and 10000 test digits; got "
                           f"{flag('n_train')} {cfg.n_train}, {flag('n_test')} {cfg.n_test}")
    if cfg.grid()[1] < 1:
        raise CapsNetError(f"kernel {cfg.kernel} is too large for a {cfg.canvas}px canvas")
    n_params = sum(math.prod(shape) for shape in model_for(cfg).shapes(cfg).values())
    if n_params > 2e8 or cfg.n_train > 10_000_000 or cfg.n_test > 1_000_000:
        raise CapsNetError("configuration too large for this machine (over 2e8 weights "
                           "or 1e7 training pairs)")


# ----------------------------------------------------------------------------------------------
# MultiMNIST: two shifted digits of distinct classes on one canvas

def bounding_boxes(images: np.ndarray) -> np.ndarray:
    """Rows/cols of the nonzero pixels: (n, 4) int as (top, bottom, left, right), inclusive."""
    rows, cols = images.any(axis=2), images.any(axis=1)  # (n, 28) each
    h = images.shape[1]
    top, left = rows.argmax(1), cols.argmax(1)
    bottom, right = h - 1 - rows[:, ::-1].argmax(1), h - 1 - cols[:, ::-1].argmax(1)
    return np.stack([top, bottom, left, right], 1)


def box_area(a: np.ndarray) -> np.ndarray:
    """Pixels in inclusive boxes (n, 4) as (top, bottom, left, right)."""
    return (a[:, 1] - a[:, 0] + 1) * (a[:, 3] - a[:, 2] + 1)


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels shared by inclusive boxes a and b (n, 4)."""
    ih = np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]) + 1, 0, None)
    iw = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 2], b[:, 2]) + 1, 0, None)
    return ih * iw


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive pixel boxes (n, 4) as (top, bottom, left, right)."""
    inter = box_intersection(a, b)
    return inter / (box_area(a) + box_area(b) - inter)


def place(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, canvas: int) -> np.ndarray:
    """Each (n, h, h) uint8 digit on a (canvas, canvas) canvas at offset (m+dy, m+dx), m the margin."""
    n, h = images.shape[:2]
    m = (canvas - h) // 2
    out = np.zeros((n, canvas, canvas), np.uint8)
    rows = (m + dy)[:, None] + np.arange(h)  # (n, h)
    cols = (m + dx)[:, None] + np.arange(h)  # (n, h)
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
    return out


def make_pairs(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
               min_iou: float = 0.8, overlay: str = "max", max_shift: int = 4,
               canvas: int = 36) -> dict[str, np.ndarray]:
    """n MultiMNIST composites from one split, all arrays uint8 except where noted.

    Returns x (n, canvas, canvas) composite, a/b (n, canvas, canvas) the shifted sources,
    labels (n, 2) int64 (distinct), shifts (n, 4) int64 as (dy_a, dx_a, dy_b, dx_b), iou (n,) float.
    Pairs failing IoU >= min_iou are redrawn (digits and shifts) until all pass.
    """
    boxes = bounding_boxes(images)
    ia, ib = np.zeros(n, np.int64), np.zeros(n, np.int64)
    shifts, iou = np.zeros((n, 4), np.int64), np.full(n, -1.0)
    todo = np.arange(n)
    for _ in range(1000):
        k = len(todo)
        ia[todo], ib[todo] = rng.integers(0, len(images), k), rng.integers(0, len(images), k)
        shifts[todo] = rng.integers(-max_shift, max_shift + 1, (k, 4))
        s = shifts[todo]
        box_a = boxes[ia[todo]] + s[:, [0, 0, 1, 1]]
        box_b = boxes[ib[todo]] + s[:, [2, 2, 3, 3]]
        iou[todo] = box_iou(box_a, box_b)
        ok = (labels[ia[todo]] != labels[ib[todo]]) & (iou[todo] >= min_iou)
        todo = todo[~ok]
        if len(todo) == 0:
            break
    else:
        raise CapsNetError(f"could not draw pairs with IoU >= {min_iou}; lower --min-iou")
    a = place(images[ia], shifts[:, 0], shifts[:, 1], canvas)
    b = place(images[ib], shifts[:, 2], shifts[:, 3], canvas)
    if overlay == "max":
        x = np.maximum(a, b)
    else:  # the paper: add, clip at 1 (255 in uint8 is exact)
        x = np.minimum(a.astype(np.uint16) + b, 255).astype(np.uint8)
    return dict(x=x, a=a, b=b, labels=np.stack([labels[ia], labels[ib]], 1).astype(np.int64),
                shifts=shifts, iou=iou)


def shift_digits(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None,
                 max_shift: int = 2, canvas: int | None = None) -> dict[str, np.ndarray]:
    """MNIST as one-digit 'pairs': each (n, 28, 28) uint8 digit moved from the centre of a
    (canvas, canvas) canvas (None: 28) by integers in [-max_shift, max_shift] per axis (rng None:
    unmoved), with zero padding: the pixels pushed off the edge are lost (on 28x28, MNIST's 4 px
    empty border keeps them few; on 40x40 with max_shift 6, none). Returns x (n, canvas, canvas),
    a (the same array: the decoder's target is the input), labels (n, 1) int64."""
    n, h = images.shape[:2]
    canvas = canvas or h
    if rng is None or max_shift == 0:
        x = images if canvas == h else place(images, np.zeros(n, int), np.zeros(n, int), canvas)
    else:
        s = rng.integers(-max_shift, max_shift + 1, (n, 2))
        big = max(canvas, h + 2 * max_shift)  # every shifted digit whole, then the canvas cut out
        c = (big - canvas) // 2
        x = place(images, s[:, 0], s[:, 1], big)[:, c:c + canvas, c:c + canvas]
    return dict(x=x, a=x, labels=labels.astype(np.int64)[:, None])


SOURCES = ("a", "b")  # each image's source digits, one per label column, the decoder's targets


def batch_arrays(pairs: dict, idx: np.ndarray, dtype) -> dict[str, np.ndarray]:
    """Float batch for the model: x (N, H, W, 1), a (and b on MultiMNIST) (N, H*W) in [0, 1],
    labels (N, K)."""
    dtype = np.dtype(dtype)
    f = lambda k: pairs[k][idx].astype(dtype) * dtype.type(1 / 255)
    n = len(idx)
    sources = SOURCES[:pairs["labels"].shape[1]]
    return dict(x=f("x")[..., None], **{k: f(k).reshape(n, -1) for k in sources},
                labels=pairs["labels"][idx])


# ----------------------------------------------------------------------------------------------
# Convolution as one GEMM: im2col through strided views, col2im by scatter-add

def im2col(x, k, stride):
    """x (N, H, W, C) -> cols (N*Ho*Wo, K*K*C): every KxK window, (ky, kx, c) in a row."""
    n, h, wd, c = x.shape
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # (N, H-K+1, W-K+1, C, K, K)
    win = win[:, ::stride, ::stride][:, :ho, :wo]                            # (N, Ho, Wo, C, K, K)
    return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n * ho * wo, k * k * c)


def col2im_row(dx, dcols, i, stride):
    """Add kernel row i's column gradients dcols (N, Ho, Wo, K, C) into dx (N, H, W, C), in place.

    Windows overlap whenever stride < K, so this adds one output column x at a time: its K taps
    are K*C contiguous numbers on both sides (per tap they would be C-long pieces). Descending x
    adds each pixel's taps in ascending j, the order of a plain tap loop.
    """
    ho, wo, k = dcols.shape[1:4]
    for x in reversed(range(wo)):
        dx[:, i:i + stride * ho:stride, stride * x:stride * x + k] += dcols[:, :, x]


def conv_forward(x, w, b, stride):
    """Valid convolution, NHWC.

    x (N, H, W, C), w (K, K, C, F), b (F,) -> out (N, Ho, Wo, F), Ho = (H - K) // stride + 1.
    """
    n, h, wd, c = x.shape
    k, f = w.shape[0], w.shape[3]
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    cols = im2col(x, k, stride)                                             # (N*Ho*Wo, K*K*C)
    out = cols @ w.reshape(k * k * c, f)                                    # (N*Ho*Wo, F)
    out += b  # in place: no second output-sized array
    return out.reshape(n, ho, wo, f), (cols, x.shape, w, stride)


def conv_backward(dout, cache, need_dx=True):
    """dout (N, Ho, Wo, F) -> dx (N, H, W, C) or None, dw (K, K, C, F), db (F,)."""
    cols, (n, h, wd, c), w, stride = cache
    k, f = w.shape[0], w.shape[3]
    ho, wo = dout.shape[1:3]
    d2 = dout.reshape(-1, f)                                                # (N*Ho*Wo, F)
    dw = (cols.T @ d2).reshape(w.shape)
    db = d2.sum(0)
    if not need_dx:
        return None, dw, db
    dx = np.zeros((n, h, wd, c), dout.dtype)
    for i in range(k):  # one kernel row at a time keeps the column gradients in cache
        dcols = (d2 @ w[i].reshape(k * c, f).T).reshape(n, ho, wo, k, c)
        col2im_row(dx, dcols, i, stride)
    return dx, dw, db


def relu_forward(x):
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout, out):
    """dout, out (...) -> dx (...). A product with the mask: ~7x faster than np.where(out > 0, dout,
    0); dead units get +-0, and a NaN or inf in dout gives NaN, which the divergence guard sees."""
    return dout * (out > 0)


# ----------------------------------------------------------------------------------------------
# Squash: v = |s|^2 / (1 + |s|^2) * s / |s| = s * |s| / (1 + |s|^2), zero at s = 0

class SquashCache(NamedTuple):
    s: np.ndarray                   # the input (..., D)
    norm: np.ndarray                # |s| (..., 1)
    norm2: np.ndarray               # |s|^2 (..., 1)
    gain: np.ndarray                # g = |s| / (1 + |s|^2) (..., 1): v = g s


def squash_forward(s):
    """s (..., D) -> v (..., D), squashed along the last axis."""
    n2 = np.einsum("...d,...d->...", s, s)[..., None]  # (..., 1)
    n = np.sqrt(n2)
    g = n / (1 + n2)
    return s * g, SquashCache(s, n, n2, g)


def squash_backward(dv, cache):
    """dv (..., D) -> ds (..., D). ds = g dv + g'(n) (s.dv) s / n with g(n) = n / (1 + n^2)."""
    s, n, n2, g = cache
    gprime = (1 - n2) / (1 + n2) ** 2
    sdv = np.einsum("...d,...d->...", s, dv)[..., None]
    safe_n = np.maximum(n, np.finfo(s.dtype).tiny)  # the term vanishes like |s| at s = 0
    return g * dv + (gprime * sdv / safe_n) * s


# ----------------------------------------------------------------------------------------------
# DigitCaps: per-pair affine transform, then routing by agreement

def uhat_forward(u, w):
    """Predictions of every primary capsule for every digit capsule.

    u (N, I, D), w (I, J, E, D) -> u_hat (N, J, I, E); laid out so that routing's sums over i and e
    run over contiguous memory.
    """
    n, i_, d = u.shape
    _, j, e, _ = w.shape
    ut = u.transpose(1, 0, 2)                                      # (I, N, D)
    wt = w.reshape(i_, j * e, d).transpose(0, 2, 1)                # (I, D, J*E)
    uh = np.empty((n, j, i_, e), u.dtype)
    # The batched product comes out i-major; turned to (N, J, I, E) a block of capsules at a
    # time, whose ~1 MB of products is still in cache: a third of the time of one whole transpose
    block = max(1, (1 << 18) // (n * j * e))
    for a in range(0, i_, block):
        out = np.matmul(ut[a:a + block], wt[a:a + block])         # (B, N, J*E)
        uh[:, :, a:a + block] = out.reshape(-1, n, j, e).transpose(1, 2, 0, 3)
    return uh, (u, w)


def uhat_backward(duh, cache):
    """duh (N, J, I, E) -> du (N, I, D), dw (I, J, E, D)."""
    u, w = cache
    n, i_, d = u.shape
    g = np.ascontiguousarray(duh.transpose(2, 0, 1, 3)).reshape(i_, n, -1)  # (I, N, J*E)
    dw = np.matmul(g.transpose(0, 2, 1), u.transpose(1, 0, 2))              # (I, J*E, D)
    du = np.matmul(g, w.reshape(i_, -1, d))                                 # (I, N, D)
    return du.transpose(1, 0, 2), dw.reshape(w.shape)


def softmax(b, axis):
    z = b - b.max(axis=axis, keepdims=True)
    np.exp(z, out=z)  # in place: one temporary instead of three
    z /= z.sum(axis=axis, keepdims=True)
    return z


def coupling(b, leaky=False):
    """Coupling coefficients c (N, J, I) from logits b (N, J, I): softmax over the J digit
    capsules; leaky adds a constant zero logit to that softmax and drops its share, so c sums
    to less than 1 over J. Either way its backward is db = c (dc - sum_j c dc)."""
    if not leaky:
        return softmax(b, axis=1)
    top = np.maximum(b.max(axis=1, keepdims=True), 0)            # (N, 1, I), the leak included
    z = np.exp(b - top)
    return z / (z.sum(axis=1, keepdims=True) + np.exp(-top))


class RoutingIter(NamedTuple):
    c: np.ndarray                   # coupling coefficients (N, J, I)
    v: np.ndarray                   # digit capsules (N, J, E)
    squash: tuple                   # squash_forward's cache


class RoutingCache(NamedTuple):
    uh: np.ndarray                  # predictions u_hat (N, J, I, E)
    iters: list                     # a RoutingIter per iteration
    has_bias: bool


def routing_forward(uh, n_iters, bias=None, leaky=False):
    """Routing by agreement (Procedure 1 of the paper).

    uh (N, J, I, E), bias (J, E) or None -> v (N, J, E). Logits b (N, J, I) start at 0; each
    iteration c = coupling(b), s_j = sum_i c_ij uh_ij (+ bias_j), v_j = squash(s_j), then
    b_ij += uh_ij . v_j. The cache keeps c, v and the squash cache of every iteration.
    """
    n, j, i_, e = uh.shape
    b = np.zeros((n, j, i_), uh.dtype)
    iters = []
    for r in range(n_iters):
        if r == 0 and not leaky:  # the softmax of zero logits, 1 / J, without its five passes
            c = np.full((n, j, i_), uh.dtype.type(1) / uh.dtype.type(j))
        else:
            c = coupling(b, leaky)                               # (N, J, I)
        s = np.matmul(c[:, :, None, :], uh)[:, :, 0]             # (N, J, E)
        if bias is not None:
            s = s + bias
        v, sq = squash_forward(s)
        iters.append(RoutingIter(c, v, sq))
        if r < n_iters - 1:
            b = b + np.matmul(uh, v[..., None])[..., 0]          # (N, J, I) agreement
    return v, RoutingCache(uh, iters, bias is not None)


def routing_backward(dv, cache, full=False):
    """dv (N, J, E) -> duh (N, J, I, E), and dbias (J, E) when the forward pass had a bias.

    full=False: the final coupling coefficients c are constants, so gradient reaches uh (and the
    bias) only through the last s = sum_i c_ij uh_ij (+ bias) (a common simplification). full=True:
    exact, through every coupling and every agreement update (the official TensorFlow reference
    stops no gradient here).
    """
    uh, iters, has_bias = cache
    duh = dbias = None
    db_next = None  # gradient of the logits b_{r+1}, which iteration r's agreement feeds
    for r in reversed(range(len(iters))):
        c, v, sq = iters[r]
        if db_next is not None:  # b_{r+1} = b_r + uh . v_r
            dv = np.matmul(db_next[:, :, None, :], uh)[:, :, 0]  # (N, J, E)
            duh += db_next[..., None] * v[:, :, None, :]
        ds = squash_backward(dv, sq)                             # (N, J, E)
        if has_bias:
            dbias = ds.sum(0) if dbias is None else dbias + ds.sum(0)  # (J, E)
        if duh is None:  # stored i-major, the layout uhat_backward's matmuls read; einsum is
            # 2x faster here than the broadcast multiply, whose inner loop would be E long
            duh = np.einsum("nji,nje->inje", c, ds, order="C")  # (I, N, J, E)
            duh = duh.transpose(1, 2, 0, 3)                      # (N, J, I, E) view
        else:
            duh += c[..., None] * ds[:, :, None, :]
        if not full or r == 0:  # b_0 = 0 is a constant
            break
        dc = np.matmul(uh, ds[..., None])[..., 0]                # (N, J, I)
        db = c * (dc - (c * dc).sum(1, keepdims=True))           # the coupling's Jacobian
        db_next = db if db_next is None else db + db_next        # b_r also feeds b_{r+1} directly
    return (duh, dbias) if has_bias else duh


# ----------------------------------------------------------------------------------------------
# Losses and the decoder

def margin_forward(v, labels, scale=1.0):
    """Margin loss, summed over digit capsules, averaged over the batch, times scale.

    v (N, J, E), labels (N, K) -> loss scalar. T_k = 1 for each of the K labels:
    L_k = T_k max(0, 0.9 - |v_k|)^2 + 0.5 (1 - T_k) max(0, |v_k| - 0.1)^2. The TF reference
    averages L_k over k and halves it: scale 1 / (2 J).
    """
    n = len(v)
    t = np.zeros(v.shape[:2], v.dtype)                          # (N, J)
    t[np.arange(n)[:, None], labels] = 1
    length = np.sqrt(np.einsum("nje,nje->nj", v, v))             # (N, J)
    pos, neg = np.maximum(0, 0.9 - length), np.maximum(0, length - 0.1)
    loss = (t * pos ** 2 + 0.5 * (1 - t) * neg ** 2).sum() / n * scale
    return loss, (v, t, length, pos, neg, scale)


def margin_backward(cache):
    """-> dv (N, J, E), the gradient of the loss above (its upstream gradient is 1)."""
    v, t, length, pos, neg, scale = cache
    dlen = (-2 * t * pos + (1 - t) * neg) / len(v) * scale       # (N, J)
    safe = np.maximum(length, np.finfo(v.dtype).tiny)
    return (dlen / safe)[..., None] * v


def affine_forward(x, w, b):
    """x (M, A), w (A, B), b (B,) -> out (M, B)."""
    return x @ w + b, (x, w)


def affine_backward(dout, cache):
    """dout (M, B) -> dx (M, A), dw (A, B), db (B,)."""
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(0)


def sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))  # no overflow for large |x|


def mask_forward(v, labels):
    """Keep one digit capsule per row: v (N, J, E), labels (N, K) -> z (K*N, J*E).

    Rows [k*N, (k+1)*N) keep capsule labels[:, k] and zero the rest, so all K decoder passes run
    as one GEMM.
    """
    n, j, e = v.shape
    k = labels.shape[1]
    m = np.zeros((k * n, j), v.dtype)                           # (K*N, J) one-hot
    m[np.arange(k * n), labels.T.reshape(-1)] = 1
    z = (np.tile(v, (k, 1, 1)) * m[..., None]).reshape(k * n, j * e)
    return z, (m, v.shape, k)


def mask_backward(dz, cache):
    """dz (K*N, J*E) -> dv (N, J, E)."""
    m, (n, j, e), k = cache
    return (dz.reshape(k * n, j, e) * m[..., None]).reshape(k, n, j, e).sum(0)


def decoder_forward(z, p):
    """z (M, J*E) -> reconstruction (M, H*W): two ReLU layers, then a sigmoid."""
    h1, c1 = affine_forward(z, p["dec1_w"], p["dec1_b"])
    a1, r1 = relu_forward(h1)
    h2, c2 = affine_forward(a1, p["dec2_w"], p["dec2_b"])
    a2, r2 = relu_forward(h2)
    h3, c3 = affine_forward(a2, p["dec3_w"], p["dec3_b"])
    out = sigmoid(h3)
    return out, (c1, r1, c2, r2, c3, out)


def decoder_backward(dout, cache):
    """dout (M, H*W) -> dz (M, J*E), grads of the decoder parameters."""
    c1, r1, c2, r2, c3, out = cache
    g = {}
    dh3 = dout * out * (1 - out)
    da2, g["dec3_w"], g["dec3_b"] = affine_backward(dh3, c3)
    da1, g["dec2_w"], g["dec2_b"] = affine_backward(relu_backward(da2, r2), c2)
    dz, g["dec1_w"], g["dec1_b"] = affine_backward(relu_backward(da1, r1), c1)
    return dz, g


def recon_forward(recon, target, n):
    """Sum of squared errors per image, averaged over the n composites: recon, target (M, H*W)."""
    diff = recon - target
    return np.einsum("mp,mp->", diff, diff) / n, (diff, n)


def recon_backward(cache):
    diff, n = cache
    return diff * (2 / n)


# ----------------------------------------------------------------------------------------------
# The whole network

def truncated_normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """N(0, std^2) with every draw beyond 2 std drawn again (tf.truncated_normal_initializer)."""
    z = rng.standard_normal(shape)
    while (far := np.abs(z) > 2).any():
        z[far] = rng.standard_normal(int(far.sum()))
    return z * std


def capsnet_init_params(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """init 'fan-in': weights by fan-in (He for ReLU layers, 1/sqrt(fan_in) otherwise), routing W
    ~ N(0, 0.05^2). init 'truncated': the TF reference's truncated normals, std 0.05 for conv1 and
    0.1 for the rest, except PrimaryCaps: 0.1 / T, because the reference scales its PrimaryCaps
    votes by the 1/T coupling of its one-iteration routing over the T capsule types (folded into
    the weights here: the same function at step 0, not the same per-layer step size under Adam).
    Every bias starts at cfg.bias_init. All arrays in cfg.dtype."""
    k, c1, t, d, e, j = (cfg.kernel, cfg.conv1_channels, cfg.primary_types, cfg.primary_dim,
                         cfg.digit_dim, cfg.n_classes)
    h1, h2 = cfg.decoder_h1, cfg.decoder_h2

    def normal(shape, std, tf_std):
        if cfg.init == "truncated":
            return truncated_normal(rng, shape, tf_std)
        return rng.standard_normal(shape) * std
    bias = lambda shape: np.full(shape, cfg.bias_init)
    p = {
        "conv1_w": normal((k, k, 1, c1), math.sqrt(2 / (k * k)), 0.05),
        "conv1_b": bias(c1),
        "primary_w": normal((k, k, c1, t * d), math.sqrt(1 / (k * k * c1)), 0.1 / t),
        "primary_b": bias(t * d),
        "digit_w": normal((cfg.n_primary, j, e, d), 0.05, 0.1),
        **({"digit_b": bias((j, e))} if cfg.digit_bias else {}),
        "dec1_w": normal((j * e, h1), math.sqrt(2 / (j * e)), 0.1),
        "dec1_b": bias(h1),
        "dec2_w": normal((h1, h2), math.sqrt(2 / h1), 0.1),
        "dec2_b": bias(h2),
        "dec3_w": normal((h2, cfg.canvas ** 2), math.sqrt(1 / h2), 0.1),
        "dec3_b": bias(cfg.canvas ** 2),
    }
    return {name: a.astype(cfg.dtype) for name, a in p.items()}


class EncodeCache(NamedTuple):
    conv1: tuple
    relu: np.ndarray
    primary: tuple
    s_shape: tuple                  # PrimaryCaps' output (N, Ho, Wo, T*D)
    squash: tuple
    uhat: tuple
    routing: RoutingCache


def encode(params, x, cfg: Config):
    """x (N, H, W, 1) -> digit capsules v (N, J, E) and the caches for the backward pass."""
    h, c_conv1 = conv_forward(x, params["conv1_w"], params["conv1_b"], 1)       # (N, 28, 28, C1)
    h, c_relu = relu_forward(h)
    s, c_prim = conv_forward(h, params["primary_w"], params["primary_b"], cfg.primary_stride)
    n = len(x)
    u, c_sq = squash_forward(s.reshape(n, -1, cfg.primary_dim))                 # (N, I, D)
    uh, c_uh = uhat_forward(u, params["digit_w"])                               # (N, J, I, E)
    v, c_route = routing_forward(uh, cfg.routing_iters, params.get("digit_b"),
                                 cfg.leaky_routing)                             # (N, J, E)
    return v, EncodeCache(c_conv1, c_relu, c_prim, s.shape, c_sq, c_uh, c_route)


def encode_backward(dv, cache, cfg: Config) -> dict[str, np.ndarray]:
    """dv (N, J, E) -> gradients of the encoder parameters."""
    c_conv1, c_relu, c_prim, s_shape, c_sq, c_uh, c_route = cache
    g = {}
    duh = routing_backward(dv, c_route, full=cfg.routing_grad == "full")
    if cfg.digit_bias:
        duh, g["digit_b"] = duh
    du, g["digit_w"] = uhat_backward(duh, c_uh)
    ds = squash_backward(du, c_sq).reshape(s_shape)
    dh, g["primary_w"], g["primary_b"] = conv_backward(ds, c_prim)
    _, g["conv1_w"], g["conv1_b"] = conv_backward(relu_backward(dh, c_relu), c_conv1,
                                                   need_dx=False)
    return g


MARGIN_SCALE = dict(paper=1.0, tf=1 / 20)  # tf: averaged over the 10 classes, halved


def capsnet_loss_and_grads(params, batch, cfg: Config, grad_scale: float = 1.0):
    """One forward and backward pass of the CapsNet.

    batch: x (N, H, W, 1), a/b (N, H*W) the shifted sources (a alone on MNIST), labels (N, K).
    Returns (loss, grads keyed like params, aux) with aux holding the margin and reconstruction
    losses and the digit capsules as out (N, J, E). Every gradient is multiplied by grad_scale (a
    shard's share of its batch), which costs nothing at the loss end of the backward pass.
    """
    n = len(batch["x"])
    v, enc = encode(params, batch["x"], cfg)
    margin, c_margin = margin_forward(v, batch["labels"], MARGIN_SCALE[cfg.margin_loss])
    z, c_mask = mask_forward(v, batch["labels"])                               # (K*N, J*E)
    recon, c_dec = decoder_forward(z, params)                                  # (K*N, H*W)
    targets = np.concatenate([batch[k] for k in SOURCES[:batch["labels"].shape[1]]])  # (K*N, H*W)
    rec, c_rec = recon_forward(recon, targets, n)
    loss = margin + cfg.recon_weight * rec

    dz, grads = decoder_backward(recon_backward(c_rec) * (cfg.recon_weight * grad_scale), c_dec)
    dv = margin_backward(c_margin) * grad_scale + mask_backward(dz, c_mask)
    grads.update(encode_backward(dv, enc, cfg))
    return float(loss), grads, dict(margin=float(margin), recon=float(rec), out=v)


def capsnet_shapes(cfg: Config) -> dict[str, tuple]:
    """capsnet_init_params' shapes, without drawing a weight."""
    k, c1, t, d, e, j = (cfg.kernel, cfg.conv1_channels, cfg.primary_types, cfg.primary_dim,
                         cfg.digit_dim, cfg.n_classes)
    h1, h2, hw = cfg.decoder_h1, cfg.decoder_h2, cfg.canvas ** 2
    return {"conv1_w": (k, k, 1, c1), "conv1_b": (c1,), "primary_w": (k, k, c1, t * d),
            "primary_b": (t * d,), "digit_w": (cfg.n_primary, j, e, d),
            **({"digit_b": (j, e)} if cfg.digit_bias else {}),
            "dec1_w": (j * e, h1), "dec1_b": (h1,), "dec2_w": (h1, h2), "dec2_b": (h2,),
            "dec3_w": (h2, hw), "dec3_b": (hw,)}


def capsule_lengths(v, cfg: Config | None = None):
    """Digit capsules v (N, J, E) -> class scores |v_j| (N, J)."""
    return np.linalg.norm(v, axis=2)


# ----------------------------------------------------------------------------------------------
# A Model: what the training loop, evaluation and checkpoints need of a network. The loop knows
# nothing else of it, as CS231n's Solver; cnn_baseline.py registers a second one.

class Model(NamedTuple):
    name: str                       # the Config.model that selects it
    loss_terms: tuple               # aux keys logged every step and averaged every epoch
    init_params: Callable           # (cfg, rng) -> params, every array in cfg.dtype
    shapes: Callable                # cfg -> {name: shape}, without drawing a weight
    loss_and_grads: Callable        # (params, batch, cfg, grad_scale) -> loss, grads, aux
    forward: Callable               # (params, x (N, H, W, 1), cfg) -> outputs, as aux["out"]
    scores: Callable                # (outputs, cfg) -> class scores (N, J)
    score_name: Callable            # cfg -> what the scores are, in words
    batch_extras: Callable = None   # (cfg, step, dtype) -> arrays added to a training batch
    eval_extras: Callable = None    # (params, cfg, pairs, outputs, decode, workers) -> metrics
    add_flags: Callable = None      # parser -> the model's own flags, before the training flags


MODELS: dict[str, Model] = {}


def register(model: Model) -> Model:
    MODELS[model.name] = model
    return model


def model_for(cfg: Config) -> Model:
    """The registered Model that cfg.model names."""
    if cfg.model not in MODELS:
        where = " (cnn_baseline.py registers and trains it)" if cfg.model == "cnn" else ""
        raise CapsNetError(f"{flag('model')} must name a registered model "
                           f"({', '.join(map(repr, MODELS))}), got {cfg.model!r}{where}")
    return MODELS[cfg.model]


def init_params(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh parameters of cfg.model, all in cfg.dtype."""
    return model_for(cfg).init_params(cfg, rng)


def loss_and_grads(params, batch, cfg: Config, grad_scale: float = 1.0):
    """One forward and backward pass of cfg.model: (loss, grads keyed like params, aux)."""
    return model_for(cfg).loss_and_grads(params, batch, cfg, grad_scale)


# ----------------------------------------------------------------------------------------------
# Threads: each batch split across the cores, BLAS at one thread each

def sharded_loss_and_grads(params, batch, cfg: Config, pool=None, grad_scale: float = 1.0):
    """loss_and_grads with the batch split into one shard per worker thread.

    NumPy and BLAS release the GIL, so the shards run on separate cores; each shard's losses are
    batch means, so the shard results are averaged weighted by shard size (its gradients come
    already weighted and are summed in parallel). pool=None: one shard. Every gradient is also
    multiplied by grad_scale (this batch's share of a larger one split across processes).
    """
    n, grad_scale = len(batch["labels"]), float(grad_scale)  # a NumPy float64 would upcast
    if pool is None or n < 2:
        return loss_and_grads(params, batch, cfg, grad_scale)
    cuts = np.linspace(0, n, cfg.workers + 1).astype(int)
    shards = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    w = [len(shard["labels"]) / n for shard in shards]
    results = parallel_map(pool, lambda sw: loss_and_grads(params, *sw), [
        (shard, cfg, wi * grad_scale) for shard, wi in zip(shards, w)])
    grads = results[0][1]  # the shards' gradient arrays are ours: sum them in place

    def add_rest(piece):
        k, rows = piece
        for r in results[1:]:
            grads[k][rows] += r[1][k][rows]
    parallel_map(pool, add_rest, row_pieces(grads, cfg.workers))
    aux = {t: sum(wi * r[2][t] for wi, r in zip(w, results)) for t in model_for(cfg).loss_terms}
    aux["out"] = np.concatenate([r[2]["out"] for r in results])
    return sum(wi * r[0] for wi, r in zip(w, results)), grads, aux


def row_pieces(arrays: dict, n: int) -> list[tuple[str, slice]]:
    """Work items for n threads: every array's first axis cut into n slices, biggest arrays first."""
    return [(k, slice(i * len(a) // n, (i + 1) * len(a) // n))
            for k, a in sorted(arrays.items(), key=lambda ka: -ka[1].size) for i in range(n)]


def parallel_map(workers, fn, items) -> list:
    """[fn(x) for x in items], in the worker threads if any, under the caller's np.errstate (which
    is per thread)."""
    if workers is None:
        return [fn(x) for x in items]
    err = np.geterr()

    def call(x):
        with np.errstate(**err):
            return fn(x)
    return list(workers.map(call, items))


def blas_limiter():
    """threadpoolctl's handle on this process's BLAS libraries (OpenBLAS, MKL, BLIS), or None
    where there is none whose thread count it can set (or threadpoolctl is missing)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None


@contextlib.contextmanager
def worker_pool(n_workers: int):
    """A thread pool of n_workers with BLAS at one thread each, or None (run serially) when
    n_workers is 1 or this process's BLAS threads cannot be set (two threads each calling a
    multi-threaded BLAS is slower than one). BLAS gets its thread count back afterwards."""
    blas = blas_limiter() if n_workers > 1 else None
    if blas is None:
        yield None
        return
    with blas.limit(limits=1), concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
        yield pool


# ----------------------------------------------------------------------------------------------
# Adam

def adam_init(params):
    return dict(t=0, m={k: np.zeros_like(p) for k, p in params.items()},
                v={k: np.zeros_like(p) for k, p in params.items()})


def adam_step(params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8, workers=None):
    """In place: p -= lr * m_hat / (sqrt(v_hat) + eps), m_hat and v_hat bias-corrected.

    With workers, every array is cut in halves along its first axis, updated in parallel.
    """
    state["t"] += 1
    t = state["t"]
    step = lr / (1 - beta1 ** t)      # python floats keep float32 arrays float32 (NumPy 2)
    vscale = 1 / math.sqrt(1 - beta2 ** t)

    def update(piece):
        k, rows = piece
        p, g, m, v = params[k][rows], grads[k][rows], state["m"][k][rows], state["v"][k][rows]
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * np.square(g)
        denom = np.sqrt(v)
        denom *= vscale
        denom += eps
        np.divide(m, denom, out=denom)  # reuse the buffer: denom now holds m / denom
        denom *= step
        p -= denom
    parallel_map(workers, update, row_pieces(params, 1 if workers is None else 2))


def learning_rate(cfg: Config, step: int) -> float:
    """The step size of Adam step `step` (0-based). 'exp': lr * lr_decay ** (step /
    lr_decay_steps), the paper's exponential decay; 'cosine': lr (1 + cos(pi step / S)) / 2 over
    the run's S = n_epochs * steps-per-epoch steps. Either way times min(1, (step + 1) / W) for
    a warm-up of W = lr_warmup_steps steps."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    if cfg.lr_schedule == "cosine":
        total = cfg.n_epochs * (cfg.n_train // cfg.batch_size)
        return warm * cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    try:
        return warm * cfg.lr * cfg.lr_decay ** (step / cfg.lr_decay_steps)
    except OverflowError:  # a decay factor > 1 grew it past 1e308: check_finite reports it
        return math.inf


# ----------------------------------------------------------------------------------------------
# Training

class Diverged(CapsNetError):
    """A non-finite loss or gradient."""


@dataclass
class Run:
    """Everything a checkpoint holds: resuming from it continues the run bit for bit."""
    cfg: Config
    params: dict
    adam: dict
    rng_state: dict                 # the training generator at the start of epoch `epoch`
    step: int = 0                   # Adam steps taken
    epoch: int = 0                  # epochs completed
    history: dict = None            # per-step loss terms (Model.loss_terms), per-epoch metrics
    ema: dict = None                # with cfg.ema: the running average of params, zero-started

    def __post_init__(self):
        if self.history is None:
            self.history = {**{t: [] for t in model_for(self.cfg).loss_terms}, "epochs": []}

    @property
    def eval_params(self) -> dict:
        """The weights to evaluate, predict with and ship: with cfg.ema the average of the
        weights after every step so far, weighted by ema ** age (the zero start divided out, as
        Adam's moments), else the weights themselves."""
        if self.ema is None or self.step == 0:
            return self.params
        debias = 1 / (1 - self.cfg.ema ** self.step)
        return {k: a * a.dtype.type(debias) for k, a in self.ema.items()}

    def steps_per_epoch(self) -> int:
        return self.cfg.n_train // self.cfg.batch_size  # the last partial batch is dropped


def new_run(cfg: Config) -> Run:
    """Fresh parameters; the data, the initialisation and the shuffling each get their own stream
    spawned from one generator seeded with cfg.seed."""
    _, init_rng, train_rng = np.random.default_rng(cfg.seed).spawn(3)
    params = init_params(cfg, init_rng)
    ema = {k: np.zeros_like(p) for k, p in params.items()} if cfg.ema else None
    return Run(cfg, params, adam_init(params), train_rng.bit_generator.state, ema=ema)


def ema_step(run: Run) -> None:
    """In place: ema = d ema + (1 - d) params, after each Adam step."""
    d = run.cfg.ema
    for k, a in run.ema.items():
        a *= d
        a += (1 - d) * run.params[k]


def make_data(cfg: Config, mnist: dict) -> tuple[dict | None, dict]:
    """(training pool or None when resampling, test pairs), both determined by cfg.seed. MNIST:
    no pool (every epoch shifts the digits afresh) and the first n_test test digits, unshifted;
    expanded MNIST: the same, the test digits placed at random once (seed cfg.seed)."""
    data_rng = np.random.default_rng(cfg.seed).spawn(3)[0]
    if cfg.n_labels == 1:
        if cfg.n_train > len(mnist["train_x"]):
            raise CapsNetError(f"{flag('n_train')} {cfg.n_train}: there are only "
                               f"{len(mnist['train_x'])} training digits")
        if cfg.n_test > len(mnist["test_x"]):
            raise CapsNetError(f"{flag('n_test')} {cfg.n_test}: there are only "
                               f"{len(mnist['test_x'])} test digits")
        return None, shift_digits(mnist["test_x"][:cfg.n_test], mnist["test_y"][:cfg.n_test],
                                  None if cfg.task == "mnist" else data_rng, cfg.max_shift,
                                  cfg.canvas)
    kw = dict(min_iou=cfg.min_iou, overlay=cfg.overlay, max_shift=cfg.max_shift, canvas=cfg.canvas)
    test = make_pairs(mnist["test_x"], mnist["test_y"], cfg.n_test, data_rng, **kw)
    pool = None if cfg.resample else make_pairs(mnist["train_x"], mnist["train_y"], cfg.n_train,
                                                data_rng, **kw)
    return pool, test


def check_finite(run: Run, loss: float, aux: dict, grads: dict, lr: float) -> None:
    # |g|^2 is one BLAS pass and no mask array; any NaN or inf in g makes it non-finite, and so
    # does a norm beyond the float range (~1e19 in float32), which is divergence too
    bad = [k for k, g in grads.items() if not math.isfinite(np.vdot(g, g))]
    if math.isfinite(loss) and not bad and math.isfinite(lr):
        return
    terms = ", ".join(f"{t} {aux[t]}" for t in model_for(run.cfg).loss_terms)
    what = (f"loss is {loss} ({terms})"
            if not math.isfinite(loss) else f"gradient norm of {', '.join(bad)} is not finite "
            "(NaN, inf, or beyond float range)" if bad else "the learning rate overflowed")
    raise Diverged(f"training diverged at step {run.step + 1}: {what}; lr was {lr:g}, "
                   f"try a lower --lr")


def keep_freed_memory() -> None:
    """Ask glibc to keep freed big arrays for reuse instead of returning them to the OS.

    A step allocates ~150 MB of short-lived arrays. By default glibc maps each big one fresh and
    unmaps it on free, so every step page-faults all of it back in: a third of the step time on
    the 2-core machines this was measured on. So no array gets a fresh mapping (the mmap threshold
    alone is capped at 32 MB, which batch 64, float64 or a bigger network pass per worker), and
    all threads share the main heap (a worker thread's own arena is a mapped heap that glibc
    grows and shrinks by itself).

    The settings are process-wide and stay after train() returns: a library caller's process then
    keeps up to 1 GB of freed heap, serves every thread from one arena (one malloc lock), and
    hands freed memory back to the OS only from the top of the heap. No effect off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: fixed at glibc's cap, not adaptive
        libc.mallopt(-4, 0)         # M_MMAP_MAX: no fresh mapping for any array, however big
        libc.mallopt(-8, 1)         # M_ARENA_MAX: worker threads allocate from the main heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    except (OSError, AttributeError, TypeError):
        pass


def train(run: Run, mnist: dict, pool: dict | None, test: dict, *, on_step=None, on_epoch=None,
          should_stop=lambda: False, progress: bool = True, step_fn=None) -> bool:
    """Train run in place up to cfg.n_epochs; False if should_stop() ended it early.

    on_step(run, aux) runs after every Adam step, on_epoch(run) after each epoch's evaluation.
    step_fn(params, batch, cfg, workers) -> (loss, grads, aux) replaces sharded_loss_and_grads,
    e.g. to take a slice of every batch and sum the gradients over processes (mpi_train.py).
    The epoch's pool (when resampling) and its permutation come from the generator state saved at
    the epoch's start, so a run resumed mid-epoch replays the very same batches.
    """
    cfg, spe = run.cfg, run.steps_per_epoch()
    keep_freed_memory()
    bar = _progress(progress, cfg.n_epochs * spe, run.step)
    try:
        with worker_pool(cfg.workers) as workers:
            while run.epoch < cfg.n_epochs:
                if not _train_epoch(run, mnist, pool, test, workers, bar, on_step, should_stop,
                                    step_fn or sharded_loss_and_grads):
                    return False
                if on_epoch is not None:
                    on_epoch(run)
        return True
    finally:
        if bar is not None:
            bar.close()


def _train_epoch(run: Run, mnist, pool, test, workers, bar, on_step, should_stop, step_fn) -> bool:
    """The rest of the current epoch, then its evaluation; False if should_stop() cut it short."""
    cfg, dtype, spe = run.cfg, run.cfg.np_dtype, run.steps_per_epoch()
    model = model_for(cfg)
    rng = np.random.default_rng()
    rng.bit_generator.state = run.rng_state
    data = pool
    if cfg.n_labels == 1:
        data = shift_digits(mnist["train_x"][:cfg.n_train], mnist["train_y"][:cfg.n_train], rng,
                            cfg.max_shift, cfg.canvas)
    elif cfg.resample:
        data = make_pairs(mnist["train_x"], mnist["train_y"], cfg.n_train, rng,
                          min_iou=cfg.min_iou, overlay=cfg.overlay, max_shift=cfg.max_shift,
                          canvas=cfg.canvas)
    perm = rng.permutation(cfg.n_train)
    t0 = time.perf_counter()
    for s in range(run.step - run.epoch * spe, spe):
        batch = batch_arrays(data, perm[s * cfg.batch_size:(s + 1) * cfg.batch_size], dtype)
        if model.batch_extras is not None:  # e.g. the MNIST CNN's dropout mask
            batch.update(model.batch_extras(cfg, run.step, dtype))
        loss, grads, aux = step_fn(run.params, batch, cfg, workers)
        lr = learning_rate(cfg, run.step)
        check_finite(run, loss, aux, grads, lr)
        adam_step(run.params, grads, run.adam, lr, workers=workers)
        if run.ema is not None:
            ema_step(run)
        run.step += 1
        for t in model.loss_terms:
            run.history[t].append(aux[t])
        if bar is not None:
            bar.update(1)
            bar.set_postfix({t: f"{aux[t]:.3f}" for t in model.loss_terms})
        if on_step is not None:
            on_step(run, aux)
        if should_stop():
            return False
    run.epoch += 1
    run.rng_state = rng.bit_generator.state
    metrics = evaluate(run.eval_params, cfg, test, workers)
    recent = slice(run.step - spe, run.step)
    metrics.update(epoch=run.epoch, step=run.step,
                   **{f"train_{t}": float(np.mean(run.history[t][recent]))
                      for t in model.loss_terms},
                   seconds=round(time.perf_counter() - t0, 3))
    run.history["epochs"].append(metrics)
    _log(bar, epoch_line(metrics, cfg))
    return True


def _progress(enabled: bool, total: int, initial: int):
    """A tqdm bar on a terminal; None when disabled or when stderr is a file or pipe, where its
    redraws would fill the log with carriage returns (the epoch lines are printed either way)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", leave=False, dynamic_ncols=True)


def _log(bar, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def epoch_line(m: dict, cfg: Config) -> str:
    terms = "  ".join(f"{t} {m['train_' + t]:{'.2f' if t == 'recon' else '.4f'}}"
                      for t in model_for(cfg).loss_terms)
    recon = (f"  recon mse {m['recon_mse']:.4f} (mean-image {m['baseline_mse']:.4f})"
             if "recon_mse" in m else "")
    return (f"epoch {m['epoch']}/{cfg.n_epochs}  train {terms}  |  test {score_str(m)}{recon}  "
            f"{m['seconds']:.1f}s")


def score_str(m: dict) -> str:
    """The headline test scores of an evaluate() result, in words."""
    if "test_error" in m:
        return f"error {100 * m['test_error']:.2f}% ({m['n_errors']} digits wrong)"
    return f"set acc {m['set_acc']:.3f}  soft {m['soft_acc']:.3f}  top1 {m['top1']:.3f}"


# ----------------------------------------------------------------------------------------------
# MNIST, read from the verified cache that mnist_fetch.py fills

MNIST_FILES = {  # name -> md5 of the decompressed IDX bytes
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def mnist_dir(flag: str | None = None) -> Path:
    """--data-dir wins over $HINTON_MNIST_DIR, which wins over ~/.cache/hinton-mnist."""
    path = flag or os.environ.get("HINTON_MNIST_DIR") or "~/.cache/hinton-mnist"
    return Path(path).expanduser()


def parse_idx(raw: bytes, kind: str) -> np.ndarray:
    """Parse decompressed IDX bytes: kind 'images' -> uint8 (n, 28, 28), 'labels' -> uint8 (n,)."""
    magic, ndim = (2051, 3) if kind == "images" else (2049, 1)
    if len(raw) < 4 + 4 * ndim:
        raise CapsNetError(f"IDX {kind} file is truncated ({len(raw)} bytes)")
    header = np.frombuffer(raw, ">u4", count=1 + ndim)
    if header[0] != magic:
        raise CapsNetError(f"IDX {kind} file has magic {header[0]}, expected {magic}")
    shape = tuple(int(d) for d in header[1:])
    if kind == "images" and shape[1:] != (28, 28):
        raise CapsNetError(f"IDX images are {shape[1]}x{shape[2]}, expected 28x28")
    if len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise CapsNetError(f"IDX {kind} file has {len(raw)} bytes, header implies "
                           f"{4 + 4 * ndim + math.prod(shape)}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def cached_idx(path: Path) -> bytes | None:
    """Decompressed bytes of a cached file if its md5 matches, else None (with a note why)."""
    if not path.exists():
        return None
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        print(f"mnist: cached {path.name} is unreadable ({e})", file=sys.stderr)
        return None
    if hashlib.md5(raw).hexdigest() != MNIST_FILES[path.name]:
        print(f"mnist: cached {path.name} fails its md5 check", file=sys.stderr)
        return None
    return raw


def read_mnist(data_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """MNIST from the cache (mnist_dir) as uint8 arrays: train_x (60000, 28, 28), train_y
    (60000,), test_x, test_y. A missing or damaged file is an error that names the command
    which fetches it: this module never downloads."""
    cache = mnist_dir(data_dir)
    if cache.exists() and not cache.is_dir():
        raise CapsNetError(f"the MNIST cache {cache} is a file, not a directory")
    raws = {name: cached_idx(cache / name) for name in MNIST_FILES}
    if missing := [name for name, raw in raws.items() if raw is None]:
        again = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir else ""
        raise CapsNetError(f"MNIST is not in {cache} ({len(missing)} of its 4 files missing or "
                           f"damaged); fetch it once with: python3 -m mnist_fetch{again}")
    return dict(train_x=parse_idx(raws["train-images-idx3-ubyte.gz"], "images"),
                train_y=parse_idx(raws["train-labels-idx1-ubyte.gz"], "labels"),
                test_x=parse_idx(raws["t10k-images-idx3-ubyte.gz"], "images"),
                test_y=parse_idx(raws["t10k-labels-idx1-ubyte.gz"], "labels"))


def synthetic_mnist(rng: np.random.Generator, n_train: int = 600, n_test: int = 200
                    ) -> dict[str, np.ndarray]:
    """Fake MNIST for tests and smoke runs: one jittered random-stroke glyph per class."""
    glyphs = np.zeros((10, 28, 28), np.float64)
    for k in range(10):
        for _ in range(3):  # three thick random strokes per class
            r0, c0, r1, c1 = rng.integers(6, 22, 4)
            t = np.linspace(0, 1, 40)
            rr, cc = np.round(r0 + t * (r1 - r0)).astype(int), np.round(c0 + t * (c1 - c0)).astype(int)
            for dr in (-1, 0, 1):
                glyphs[k, np.clip(rr + dr, 0, 27), cc] = 1

    def split(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = glyphs[y] * rng.uniform(0.6, 1.0, (n, 1, 1))
        return np.round(255 * x).astype(np.uint8), y
    (tx, ty), (vx, vy) = split(n_train), split(n_test)
    return dict(train_x=tx, train_y=ty, test_x=vx, test_y=vy)


# ----------------------------------------------------------------------------------------------
# Evaluation

def network_input(x_uint8: np.ndarray, dtype) -> np.ndarray:
    """uint8 images (N, H, W) -> the network's input (N, H, W, 1) in [0, 1], in dtype."""
    dtype = np.dtype(dtype)
    return x_uint8.astype(dtype)[..., None] * dtype.type(1 / 255)


def predict(params, cfg: Config, x_uint8: np.ndarray, workers=None) -> np.ndarray:
    """The network's outputs for uint8 composites (N, H, W): digit capsules v (N, J, E) of a
    CapsNet, logits (N, J) of the CNN; in batches of cfg.eval_batch (spread over the worker
    threads, if given)."""
    forward = model_for(cfg).forward

    def encode_batch(i):
        return forward(params, network_input(x_uint8[i:i + cfg.eval_batch], cfg.np_dtype), cfg)
    starts = range(0, len(x_uint8), cfg.eval_batch)
    return np.concatenate(parallel_map(workers, encode_batch, starts))


def reconstruct(params, v: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Decode capsule digits (N,) of v (N, J, E) alone, all others masked: -> (N, H*W)."""
    return decoder_forward(mask_forward(v, digits[:, None])[0], params)[0]


def class_scores(out: np.ndarray, cfg: Config | None = None) -> np.ndarray:
    """predict's outputs -> (N, J) class scores, as cfg's model reads them (cfg None: a
    CapsNet's capsule lengths)."""
    return (CAPSNET if cfg is None else model_for(cfg)).scores(out, cfg)


def score_name(cfg: Config) -> str:
    """What class_scores holds, in words."""
    return model_for(cfg).score_name(cfg)


def top2(scores: np.ndarray) -> np.ndarray:
    """scores (N, J) -> (N, 2) the classes of the two highest, highest first (ties: lower class)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :2]


def top2_hits(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scores (N, J), labels (N, 2) -> (N, 2) bool: is the k-th highest score one of the labels."""
    return (top2(scores)[:, :, None] == labels[:, None, :]).any(2)


def evaluate(params, cfg: Config, pairs: dict, workers=None) -> dict:
    """Test metrics. Two digits: set_acc, the two highest scores (capsule lengths, or the CNN's
    outputs) are the label set (chance 1/45); soft_acc: at least one of them is a label; top1:
    the highest is a label. One digit (MNIST): test_error and n_errors of the highest score, top1
    its accuracy. A CapsNet also gets recon_mse: per pixel, each source against its
    reconstruction from one capsule (the labels' on MultiMNIST; on MNIST the longest, as the
    paper decodes at test time); baseline_mse: every source predicted by the mean source; and
    routing_stats on the first ROUTING_SAMPLE images (capsnet_metrics)."""
    out = predict(params, cfg, pairs["x"], workers)
    labels = pairs["labels"]
    n, k = labels.shape
    scores = class_scores(out, cfg)                                   # (N, J)
    if k == 1:
        decode = scores.argmax(1)[:, None]                            # (N, 1)
        wrong = int((decode[:, 0] != labels[:, 0]).sum())
        metrics = dict(test_error=wrong / n, n_errors=wrong, top1=(n - wrong) / n)
    else:
        decode, hits = labels, top2_hits(scores, labels)
        metrics = dict(set_acc=float(hits.all(1).mean()), soft_acc=float(hits.any(1).mean()),
                       top1=float(hits[:, 0].mean()))
    extras = model_for(cfg).eval_extras
    if extras is not None:
        metrics.update(extras(params, cfg, pairs, out, decode, workers))
    return metrics


def capsnet_metrics(params, cfg: Config, pairs: dict, v, decode, workers=None) -> dict:
    """Reconstruction error of each source from its capsule alone (decode (N, K) the capsules),
    against the mean source's, and the routing statistics."""
    n, k = decode.shape
    targets = np.concatenate([pairs[s] for s in SOURCES[:k]]).reshape(k * n, -1) / 255
    recon = np.concatenate([reconstruct(params, v, decode[:, c]) for c in range(k)])
    return dict(recon_mse=float(((recon - targets) ** 2).mean()),
                baseline_mse=float(((targets - targets.mean(0)) ** 2).mean()),
                **routing_stats(params, cfg, pairs["x"][:ROUTING_SAMPLE], workers))


ROUTING_SAMPLE = 500  # test images whose routing is measured at every evaluation


def routing_stats(params, cfg: Config, x_uint8: np.ndarray, workers=None) -> dict:
    """The paper's Appendix A, measured on uint8 images (N, H, W): routing_db[r], the mean
    |delta b_ij| = |uh_ij . v_j| that iteration r+1's agreement adds to the logits (the last one
    computed only to be measured), and routing_entropy[r], the mean entropy in nats of a primary
    capsule's couplings over the J digit capsules in iteration r+1 (uniform: ln J = 2.303). Means
    over images, primary capsules (and digit capsules for the logits)."""
    dtype = cfg.np_dtype

    def sums(i):
        x = network_input(x_uint8[i:i + cfg.eval_batch], dtype)
        route = encode(params, x, cfg)[1].routing
        db = [np.abs(np.matmul(route.uh, it.v[..., None])).sum() for it in route.iters]
        ent = [-(it.c * np.log(np.maximum(it.c, np.finfo(dtype).tiny))).sum()
               for it in route.iters]
        return np.array([db, ent], np.float64)                         # (2, R)
    total = sum(parallel_map(workers, sums, range(0, len(x_uint8), cfg.eval_batch)))
    n, i_ = len(x_uint8), cfg.n_primary
    return dict(routing_db=[float(d) for d in total[0] / (n * cfg.n_classes * i_)],
                routing_entropy=[float(e) for e in total[1] / (n * i_)])


CAPSNET = register(Model(
    "capsnet", ("margin", "recon"), capsnet_init_params, capsnet_shapes, capsnet_loss_and_grads,
    forward=lambda params, x, cfg: encode(params, x, cfg)[0], scores=capsule_lengths,
    score_name=lambda cfg: "capsule length", eval_extras=capsnet_metrics))


# ----------------------------------------------------------------------------------------------
# Checkpoints: one .npz, no pickle, written atomically

def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside path, then rename: no reader ever sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

def installed(name: str, beside: str = __file__) -> Path:
    """A file that ships with the package: beside the module file `beside` (a source tree, pip
    install -e), else in share/multimnist-capsnet of the environment or of the user's site, where
    pip install . puts it (pyproject's data-files); the first place when none has it."""
    places = [Path(beside).resolve().parent, Path(sys.prefix) / "share" / "multimnist-capsnet",
              Path(site.USER_BASE or "~") / "share" / "multimnist-capsnet"]
    return next((p / name for p in places if (p / name).exists()), places[0] / name)


MODEL_FILE = installed("models/capsnet-multimnist.npz")  # the shipped model of the paper's task


def _savez(path, arrays: dict, meta: dict, compressed: bool = False) -> None:
    arrays = {**arrays, "meta": np.array(json.dumps(meta))}
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    try:
        atomic_write(Path(path), buf.getvalue())
    except OSError as e:
        raise CapsNetError(f"cannot write {path}: {e.strerror}") from None


def save_checkpoint(path, run: Run) -> None:
    """Everything needed to resume: parameters, Adam state, config, RNG state, history."""
    arrays = {f"param.{k}": p for k, p in run.params.items()}
    arrays.update({f"adam_m.{k}": m for k, m in run.adam["m"].items()})
    arrays.update({f"adam_v.{k}": v for k, v in run.adam["v"].items()})
    arrays.update({f"ema.{k}": a for k, a in (run.ema or {}).items()})
    meta = dict(format=1, kind="run", config=dataclasses.asdict(run.cfg), step=run.step,
                epoch=run.epoch, adam_t=run.adam["t"], rng_state=run.rng_state, history=run.history)
    _savez(path, arrays, meta)


def save_model(path, run: Run, storage: str = "float32", **info) -> None:
    """Parameters only (no Adam state, no per-step history), stored as `storage` and compressed:
    a model to predict with, not a run to resume; with cfg.ema, the averaged ones. info (metrics,
    the command) goes into meta."""
    arrays = {f"param.{k}": p.astype(storage) for k, p in run.eval_params.items()}
    meta = dict(format=1, kind="model", config=dataclasses.asdict(run.cfg), step=run.step,
                epoch=run.epoch, history=dict(epochs=run.history["epochs"]), storage=storage,
                **info)
    _savez(path, arrays, meta, compressed=True)


def load_checkpoint(path) -> Run:
    """The run saved at path, checked against its own config. A model file (save_model) loads
    with adam and rng_state None: it predicts and draws, but cannot be resumed. Parameters come
    back in the config's dtype whatever their storage."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            saved = Config(**meta["config"])
            validate(saved)
            names = [k[len("param."):] for k in z.files if k.startswith("param.")]
            params = {k: z[f"param.{k}"].astype(saved.dtype, copy=False) for k in names}
            adam = rng_state = ema = None
            if meta.get("kind", "run") == "run":
                adam = dict(t=int(meta["adam_t"]), m={k: z[f"adam_m.{k}"] for k in names},
                            v={k: z[f"adam_v.{k}"] for k in names})
                ema = {k: z[f"ema.{k}"] for k in names} if saved.ema else None
                rng_state = meta["rng_state"]
                np.random.default_rng().bit_generator.state = rng_state  # a PCG64 state, or raise
        run = Run(saved, params, adam, rng_state, meta["step"], meta["epoch"], meta["history"],
                  ema)
    except FileNotFoundError:
        raise CapsNetError(f"checkpoint {path} does not exist") from None
    except CapsNetError as e:
        raise CapsNetError(f"{path}: its saved config is invalid: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        raise CapsNetError(f"{path} is not a readable multimnist-capsnet checkpoint "
                           f"({type(e).__name__})") from None
    if {k: p.shape for k, p in params.items()} != init_shapes(saved):
        raise CapsNetError(f"{path}: parameter shapes do not match its own config")
    return run


def init_shapes(cfg: Config) -> dict[str, tuple]:
    """Parameter shapes of a configuration, without drawing a weight."""
    return model_for(cfg).shapes(cfg)


# ----------------------------------------------------------------------------------------------
# Command line

def write_metrics(path, run: Run, total_seconds: float | None = None) -> None:
    """Config, per-step and per-epoch history, final metrics; timings apart so that two runs of
    the same command differ only under "timing". The per-step losses keep 5 significant digits
    (the checkpoint keeps them whole): a 120-minute run's file stays near 1 MB."""
    epochs = [{k: v for k, v in m.items() if k != "seconds"} for m in run.history["epochs"]]
    steps = {t: [float(f"{x:.5g}") for x in run.history[t]] for t in model_for(run.cfg).loss_terms}
    doc = dict(config=dataclasses.asdict(run.cfg), step=run.step, epoch=run.epoch,
               history=dict(epochs=epochs, **steps),
               final=epochs[-1] if epochs else None,
               timing=dict(total_seconds=total_seconds,
                           epoch_seconds=[m.get("seconds") for m in run.history["epochs"]]))
    try:
        atomic_write(Path(path), compact_json(doc).encode())
    except OSError as e:
        raise CapsNetError(f"cannot write {path}: {e.strerror}") from None


def compact_json(doc: dict) -> str:
    """One top-level key per line, each value on that line without spaces: a long run's per-step
    history stays one line per loss term instead of one line per step."""
    lines = [f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in doc.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def check_writable(path: str) -> str | None:
    """Why a file could not be written at path, or None if it can (checked before any work).

    The directory is probed by creating and removing a temporary file there, as atomic_write
    will: permission bits cannot tell (root passes os.access on /proc, a read-only mount, a full
    disk), only a real write can."""
    parent = Path(path).expanduser().resolve().parent
    if Path(path).expanduser().is_dir():
        return f"{path} is a directory"
    if parent.exists() and not parent.is_dir():
        return f"{parent} is not a directory"
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{Path(path).name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot write {path}: directory {parent} is not writable ({e.strerror})"
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with each error on one line and a pointer to --help, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The training flags shared by the CLI and the figure scripts (help shows each default)."""
    d = Config()

    def opt(group, name, text, **kw):
        """A flag for Config field name: its type, choices and default from Config unless kw
        says otherwise; a switch for a bool."""
        if isinstance(getattr(d, name, None), bool):
            kw = dict(action="store_true", **kw)
        elif "default" not in kw:
            kw.update(type=type(getattr(d, name)), default=getattr(d, name),
                      choices=CHOICES.get(name))
        end = "" if "(default" in text else " (default: %(default)s)"
        group.add_argument(flag(name), help=text + end, **kw)
    g = parser.add_argument_group("training")
    opt(g, "model", "a registered model: capsnet, or cnn when run as cnn_baseline.py (default: "
        "the program's own, capsnet here)", default=None)
    opt(g, "seed", "random seed: fixes data, initialisation and shuffling")
    opt(g, "n_epochs", "epochs")
    opt(g, "n_train", "training images per epoch (default: 6000 composites; mnist: all 60000 "
        "digits)", type=int, default=None)
    opt(g, "n_test", "test images (default: 1000 composites; mnist: all 10000 digits)", type=int,
        default=None)
    opt(g, "batch_size", "composites per Adam step")
    opt(g, "lr", "Adam learning rate")
    opt(g, "lr_decay", "lr factor per --lr-decay-steps steps; paper 0.96")
    opt(g, "lr_decay_steps", "steps over which the lr shrinks by --lr-decay, applied smoothly")
    opt(g, "lr_schedule", "exp: the decay above; cosine: from --lr to 0 over --n-epochs")
    opt(g, "lr_warmup_steps", "lr rises linearly from 0 over this many first steps")
    opt(g, "ema", "decay of a moving average of the weights, which evaluation, checkpoints and "
        "model files use; 0 = off, try 0.999")
    opt(g, "recon_weight", "reconstruction loss weight")
    opt(g, "margin_loss", "paper: summed over the classes; tf: the TF reference's, averaged over "
        "them and halved, 1/20 of it")
    opt(g, "routing_grad", "frozen: final c constant in backward; full: exact")
    opt(g, "leaky_routing", "TF reference option: a zero logit beside the digit capsules' takes "
        "the votes that fit none of them (default: off)")
    opt(g, "digit_bias", "TF reference: a learned bias added to each digit capsule before its "
        "squash (default: off)")
    opt(g, "bias_init", "initial value of every CapsNet bias; TF reference 0.1")
    opt(g, "init", "fan-in: He / 1/sqrt(fan-in) normals; truncated: the TF reference's "
        "truncated normals")
    opt(g, "dtype", "float32 trains fast; float64 for gradient checks")
    opt(g, "workers", "threads that split each batch, BLAS one thread each; results depend on it "
        "slightly")
    t = parser.add_argument_group("task")
    opt(t, "task", "multimnist: two overlapping digits on 36x36; mnist: one 28x28 digit, shifted "
        "by up to 2 px in training, scored on the 10000 test digits; expanded: one digit "
        "anywhere on 40x40, test digits placed once")
    opt(t, "min_iou", "bounding-box IoU each pair must reach; 0 = paper")
    opt(t, "overlay", "merge by pixel-wise max or add-and-clip (paper)")
    opt(t, "resample", "fresh training composites every epoch (default: a fixed pool)")
    opt(t, "data", "synthetic = random glyphs, for smoke tests")
    t.add_argument("--data-dir", default=None,
                   help="MNIST cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    c = parser.add_argument_group("capacity (--preset sets the first four; each flag overrides)")
    c.add_argument("--preset", choices=tuple(PRESETS), default="small",
                   help="small: Conv1 32, 8 capsule types, decoder 256/512; paper: 256, 32, "
                        "512/1024 (default: %(default)s)")
    what = dict(conv1_channels="Conv1 channels", primary_types="PrimaryCaps capsule types",
                decoder_h1="first decoder layer width", decoder_h2="second decoder layer width")
    for name, text in what.items():
        opt(c, name, f"{text}; paper {PRESETS['paper'][name]} (default: from --preset, small "
            f"{PRESETS['small'][name]})", type=int, default=None)
    opt(c, "primary_dim", "D, dims of a primary capsule")
    opt(c, "digit_dim", "E, dims of a digit capsule")
    opt(c, "routing_iters", "routing-by-agreement iterations; paper 3")


def config_from_args(args) -> Config:
    """Config from parsed flags: preset and task first, explicit flags on top; validated."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = Config(**{**PRESETS[args.preset], **TASKS[getattr(args, "task", "multimnist")], **kw})
    validate(cfg)
    if cfg.n_epochs > 100_000:
        raise CapsNetError(f"{flag('n_epochs')} must be at most 100000, got {cfg.n_epochs}")
    return cfg


def given_fields(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The Config fields that argv sets explicitly (--preset sets its capacity fields). Changes
    parser's defaults: pass a fresh one."""
    absent = object()  # not a string, so argparse never converts it as a default
    parser.set_defaults(**dict.fromkeys([f.name for f in dataclasses.fields(Config)] + ["preset"],
                                        absent))
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not absent}
    if "preset" in given:
        given |= set(PRESETS["small"])
    return given & {f.name for f in dataclasses.fields(Config)}


# What a resumed run may change: more epochs, other threads, and the learning rate (the way on
# after a divergence). Every other field is the checkpoint's: architecture, data, objective.
RESUME_MAY_CHANGE = ("n_epochs", "workers", "lr", "lr_decay", "lr_decay_steps")


def resumed_config(path, saved: Config, flags: Config, given: set[str]) -> Config:
    """The checkpoint's config with the explicitly given flags that may change on resume
    (RESUME_MAY_CHANGE); any other explicit flag that differs from the checkpoint is an error
    naming every such field."""
    diff = [f"{flag(f)} (checkpoint {getattr(saved, f)!r}, given {getattr(flags, f)!r})"
            for f in sorted(given - set(RESUME_MAY_CHANGE)) if getattr(saved, f) != getattr(flags, f)]
    if diff:
        may = ", ".join(map(flag, RESUME_MAY_CHANGE))
        raise CapsNetError(f"checkpoint {path} does not match the flags: {'; '.join(diff)} "
                           f"(a resumed run keeps its settings; only {may} and the output flags "
                           f"may change)")
    return dataclasses.replace(saved, **{f: getattr(flags, f) for f in RESUME_MAY_CHANGE
                                         if f in given})


def resume_changes(saved: Config, cfg: Config) -> str:
    """'--lr 0.0005 (checkpoint 0.001), ...': what a resumed run changes, said out loud so that a
    changed learning rate is never a surprise; '' if nothing."""
    return ", ".join(f"{flag(f)} {getattr(cfg, f)} (checkpoint {getattr(saved, f)})"
                     for f in RESUME_MAY_CHANGE if getattr(cfg, f) != getattr(saved, f))


def load_data(args, cfg: Config) -> dict:
    """The digits cfg.data names: MNIST from args.data_dir (or the default cache), or glyphs."""
    if cfg.data == "synthetic":
        return synthetic_mnist(np.random.default_rng(cfg.seed))
    return read_mnist(getattr(args, "data_dir", None))


class StopFlag:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the step, save, exit 128 + the signal's number.
    A later Ctrl-C, REPEAT_S or more after the first signal: exit at once.

    A signal repeated sooner, and any repeated SIGTERM, is the first request arriving twice, not
    a second one: timeout signals the child and then its whole process group (the child again),
    schedulers and terminals do similar things, and a second SIGTERM asks for nothing new."""

    REPEAT_S = 1.0

    def __init__(self):
        self.signum = None
        self.at = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __call__(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGINT and now - self.at >= self.REPEAT_S:
                raise KeyboardInterrupt
            return
        self.signum, self.at = signum, now
        if signum == signal.SIGINT:
            name, then = "interrupt", "Ctrl-C again, a second from now, quits at once"
        else:
            name, then = signal.Signals(signum).name, "Ctrl-C quits at once"
        print(f"\n{name}: finishing this step, then saving ({then})", file=sys.stderr, flush=True)


def build_parser(model: Model | None = None, script: str = __file__) -> argparse.ArgumentParser:
    """The training CLI of model (default: the CapsNet), run as script."""
    model = model or CAPSNET
    p = ArgumentParser(
        prog=Path(script).name,
        description=f"Train {'a CapsNet with dynamic routing' if model is CAPSNET else model.name}"
                    " on MultiMNIST or MNIST, in plain NumPy, on the CPU. Your own images: "
                    "capsnet_predict.py --help; a page to draw on: capsnet_serve.py --help")
    if model.add_flags is not None:  # a model's own flags lead its --help
        model.add_flags(p)
    add_training_flags(p)
    p.set_defaults(model=model.name)
    o = p.add_argument_group("output")
    o.add_argument("--metrics-json", default=None,
                   help="write config, history and final metrics here (default: none)")
    o.add_argument("--save", default=None,
                   help="checkpoint .npz written after every epoch and at the end (default: none)")
    o.add_argument("--resume", default=None,
                   help="continue the run saved in this checkpoint with its own settings; "
                        "--n-epochs extends it, --workers and the --lr flags may change too "
                        "(default: none)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is drawn only when stderr is a terminal)")
    return p


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv=None, model: Model | None = None, script: str = __file__, team=None) -> int:
    """Train model (default: the CapsNet) as the command line argv asks; the exit status.

    team: one of several processes that train one model together (mpi_train.py), or None. It
    has rank (only rank 0 writes files), launcher (the words before `python3 script` that start
    the team again), step(params, batch, cfg, workers, signum) -> (loss, grads, aux) for this
    process's slice summed over the team, and signum, the stop signal the team agreed on in its
    last step (0: none), so that every process stops at the same step."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["predict"], ["serve"]):  # the commands that moved out of this module
        print(f"{Path(script).name}: {argv[0]} is now its own program: python3 "
              f"capsnet_{argv[0]}.py --help", file=sys.stderr)
        return 2
    old = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        return _main(argv, model, script, team)
    finally:
        for s, handler in old.items():  # a library caller gets its Ctrl-C back
            signal.signal(s, handler)


def shell_command(script, *words, launcher=()) -> str:
    """`python3 script words...`, quoted so that pasting it into a shell runs it."""
    script = Path(script).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    return " ".join(shlex.quote(str(w)) for w in (*launcher, "python3", script, *words))


def _main(argv, model, script, team) -> int:
    parser = build_parser(model, script)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except CapsNetError as e:
        parser.error(str(e))
    err = lambda msg: print(f"{parser.prog}: error: {msg}", file=sys.stderr)
    for flag, path in (("--metrics-json", args.metrics_json), ("--save", args.save)):
        if path is not None and (why := check_writable(path)):
            err(f"{flag}: {why}")
            return 1
    stop = StopFlag()
    writes = team is None or team.rank == 0  # one process of a team writes the files
    step_fn, should_stop = None, lambda: stop.requested
    if team is not None:
        step_fn = lambda p, b, c, w: team.step(p, b, c, w, stop.signum or 0)
        should_stop = lambda: team.signum != 0
    t0 = time.perf_counter()
    last_good = [args.resume]  # the newest checkpoint known to be on disk

    def save(r):
        save_checkpoint(args.save, r)
        last_good[0] = args.save
    try:
        if args.resume:
            run = load_checkpoint(args.resume)
            if run.adam is None:
                raise CapsNetError(f"{args.resume} holds a model's parameters only (no optimiser "
                                   "state); it can predict, not resume")
            saved = run.cfg
            given = given_fields(build_parser(model, script), argv)
            run.cfg = cfg = resumed_config(args.resume, saved, cfg, given)
            if cfg.n_epochs <= run.epoch:
                raise CapsNetError(f"{args.resume} has finished {run.epoch} of its {cfg.n_epochs} "
                                   f"epochs; give --n-epochs N > {run.epoch} to train on")
            if changes := resume_changes(saved, cfg):
                print(f"resuming {args.resume} with {changes}", file=sys.stderr)
        else:
            run = new_run(cfg)
        mnist = load_data(args, cfg)
        pool, test = make_data(cfg, mnist)
        for s in SIGNALS:
            signal.signal(s, stop)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # check_finite reports
            finished = train(run, mnist, pool, test, should_stop=should_stop, step_fn=step_fn,
                             on_epoch=save if args.save and writes else None,
                             progress=not args.quiet and writes)
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # never interrupt the final writes
        ckpt = args.save or (None if finished else "capsnet-interrupted.npz")
        if ckpt and writes:
            save_checkpoint(ckpt, run)
        if args.metrics_json and writes:
            write_metrics(args.metrics_json, run, time.perf_counter() - t0)
    except KeyboardInterrupt:
        err("interrupted twice; stopped at once (files on disk are whole: every write is atomic)"
            if stop.requested else "interrupted before training started; nothing was saved")
        return 130
    except Diverged as e:
        kept = f"; the last good checkpoint is {last_good[0]}" if last_good[0] else ""
        err(f"{e}{kept}")
        return 1
    except CapsNetError as e:
        err(str(e))
        return 1
    if not finished:
        again = ["--resume", ckpt, "--save", ckpt]
        for flag, value in (("--metrics-json", args.metrics_json), ("--data-dir", args.data_dir)):
            again += [flag, value] if value else []
        signum = stop.signum if team is None else team.signum
        how = "interrupted" if signum == signal.SIGINT else "terminated"
        again = shell_command(script, *again, *(["--quiet"] * args.quiet),
                              launcher=getattr(team, "launcher", ()))
        print(f"{how} at step {run.step}: checkpoint {ckpt}"
              + (f", metrics {args.metrics_json}" if args.metrics_json else "")
              + f"; continue with:\n  {again}", file=sys.stderr)
        return 128 + signum
    final = run.history["epochs"][-1]
    recon = (f", recon mse {final['recon_mse']:.4f} (mean-image {final['baseline_mse']:.4f})"
             if "recon_mse" in final else "")
    score = (f"test {score_str(final)}" if cfg.n_labels == 1
             else f"test set accuracy {final['set_acc']:.3f} (chance {1 / 45:.3f})")
    print(f"done in {time.perf_counter() - t0:.1f}s: {score}{recon}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
