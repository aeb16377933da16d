"""The paper's CNN baselines (MultiMNIST, section 6; MNIST, Table 1), as a second Model for the
training loop of multimnist_capsnet.py: same data, flags, metrics and checkpoints.

    python3 cnn_baseline.py [the training flags] [--cnn-conv1 ... --cnn-dropout]

'Same' convolutions (by kernel rows where that moves fewer numbers, else im2col), 2x2 max
pooling, dropout, and the sigmoid and softmax cross-entropies, each a forward/backward pair.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

import multimnist_capsnet as mc
from multimnist_capsnet import (affine_backward, affine_forward, conv_backward, conv_forward,
                                relu_backward, relu_forward, sigmoid)


# The paper's MultiMNIST baseline (section 6): conv 9x9 -> 2x2 max pool -> conv 5x5 -> 2x2 max pool ->
# fully connected -> 10 sigmoid outputs, ReLU after the three hidden layers. The paper gives no
# padding; only 'same' padding on both convolutions reproduces its 24.56M parameters on 36x36
# (36 -> 36 -> 18 -> 18 -> 9: the fully connected layer sees 9*9*256 = 20736 inputs). Valid
# padding would give 9.88M (valid/valid) or 16.18M (one of each).

CNN_KERNELS = (9, 5)          # conv1, conv2 kernel sides (paper)


def pad_forward(x, p):
    """Zero-pad the spatial dims: x (N, H, W, C) -> out (N, H+2p, W+2p, C).

    With an odd kernel K and p = K // 2, a valid convolution of out is a 'same' convolution of x.
    """
    out = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return out, p


def pad_backward(dout, cache):
    """dout (N, H+2p, W+2p, C) -> dx (N, H, W, C): the border only fed zeros, so it is dropped.

    A contiguous copy, not a view of dout, so nothing downstream can write into the caller's array.
    """
    p = cache
    h, w = dout.shape[1] - 2 * p, dout.shape[2] - 2 * p
    return np.ascontiguousarray(dout[:, p:p + h, p:p + w])


def rowconv_forward(x, w, b):
    """'Same' convolution, stride 1, by kernel rows: x (N, H, W, C), w (K, K, C, F) with K odd,
    b (F,) -> out (N, H, W, F), equal to a valid convolution of pad_forward(x, K // 2).

    im2col's columns hold K*K*C numbers per output pixel; here only the K rows of a window are
    gathered (K*C numbers per padded pixel), one GEMM makes every column tap's output at once
    (K*F numbers per padded pixel), and K shifted adds place them. That moves fewer numbers than
    im2col when F < K*C (the CNN's later layers: 2.6x fewer at 16 channels in and out); a first
    layer with F >= K*C keeps im2col (same_conv_forward).
    """
    n, h, wd, c = x.shape
    k, f = w.shape[0], w.shape[3]
    assert k % 2, "a 'same' convolution needs an odd kernel"
    xp, _ = pad_forward(x, k // 2)                                          # (N, H+K-1, Wp, C)
    wp = xp.shape[2]
    rows = np.lib.stride_tricks.sliding_window_view(xp, k, axis=1)         # (N, H, Wp, C, K)
    rows = np.ascontiguousarray(rows.transpose(0, 1, 2, 4, 3)).reshape(n * h * wp, k * c)
    taps = (rows @ w.transpose(0, 2, 1, 3).reshape(k * c, k * f)).reshape(n, h, wp, k, f)
    out = taps[:, :, :wd, 0] + b                                            # (N, H, W, F)
    for j in range(1, k):  # out[.., x, :] = sum_j taps[.., x + j, j, :]
        out += taps[:, :, j:j + wd, j]
    return out, (rows, x.shape, w)


def rowconv_backward(dout, cache, need_dx=True):
    """dout (N, H, W, F) -> dx (N, H, W, C) or None, dw (K, K, C, F), db (F,)."""
    rows, (n, h, wd, c), w = cache
    k, f = w.shape[0], w.shape[3]
    wp = wd + k - 1
    shifted = np.zeros((n, h, wp, k, f), dout.dtype)  # [.., x', j, :] = dout[.., x' - j, :]
    for j in range(k):
        shifted[:, :, j:j + wd, j] = dout
    shifted = shifted.reshape(n * h * wp, k * f)                            # (N*H*Wp, K*F)
    dw = np.ascontiguousarray((rows.T @ shifted).reshape(k, c, k, f).transpose(0, 2, 1, 3))
    db = dout.sum((0, 1, 2))                                                # dw (K, K, C, F)
    if not need_dx:
        return None, dw, db
    drows = (shifted @ w.transpose(1, 3, 0, 2).reshape(k * f, k * c)).reshape(n, h, wp, k, c)
    dxp = np.zeros((n, h + k - 1, wp, c), dout.dtype)
    for i in range(k):  # row i of every window read padded row y + i
        dxp[:, i:i + h] += drows[:, :, :, i]
    return pad_backward(dxp, k // 2), dw, db


def same_conv_forward(x, w, b):
    """'Same' convolution, stride 1: x (N, H, W, C), w (K, K, C, F), b (F,) -> (N, H, W, F),
    by kernel rows where that moves fewer numbers (F < K*C), else padding and im2col."""
    if w.shape[3] < w.shape[0] * w.shape[2]:
        out, cache = rowconv_forward(x, w, b)
        return out, (rowconv_backward, cache, None)  # no padding to strip: rowconv pads inside
    xp, p = pad_forward(x, w.shape[0] // 2)                                 # (N, H+K-1, W+K-1, C)
    out, cache = conv_forward(xp, w, b, 1)
    return out, (conv_backward, cache, p)


def same_conv_backward(dout, cache, need_dx=True):
    """dout (N, H, W, F) -> dx (N, H, W, C) or None, dw (K, K, C, F), db (F,)."""
    backward, inner, pad = cache
    dx, dw, db = backward(dout, inner, need_dx)
    if dx is not None and pad is not None:
        dx = pad_backward(dx, pad)
    return dx, dw, db


def maxpool_forward(x):
    """2x2 max pooling, stride 2: x (N, H, W, C) -> out (N, H//2, W//2, C).

    An odd last row / column is dropped (floor). The cache holds, per output, the window position
    of its max (0..3, row-major), the first one on ties, and x's shape.
    """
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    win = x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c)                 # (N, H/2, 2, W/2, 2, C)
    # (dy, dx) next to each other and C kept last, so the argmax runs over 4 strided numbers
    win = win.transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, 4, c)           # (N, H/2, W/2, 4, C)
    arg = win.argmax(axis=3)                          # first max on ties: one winner per window
    out = np.take_along_axis(win, arg[:, :, :, None], axis=3)[:, :, :, 0]  # (N, H/2, W/2, C)
    return out, (arg.astype(np.uint8), x.shape)      # uint8: 1/8 of the memory of int64


def maxpool_backward(dout, cache):
    """dout (N, H//2, W//2, C) -> dx (N, H, W, C).

    Each output's gradient goes to exactly one input, its window's first max: the true
    subgradient, which finite differences reproduce away from ties. Dropped rows get zero.
    """
    arg, (n, h, w, c) = cache
    h2, w2 = h // 2, w // 2
    hit = arg[:, :, :, None, :] == np.arange(4, dtype=np.uint8)[:, None]    # (N, H/2, W/2, 4, C)
    d4 = hit * dout[:, :, :, None, :]                # bool * dout keeps dout's dtype
    d4 = d4.reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)         # (N, H/2, 2, W/2, 2, C)
    if (h, w) == (2 * h2, 2 * w2):
        return d4.reshape(n, h, w, c)
    dx = np.zeros((n, h, w, c), dout.dtype)
    dx[:, :2 * h2, :2 * w2] = d4.reshape(n, 2 * h2, 2 * w2, c)
    return dx


# Sigmoid cross-entropy on the 10 outputs, two positive classes per composite

def sigmoid_xent_forward(logits, labels):
    """Binary cross-entropy per class, summed over classes, averaged over the batch.

    logits z (N, 10), labels (N, 2) int, two distinct digits -> loss scalar. Targets t (N, 10)
    are 1 at both labels, 0 elsewhere. Per entry -t log s(z) - (1-t) log(1 - s(z)), written as
    max(z, 0) - z t + log1p(exp(-|z|)): exp never overflows and log never sees 0.
    """
    n = len(logits)
    t = np.zeros(logits.shape, logits.dtype)                    # (N, 10)
    t[np.arange(n)[:, None], labels] = 1
    per = np.maximum(logits, 0) - logits * t + np.log1p(np.exp(-np.abs(logits)))
    return per.sum() / n, (logits, t)


def sigmoid_xent_backward(cache):
    """-> dlogits (N, 10) = (sigmoid(z) - t) / N, the gradient of the loss above (upstream 1)."""
    logits, t = cache
    return (sigmoid(logits) - t) * (1.0 / len(logits))


# Softmax cross-entropy and dropout: the MNIST baseline's output layer (one class per digit)

def softmax_xent_forward(logits, labels):
    """logits z (N, J), labels (N, 1) int -> the batch mean of -log softmax(z)[label]; the max
    is subtracted first, so exp never overflows."""
    z = logits - logits.max(axis=1, keepdims=True)                      # (N, J)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))             # (N, J) log-probabilities
    rows = np.arange(len(z))
    return -logp[rows, labels[:, 0]].mean(), (logp, labels)


def softmax_xent_backward(cache):
    """-> dlogits (N, J) = (softmax(z) - onehot(label)) / N, the gradient of the loss above."""
    logp, labels = cache
    d = np.exp(logp)
    d[np.arange(len(d)), labels[:, 0]] -= 1
    return d * (1.0 / len(d))


def dropout_mask(rng: np.random.Generator, shape, p: float, dtype) -> np.ndarray:
    """Inverted dropout's mask: 0 with probability p, else 1 / (1 - p), so the layer's expected
    output is its input and evaluation needs no rescaling."""
    return ((rng.random(shape) >= p) / (1 - p)).astype(dtype)


def dropout_forward(x, keep):
    """x (N, F), keep (N, F) a dropout_mask -> x * keep. The mask comes from the caller, drawn
    from its generator, so a run is reproducible however its batch is sharded."""
    return x * keep, keep


def dropout_backward(dout, keep):
    """dout (N, F) -> dx (N, F)."""
    return dout * keep


# The whole baseline: 'same' convolutions (each with a 2x2 max pool on MultiMNIST), ReLUs, fully
# connected ReLU layers, (dropout,) the output layer. The MNIST CNN of the paper (three 5x5
# convolutions of 256, 256, 128 channels, stride 1, fully connected 328 and 192) has its 35.4M
# parameters only without pooling and with 'same' padding: 28*28*128 = 100,352 inputs to the first
# fully connected layer (valid padding would give 16*16*128 = 32,768 and 13.3M).

@dataclass(frozen=True)
class CnnArch:
    kernels: tuple[int, ...]        # side of each convolution's kernel
    channels: tuple[int, ...]       # its output channels
    fcs: tuple[int, ...]            # hidden fully connected widths
    pool: bool                      # a 2x2 max pool after every convolution
    canvas: int                     # input side

    def flat(self) -> int:
        """Inputs of the first fully connected layer."""
        side = self.canvas
        for _ in self.kernels:
            side = side // 2 if self.pool else side
        return side * side * self.channels[-1]

    def shapes(self) -> dict[str, tuple]:
        """Every parameter's shape, keyed as cnn_init_params names them."""
        ins, shapes = (1, *self.channels), {}
        for i, (k, c) in enumerate(zip(self.kernels, self.channels), 1):
            shapes[f"cnn_conv{i}_w"], shapes[f"cnn_conv{i}_b"] = (k, k, ins[i - 1], c), (c,)
        widths = (self.flat(), *self.fcs, 10)
        for name, a, b in zip(FC_NAMES[:len(self.fcs)] + ("cnn_out",), widths, widths[1:]):
            shapes[f"{name}_w"], shapes[f"{name}_b"] = (a, b), (b,)
        return shapes


FC_NAMES = ("cnn_fc", "cnn_fc2")


def cnn_init_params(arch: CnnArch, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
    """He init N(0, 2/fan_in) for the layers before a ReLU, N(0, 1/fan_in) for the output
    layer, zero biases. All arrays in dtype."""
    p = {}
    for name, shape in arch.shapes().items():
        if name.endswith("_b"):
            p[name] = np.zeros(shape)
        else:
            gain = 1 if name == "cnn_out_w" else 2
            p[name] = rng.standard_normal(shape) * math.sqrt(gain / math.prod(shape[:-1]))
    return {name: a.astype(dtype) for name, a in p.items()}


def cnn_param_count(arch: CnnArch) -> int:
    """Number of trainable numbers: 24,563,978 for the paper's MultiMNIST widths on 36x36,
    35,445,522 for its MNIST CNN on 28x28."""
    return sum(math.prod(shape) for shape in arch.shapes().values())


def cnn_forward(params, x, pool=True, keep=None):
    """x (N, H, W, 1) -> logits (N, 10) and the cache for cnn_backward. The layers are those
    params holds (cnn_conv1.., cnn_fc, cnn_fc2, cnn_out); pool: a 2x2 max pool after each
    convolution; keep: a dropout mask (N, F) on the last hidden layer (None: no dropout).

    Pooling comes before the ReLU: max pooling and ReLU commute (both monotone), so the function
    is the paper's, the ReLU touches 4x fewer numbers, and pooling never sees the ties that a ReLU's
    zeros would make.
    """
    h, convs = x, []
    for i in range(1, 1 + sum(k.startswith("cnn_conv") for k in params) // 2):
        w, b = params[f"cnn_conv{i}_w"], params[f"cnn_conv{i}_b"]
        h, c_conv = same_conv_forward(h, w, b)                              # (N, H, W, F)
        h, c_pool = maxpool_forward(h) if pool else (h, None)              # (N, H/2, W/2, F)
        h, c_relu = relu_forward(h)
        convs.append((c_conv, c_pool, c_relu))
    h_shape = h.shape
    h, fcs = h.reshape(len(x), -1), []                                      # (N, flat)
    for name in (f for f in FC_NAMES if f + "_w" in params):
        h, c_fc = affine_forward(h, params[name + "_w"], params[name + "_b"])  # (N, F)
        h, c_relu = relu_forward(h)
        fcs.append((name, c_fc, c_relu))
    if keep is not None:
        h, _ = dropout_forward(h, keep)
    logits, c_out = affine_forward(h, params["cnn_out_w"], params["cnn_out_b"])  # (N, 10)
    return logits, (convs, h_shape, fcs, keep, c_out)


def cnn_backward(dlogits, cache):
    """dlogits (N, 10) -> gradients of every cnn_ parameter, keyed like the params."""
    convs, h_shape, fcs, keep, c_out = cache
    g = {}
    dh, g["cnn_out_w"], g["cnn_out_b"] = affine_backward(dlogits, c_out)     # (N, F)
    if keep is not None:
        dh = dropout_backward(dh, keep)
    for name, c_fc, c_relu in reversed(fcs):
        dh, g[name + "_w"], g[name + "_b"] = affine_backward(relu_backward(dh, c_relu), c_fc)
    dh = dh.reshape(h_shape)                                                # (N, H', W', C)
    for i in range(len(convs), 0, -1):
        c_conv, c_pool, c_relu = convs[i - 1]
        dh = relu_backward(dh, c_relu)
        if c_pool is not None:
            dh = maxpool_backward(dh, c_pool)                               # (N, 2H', 2W', C)
        # the input needs no gradient: skip conv1's col2im, the most expensive part of its backward
        dh, g[f"cnn_conv{i}_w"], g[f"cnn_conv{i}_b"] = same_conv_backward(dh, c_conv, i > 1)
    return g


def cnn_arch(cfg: mc.Config) -> CnnArch:
    """The CNN baseline of cfg.task: MultiMNIST's 9x9 and 5x5 convolutions with pooling and
    sigmoid outputs, or MNIST's three 5x5 convolutions and softmax (pooled on expanded MNIST)."""
    if cfg.n_labels == 1:
        return CnnArch((5, 5, 5), (cfg.cnn_conv1, cfg.cnn_conv2, cfg.cnn_conv3),
                       (cfg.cnn_fc, cfg.cnn_fc2), cfg.task == "expanded", cfg.canvas)
    return CnnArch(CNN_KERNELS, (cfg.cnn_conv1, cfg.cnn_conv2), (cfg.cnn_fc,), True, cfg.canvas)


def cnn_loss_and_grads(params, batch, cfg: mc.Config, grad_scale: float = 1.0):
    """The CNN's forward and backward pass: batch as for the CapsNet (only x, labels and, when
    training the MNIST CNN, the dropout mask keep are used). aux holds the cross-entropy
    (sigmoid on MultiMNIST, softmax on MNIST) and the logits (N, 10)."""
    logits, cache = cnn_forward(params, batch["x"], cnn_arch(cfg).pool, batch.get("keep"))
    xent = softmax_xent if cfg.n_labels == 1 else sigmoid_xent
    loss, c_loss = xent[0](logits, batch["labels"])
    grads = cnn_backward(xent[1](c_loss) * grad_scale, cache)
    return float(loss), grads, dict(xent=float(loss), out=logits)


sigmoid_xent = (sigmoid_xent_forward, sigmoid_xent_backward)
softmax_xent = (softmax_xent_forward, softmax_xent_backward)


def uses_dropout(cfg: mc.Config) -> bool:
    """Only the MNIST CNN has dropout (before its softmax layer)."""
    return cfg.n_labels == 1 and cfg.cnn_dropout > 0


def dropout_batch(cfg: mc.Config, step: int, dtype) -> dict:
    """A training batch's dropout mask: a generator per step, so that a run resumed mid-epoch
    draws the same masks."""
    if not uses_dropout(cfg):
        return {}
    return dict(keep=dropout_mask(np.random.default_rng((cfg.seed, step)),
                                  (cfg.batch_size, cfg.cnn_fc2), cfg.cnn_dropout, dtype))


def cnn_scores(logits, cfg: mc.Config):
    """Logits (N, J) -> the scores the loss reads: a softmax on MNIST, sigmoids on MultiMNIST."""
    return mc.softmax(logits, axis=1) if cfg.n_labels == 1 else mc.sigmoid(logits)


def add_cnn_flags(parser) -> None:
    d = mc.Config()
    b = parser.add_argument_group("CNN baseline capacity (multimnist: kernels 9x9 and 5x5, each "
                                  "with 2x2 max pooling; mnist: three 5x5; expanded: three 5x5, "
                                  "each pooled)")
    cnn = dict(cnn_conv1=("first conv layer's channels", "the small CNN 32"),
               cnn_conv2=("second conv layer's channels", "the small CNN 64"),
               cnn_fc=("fully connected units", "the small CNN 512"),
               cnn_conv3=("third conv layer's channels (mnist, expanded)", None),
               cnn_fc2=("second fully connected layer's units (mnist, expanded)", None))
    for name, (text, small) in cnn.items():
        mm = mc.TASKS["mnist"][name]
        dflt = ((f"multimnist {getattr(d, name)}, " if small else "") + f"mnist {mm}, "
                f"expanded {mc.TASKS['expanded'][name]}")
        b.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{text}{'; ' + small if small else ''} (default: {dflt})")
    b.add_argument("--cnn-dropout", type=float, default=d.cnn_dropout,
                   help="mnist CNN: drop probability before the softmax layer "
                        "(default: %(default)s)")


CNN = mc.register(mc.Model(
    "cnn", ("xent",),
    init_params=lambda cfg, rng: cnn_init_params(cnn_arch(cfg), rng, cfg.dtype),
    shapes=lambda cfg: cnn_arch(cfg).shapes(), loss_and_grads=cnn_loss_and_grads,
    forward=lambda params, x, cfg: cnn_forward(params, x, cnn_arch(cfg).pool)[0],
    scores=cnn_scores,
    score_name=lambda cfg: "softmax probability" if cfg.n_labels == 1 else "sigmoid output",
    batch_extras=dropout_batch, add_flags=add_cnn_flags))


if __name__ == "__main__":
    sys.exit(mc.main(model=CNN, script=__file__))
