"""multimnist_capsnet.py: the MultiMNIST overlay and the MNIST task, every layer pair against
finite differences, the whole network, Adam, the training loop, evaluation, checkpoints and the
training CLI (in process, and as a subprocess for its bad-input matrix)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import capsnet_predict as cp
import cnn_baseline as cb
import multimnist_capsnet as mc
from gradcheck import check, parameter_errors, rel_error
from multimnist_capsnet import CapsNetError


@pytest.mark.parametrize("fail_at", ["write", "replace"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_atomic_write_interrupted_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail_at, exc):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"old contents")
    if fail_at == "replace":
        def replace(*a, **k):
            raise exc("interrupted")
        monkeypatch.setattr(mc.os, "replace", replace)
    else:
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, fd, mode):
                self.f = real_fdopen(fd, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise exc("interrupted")
        monkeypatch.setattr(mc.os, "fdopen", HalfWriter)
    with pytest.raises(exc):
        mc.atomic_write(path, b"new contents, much longer than the old ones" * 100)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["train-images-idx3-ubyte.gz"]


def test_atomic_write_replaces_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(b"old")
    mc.atomic_write(path, b"new")
    mc.atomic_write(tmp_path / "g.gz", b"fresh")
    assert path.read_bytes() == b"new" and (tmp_path / "g.gz").read_bytes() == b"fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.gz", "g.gz"]


def test_mnist_dir_flag_beats_env_beats_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HINTON_MNIST_DIR", raising=False)
    assert mc.mnist_dir() == tmp_path / "home" / ".cache" / "hinton-mnist"
    assert mc.mnist_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.setenv("HINTON_MNIST_DIR", str(tmp_path / "env"))
    assert mc.mnist_dir() == tmp_path / "env"
    assert mc.mnist_dir(None) == tmp_path / "env"
    assert mc.mnist_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert mc.mnist_dir("~/x") == tmp_path / "home" / "x"


# ----------------------------------------------------------------------------------------------
# MultiMNIST pairs

@pytest.fixture(scope="module")
def digits():
    m = mc.synthetic_mnist(np.random.default_rng(0), n_train=200, n_test=10)
    return m["train_x"], m["train_y"]


@pytest.fixture(scope="module")
def pairs(digits):
    return mc.make_pairs(*digits, n=150, rng=np.random.default_rng(1))


def naive_box(img):
    rows, cols = np.nonzero(img)
    return rows.min(), rows.max(), cols.min(), cols.max()


def naive_iou(p, q):
    """IoU of two inclusive (top, bottom, left, right) boxes by counting pixels."""
    mask = lambda b: {(r, c) for r in range(b[0], b[1] + 1) for c in range(b[2], b[3] + 1)}
    mp, mq = mask(p), mask(q)
    return len(mp & mq) / len(mp | mq)


def test_make_pairs_shapes_and_dtypes(pairs):
    n = 150
    for k in ("x", "a", "b"):
        assert pairs[k].dtype == np.uint8 and pairs[k].shape == (n, 36, 36)
    assert pairs["labels"].dtype == np.int64 and pairs["labels"].shape == (n, 2)
    assert pairs["shifts"].dtype == np.int64 and pairs["shifts"].shape == (n, 4)
    assert pairs["shifts"].min() >= -4 and pairs["shifts"].max() <= 4
    assert pairs["iou"].shape == (n,) and pairs["iou"].dtype.kind == "f"


def test_make_pairs_labels_distinct(pairs):
    lab = pairs["labels"]
    assert np.all(lab[:, 0] != lab[:, 1]) and lab.min() >= 0 and lab.max() <= 9


def test_make_pairs_iou_from_the_images_reaches_min_iou(pairs):
    for i in range(len(pairs["x"])):
        iou = naive_iou(naive_box(pairs["a"][i]), naive_box(pairs["b"][i]))
        assert iou >= 0.8
        assert iou == pytest.approx(pairs["iou"][i])


def test_make_pairs_sources_are_digits_placed_at_4_plus_shift(digits, pairs):
    images, labels = digits
    for i in range(len(pairs["x"])):
        for src, (dy, dx), lab in ((pairs["a"][i], pairs["shifts"][i, :2], pairs["labels"][i, 0]),
                                   (pairs["b"][i], pairs["shifts"][i, 2:], pairs["labels"][i, 1])):
            crop = src[4 + dy:4 + dy + 28, 4 + dx:4 + dx + 28]
            match = np.all(images == crop, axis=(1, 2))
            assert match.any() and np.all(labels[match] == lab)
            rest = src.copy()
            rest[4 + dy:4 + dy + 28, 4 + dx:4 + dx + 28] = 0
            assert not rest.any()


def test_make_pairs_source_placement_naive_loop(digits):
    images, labels = digits
    one = np.zeros((2, 28, 28), np.uint8)
    one[0, 3, 5], one[0, 20, 22], one[1, 10:14, 8:19] = 200, 100, 50
    p = mc.make_pairs(one, np.array([1, 7]), n=30, rng=np.random.default_rng(3), min_iou=0)
    for i in range(30):
        for src, (dy, dx), lab in ((p["a"][i], p["shifts"][i, :2], p["labels"][i, 0]),
                                   (p["b"][i], p["shifts"][i, 2:], p["labels"][i, 1])):
            want = np.zeros((36, 36), np.uint8)
            digit = one[0 if lab == 1 else 1]
            for r in range(28):
                for c in range(28):
                    want[4 + dy + r, 4 + dx + c] = digit[r, c]
            assert np.array_equal(src, want)


@pytest.mark.parametrize("overlay", ["max", "clip-sum"])
def test_make_pairs_overlay(digits, overlay):
    p = mc.make_pairs(*digits, n=100, rng=np.random.default_rng(2), overlay=overlay)
    a, b = p["a"].astype(np.int64), p["b"].astype(np.int64)
    want = np.maximum(a, b) if overlay == "max" else np.minimum(a + b, 255)
    assert np.array_equal(p["x"], want)
    assert np.any((a > 0) & (b > 0))  # the digits do overlap
    if overlay == "clip-sum":
        assert np.any(a + b > 255)  # saturation is exercised


def test_make_pairs_deterministic_per_seed(digits):
    run = lambda seed: mc.make_pairs(*digits, n=40, rng=np.random.default_rng(seed))
    p1, p2, p3 = run(5), run(5), run(6)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert not np.array_equal(p1["x"], p3["x"]) and not np.array_equal(p1["shifts"], p3["shifts"])


def test_make_pairs_min_iou_zero(digits):
    p = mc.make_pairs(*digits, n=400, rng=np.random.default_rng(4), min_iou=0)
    assert np.all(p["labels"][:, 0] != p["labels"][:, 1])
    assert p["shifts"].min() == -4 and p["shifts"].max() == 4  # the paper's full shift range
    assert p["iou"].min() < 0.8  # nothing was filtered by IoU
    assert np.all(p["iou"] >= 0)


def test_make_pairs_impossible_request_raises(digits):
    images, _ = digits
    with pytest.raises(CapsNetError, match="IoU"):
        mc.make_pairs(images[:5], np.full(5, 3), n=4, rng=np.random.default_rng(0))


def test_bounding_boxes_match_naive():
    imgs = np.zeros((5, 28, 28), np.uint8)
    imgs[0, 0, 0] = 1
    imgs[1, 27, 27] = 9
    imgs[2] = 255
    imgs[3, 4:9, 11:20] = 7
    imgs[4, 2, 25], imgs[4, 19, 3] = 1, 1
    rng = np.random.default_rng(0)
    rand = (rng.random((20, 28, 28)) > 0.995).astype(np.uint8)
    rand[:, 14, 14] = 1  # never empty
    imgs = np.concatenate([imgs, rand])
    got = mc.bounding_boxes(imgs)
    assert got.shape == (len(imgs), 4)
    assert [tuple(b) for b in got] == [naive_box(im) for im in imgs]
    assert tuple(got[3]) == (4, 8, 11, 19)


def test_box_iou_matches_naive():
    a = np.array([[0, 1, 0, 1], [3, 10, 3, 10], [0, 4, 0, 4], [5, 9, 2, 3]])
    b = np.array([[1, 2, 1, 2], [3, 10, 3, 10], [5, 9, 5, 9], [5, 9, 3, 4]])
    got = mc.box_iou(a, b)
    assert got == pytest.approx([1 / 7, 1.0, 0.0, 5 / 15])
    rng = np.random.default_rng(1)
    lo = rng.integers(0, 20, (50, 4))
    boxes = np.stack([lo[:, 0], lo[:, 0] + rng.integers(0, 10, 50),
                      lo[:, 2], lo[:, 2] + rng.integers(0, 10, 50)], 1)
    other = np.roll(boxes, 1, axis=0)
    assert mc.box_iou(boxes, other) == pytest.approx([naive_iou(p, q) for p, q in zip(boxes, other)])


# ----------------------------------------------------------------------------------------------
# batch_arrays

@pytest.mark.parametrize("dtype", [np.dtype("float32"), np.dtype("float64")])
def test_batch_arrays_dtype_and_range(pairs, dtype):
    pairs = dict(pairs, x=pairs["x"].copy())
    pairs["x"][42, 0, :3] = (255, 254, 1)
    idx = np.array([3, 0, 7, 7, 42])
    batch = mc.batch_arrays(pairs, idx, dtype)
    assert batch["x"].shape == (5, 36, 36, 1) and batch["a"].shape == (5, 36 * 36)
    assert batch["b"].shape == (5, 36 * 36)
    for k in ("x", "a", "b"):
        assert batch[k].dtype == dtype
        assert batch[k].min() >= 0 and batch[k].max() <= 1
    assert batch["x"].max() == 1 and batch["x"][4, 0, 0, 0] == 1  # 255 maps to exactly 1
    assert 0 < batch["x"][4, 0, 2, 0] < batch["x"][4, 0, 1, 0] < 1
    assert np.allclose(batch["a"], pairs["a"][idx].reshape(5, -1) / 255)
    assert np.array_equal(batch["labels"], pairs["labels"][idx])


CAPS = dict(task="mnist", canvas=12, max_shift=2, kernel=3, conv1_channels=3, primary_types=2,
            primary_dim=4, digit_dim=5, decoder_h1=8, decoder_h2=9, recon_weight=0.5,
            dtype="float64")


SYNTH = ("--task", "mnist", "--data", "synthetic", "--n-train", 64, "--n-test", 32,
         "--batch-size", 16, "--quiet")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def mnist_digits(rng, n, side=28):
    """n random uint8 digits with ink only inside the central (side - 8) square, as MNIST's."""
    x = np.zeros((n, side, side), np.uint8)
    x[:, 4:-4, 4:-4] = rng.integers(0, 256, (n, side - 8, side - 8))
    return x


def one_label_batch(cfg, rng, n=3):
    x = rng.uniform(size=(n, cfg.canvas ** 2))
    return dict(x=x.reshape(n, cfg.canvas, cfg.canvas, 1), a=x, labels=rng.integers(0, 10, (n, 1)))


# ----------------------------------------------------------------------------------------------
# Data


def test_shift_digits_moves_each_digit_by_at_most_two_pixels_and_keeps_its_ink(rng):
    x = mnist_digits(rng, 200)
    labels = rng.integers(0, 10, 200).astype(np.uint8)
    d = mc.shift_digits(x, labels, rng, 2)
    assert d["x"].shape == (200, 28, 28) and d["x"].dtype == np.uint8 and d["a"] is d["x"]
    assert d["labels"].shape == (200, 1) and d["labels"].dtype == np.int64
    np.testing.assert_array_equal(d["labels"][:, 0], labels)
    # the ink sits 4 px from every edge, so a shift of 2 loses none of it
    np.testing.assert_array_equal(d["x"].reshape(200, -1).sum(1, dtype=np.int64),
                                  x.reshape(200, -1).sum(1, dtype=np.int64))
    found = set()
    for src, out in zip(x, d["x"]):
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if np.array_equal(np.roll(src, (dy, dx), (0, 1)), out)]
        assert len(hits) == 1
        found.add(hits[0])
    assert len(found) == 25  # every shift in [-2, 2]^2 occurs


def test_shift_digits_pads_with_zeros_and_without_rng_leaves_digits_alone(rng):
    x = np.full((1, 28, 28), 255, np.uint8)
    out = mc.shift_digits(x, np.zeros(1, np.uint8), np.random.default_rng(3), 2)["x"][0]
    moved = np.argwhere(out == 0)
    assert 0 < len(moved) <= 28 * 4 + 4 * 26  # at most two rows and two columns go to zero
    same = mc.shift_digits(x, np.zeros(1, np.uint8), None)
    np.testing.assert_array_equal(same["x"], x)


def test_every_epoch_shifts_afresh_and_the_test_digits_are_unshifted():
    cfg = mc.Config(task="mnist", canvas=28, max_shift=2, n_train=200, n_test=50)
    mnist = mc.synthetic_mnist(np.random.default_rng(0))
    pool, test = mc.make_data(cfg, mnist)
    assert pool is None
    np.testing.assert_array_equal(test["x"], mnist["test_x"][:50])
    np.testing.assert_array_equal(test["labels"][:, 0], mnist["test_y"][:50])
    rng = np.random.default_rng(1)
    e1 = mc.shift_digits(mnist["train_x"][:200], mnist["train_y"][:200], rng, 2)["x"]
    e2 = mc.shift_digits(mnist["train_x"][:200], mnist["train_y"][:200], rng, 2)["x"]
    assert (e1 != e2).any(axis=(1, 2)).mean() > 0.8


def test_batch_arrays_for_one_digit_holds_x_a_and_one_label_column(rng):
    d = mc.shift_digits(mnist_digits(rng, 10), rng.integers(0, 10, 10), None)
    b = mc.batch_arrays(d, np.arange(4), np.float32)
    assert set(b) == {"x", "a", "labels"} and b["labels"].shape == (4, 1)
    assert b["x"].shape == (4, 28, 28, 1) and b["a"].shape == (4, 784)
    np.testing.assert_array_equal(b["a"], b["x"].reshape(4, -1))


def test_mnist_task_defaults_and_limits():
    parse = lambda *a: mc.config_from_args(mc.build_parser().parse_args(list(a)))
    cfg = parse("--task", "mnist")
    assert (cfg.canvas, cfg.max_shift, cfg.n_train, cfg.n_test, cfg.n_labels) == (28, 2, 60000,
                                                                                  10000, 1)
    assert cfg.n_primary == 6 * 6 * 8  # 28 -> 20 (Conv1 9x9) -> 6 (PrimaryCaps 9x9, stride 2)
    assert parse("--task", "mnist", "--n-train", "500").n_train == 500
    assert parse().n_train == 6000 and parse().canvas == 36
    with pytest.raises(mc.CapsNetError, match="60000 training"):
        parse("--task", "mnist", "--n-train", "60001")


def test_expanded_places_every_digit_whole_at_every_offset_0_to_12_on_40x40(rng):
    n = 2000
    x = mnist_digits(rng, n)
    d = mc.shift_digits(x, rng.integers(0, 10, n), rng, 6, 40)
    assert d["x"].shape == (n, 40, 40) and d["a"] is d["x"] and d["labels"].shape == (n, 1)
    np.testing.assert_array_equal(d["x"].reshape(n, -1).sum(1, dtype=np.int64),
                                  x.reshape(n, -1).sum(1, dtype=np.int64))  # no ink lost
    off = mc.bounding_boxes(d["x"])[:, [0, 2]] - mc.bounding_boxes(x)[:, [0, 2]]  # (n, 2)
    for src, out, (r, c) in zip(x, d["x"], off):
        np.testing.assert_array_equal(out[r:r + 28, c:c + 28], src)
    assert off.min() == 0 and off.max() == 12
    assert len({(r, c) for r, c in off}) == 169  # each whole-pixel offset 0..12 per axis occurs
    centred = mc.shift_digits(x[:2], np.zeros(2), None, 6, 40)["x"]
    np.testing.assert_array_equal(centred[:, 6:34, 6:34], x[:2])


def test_expanded_task_trains_on_fresh_positions_and_tests_on_positions_fixed_by_the_seed():
    parse = lambda *a: mc.config_from_args(mc.build_parser().parse_args(list(a)))
    cfg = parse("--task", "expanded", "--n-train", "200", "--n-test", "50")
    assert (cfg.canvas, cfg.max_shift, cfg.n_labels, cfg.cnn_fc) == (40, 6, 1, 704)  # own CNN
    assert parse("--task", "expanded").n_train == 60000
    with pytest.raises(mc.CapsNetError, match="10000 test"):
        parse("--task", "expanded", "--n-test", "10001")
    mnist = mc.synthetic_mnist(np.random.default_rng(0))
    pool, test = mc.make_data(cfg, mnist)
    assert pool is None and test["x"].shape == (50, 40, 40)
    np.testing.assert_array_equal(test["labels"][:, 0], mnist["test_y"][:50])
    np.testing.assert_array_equal(test["x"], mc.make_data(cfg, mnist)[1]["x"])
    other = mc.make_data(dataclasses.replace(cfg, seed=1), mnist)[1]["x"]
    assert (test["x"] != other).any(axis=(1, 2)).mean() > 0.8
    boxes = mc.bounding_boxes(test["x"])
    assert len(np.unique(boxes[:, 0])) > 5 and len(np.unique(boxes[:, 2])) > 5


@pytest.mark.parametrize("model", [None, "cnn"])
def test_capsnet_and_cnn_train_and_score_on_the_expanded_task(tmp_path, capsys, model):
    small = (("--conv1-channels", 4, "--primary-types", 2, "--decoder-h1", 8, "--decoder-h2", 8)
             if model is None else ("--cnn-conv1", 2, "--cnn-conv2", 2, "--cnn-conv3", 2,
                                    "--cnn-fc", 8, "--cnn-fc2", 8))
    rc, _ = main_in(["--task", "expanded", "--data", "synthetic", "--n-train", 32, "--n-test",
                     16, "--batch-size", 16, "--quiet", "--n-epochs", 1, "--workers", 1, *small,
                     "--metrics-json", tmp_path / "m.json"], capsys, cb.CNN if model else None)
    assert rc == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["config"]["task"] == "expanded" and doc["config"]["canvas"] == 40
    assert 0 <= doc["final"]["test_error"] <= 1 and "set_acc" not in doc["final"]


# ----------------------------------------------------------------------------------------------
# Whole models on one-digit batches


def test_mnist_capsnet_gradient_for_every_parameter(rng):
    cfg = mc.Config(**CAPS, routing_grad="full", digit_bias=True, bias_init=0.1)
    params = mc.init_params(cfg, rng)
    params["digit_w"] *= 4  # longer capsules: both sides of the margin loss are exercised
    batch = one_label_batch(cfg, rng)
    _, grads, aux = mc.loss_and_grads(params, batch, cfg)
    assert aux["out"].shape == (3, 10, 5)
    assert set(grads) == set(params) == set(mc.init_shapes(cfg))
    errors = parameter_errors(lambda: mc.loss_and_grads(params, batch, cfg)[0], params, grads, rng)
    assert max(errors.values()) < 1e-6, errors


def test_mnist_capsnet_reconstructs_only_the_true_digit(rng):
    """One label: the decoder runs once per image, against the image itself."""
    cfg = mc.Config(**CAPS)
    params = mc.init_params(cfg, rng)
    batch = one_label_batch(cfg, rng)
    v, _ = mc.encode(params, batch["x"], cfg)
    recon = mc.reconstruct(params, v, batch["labels"][:, 0])
    expected = ((recon - batch["a"]) ** 2).sum() / 3
    _, _, aux = mc.loss_and_grads(params, batch, cfg)
    assert aux["recon"] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Evaluation and routing statistics


def test_evaluate_on_digits_counts_errors_of_the_longest_capsule(rng, monkeypatch):
    cfg = mc.Config(**{**CAPS, "dtype": "float32"})
    params = mc.init_params(cfg, rng)
    pairs = mc.shift_digits(mnist_digits(rng, 6, 12), np.array([0, 1, 2, 3, 4, 5]), None)
    v = np.zeros((6, 10, 5), np.float32)
    v[np.arange(6), [0, 1, 2, 9, 9, 5], 0] = 0.9  # images 3 and 4 read as 9
    monkeypatch.setattr(mc, "predict", lambda *a, **k: v)
    met = mc.evaluate(params, cfg, pairs)
    assert (met["n_errors"], met["test_error"], met["top1"]) == (2, 2 / 6, 4 / 6)
    assert "set_acc" not in met and "recon_mse" in met
    assert "error 33.33% (2 digits wrong)" in mc.score_str(met)


def test_routing_stats_first_iteration_is_uniform_and_agreement_is_measured(rng):
    cfg = mc.Config(**{**CAPS, "dtype": "float32"})
    params = mc.init_params(cfg, rng)
    x = mnist_digits(rng, 5, 12)
    st = mc.routing_stats(params, cfg, x)
    assert len(st["routing_db"]) == len(st["routing_entropy"]) == cfg.routing_iters
    assert st["routing_entropy"][0] == pytest.approx(math.log(10), abs=1e-5)
    assert all(e <= math.log(10) + 1e-5 for e in st["routing_entropy"])
    # the first update, recomputed by hand: mean over N, J, I of |uh_ij . v_j|
    uh, iters, _ = mc.encode(params, x.astype(np.float32)[..., None] / 255, cfg)[1][-1]
    expected = np.abs(np.einsum("njie,nje->nji", uh, iters[0][1])).mean()
    assert st["routing_db"][0] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# The CLI, end to end


def test_mnist_capsnet_run_resumes_bit_for_bit_and_reports_test_error(tmp_path, capsys):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    small = ("--conv1-channels", 4, "--primary-types", 2, "--decoder-h1", 16, "--decoder-h2", 16)
    assert main_in([*SYNTH, *small, "--n-epochs", 1, "--save", a])[0] == 0
    assert main_in(["--resume", a, "--save", a, "--n-epochs", 2, "--quiet",
                    "--metrics-json", tmp_path / "a.json"])[0] == 0
    assert main_in([*SYNTH, *small, "--n-epochs", 2, "--save", b,
                    "--metrics-json", tmp_path / "b.json"])[0] == 0
    assert_same_checkpoint(a, b)
    doc = metrics_wo_timing(tmp_path / "a.json")
    assert doc == metrics_wo_timing(tmp_path / "b.json")
    final = doc["final"]
    assert doc["config"]["task"] == "mnist" and 0 <= final["test_error"] <= 1
    assert final["n_errors"] == round(final["test_error"] * 32)
    assert len(final["routing_db"]) == 3 and len(final["routing_entropy"]) == 3
    out = capsys.readouterr().out
    assert "test error" in out and "set acc" not in out


def naive_conv(x, w, b, stride):
    n, h, wd, c = x.shape
    k, f = w.shape[0], w.shape[3]
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, ho, wo, f))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("nabc,abcf->nf", patch, w) + b
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_forward_matches_naive_loop(rng, stride):
    x, w, b = rng.standard_normal((2, 11, 10, 3)), rng.standard_normal((4, 4, 3, 5)), rng.standard_normal(5)
    out, _ = mc.conv_forward(x, w, b, stride)
    np.testing.assert_allclose(out, naive_conv(x, w, b, stride), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_backward(rng, stride):
    x, w, b = rng.standard_normal((2, 9, 10, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
    f = lambda: mc.conv_forward(x, w, b, stride)[0]
    grads = lambda dout: mc.conv_backward(dout, mc.conv_forward(x, w, b, stride)[1])
    check(f, x, lambda d: grads(d)[0], rng)
    check(f, w, lambda d: grads(d)[1], rng)
    check(f, b, lambda d: grads(d)[2], rng)


def test_conv_backward_without_dx_gives_same_weight_grads(rng):
    x, w, b = rng.standard_normal((2, 9, 9, 2)), rng.standard_normal((3, 3, 2, 4)), np.zeros(4)
    out, cache = mc.conv_forward(x, w, b, 2)
    dout = rng.standard_normal(out.shape)
    full, skip = mc.conv_backward(dout, cache), mc.conv_backward(dout, cache, need_dx=False)
    assert skip[0] is None
    np.testing.assert_array_equal(full[1], skip[1])


def test_relu_backward(rng):
    x = rng.standard_normal((4, 7))
    check(lambda: mc.relu_forward(x)[0], x, lambda d: mc.relu_backward(d, mc.relu_forward(x)[1]), rng)


def test_squash_forward_keeps_direction_and_bounds_length(rng):
    s = rng.standard_normal((5, 8)) * np.array([[1e-3], [0.5], [1], [3], [100]])
    v, _ = mc.squash_forward(s)
    n = np.linalg.norm(s, axis=1)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), n ** 2 / (1 + n ** 2), rtol=1e-12)
    np.testing.assert_allclose(v / np.linalg.norm(v, axis=1, keepdims=True), s / n[:, None])


def test_squash_backward(rng):
    s = rng.standard_normal((3, 4, 8))
    check(lambda: mc.squash_forward(s)[0], s, lambda d: mc.squash_backward(d, mc.squash_forward(s)[1]), rng)


def test_squash_at_zero_is_zero_with_finite_gradient(rng):
    s = np.zeros((2, 8))
    v, cache = mc.squash_forward(s)
    ds = mc.squash_backward(rng.standard_normal((2, 8)), cache)
    assert np.all(v == 0) and np.all(np.isfinite(ds))


def test_uhat_forward_matches_einsum(rng):
    u, w = rng.standard_normal((3, 6, 4)), rng.standard_normal((6, 5, 7, 4))
    uh, _ = mc.uhat_forward(u, w)
    np.testing.assert_allclose(uh, np.einsum("nid,ijed->njie", u, w), rtol=1e-12)


def test_uhat_backward(rng):
    u, w = rng.standard_normal((3, 6, 4)), rng.standard_normal((6, 5, 7, 4))
    f = lambda: mc.uhat_forward(u, w)[0]
    grads = lambda d: mc.uhat_backward(d, mc.uhat_forward(u, w)[1])
    check(f, u, lambda d: grads(d)[0], rng)
    check(f, w, lambda d: grads(d)[1], rng)


def naive_routing(uh, iters):
    """Procedure 1 of the paper, written with einsum over (N, I, J, E) indices."""
    b = np.zeros(uh.shape[:3])                                     # (N, J, I)
    for r in range(iters):
        c = np.exp(b) / np.exp(b).sum(1, keepdims=True)
        s = np.einsum("nji,njie->nje", c, uh)
        v = s * np.linalg.norm(s, axis=-1, keepdims=True) / (1 + (s ** 2).sum(-1, keepdims=True))
        b = b + np.einsum("njie,nje->nji", uh, v)
    return v


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_routing_forward_matches_naive(rng, iters):
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.5
    np.testing.assert_allclose(mc.routing_forward(uh, iters)[0], naive_routing(uh, iters), rtol=1e-12)


def test_routing_coupling_sums_to_one_over_digit_capsules(rng):
    _, (_, iters, _) = mc.routing_forward(rng.standard_normal((2, 4, 6, 3)), 3)
    for c, _, _ in iters:
        np.testing.assert_allclose(c.sum(1), 1)


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_routing_backward_full_is_exact(rng, iters):
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.7
    check(lambda: mc.routing_forward(uh, iters)[0], uh,
          lambda d: mc.routing_backward(d, mc.routing_forward(uh, iters)[1], full=True), rng)


def test_routing_backward_frozen_differentiates_the_frozen_c_function(rng):
    """With c frozen at its unperturbed value, v = squash(sum_i c_ij uh_ij) exactly."""
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.7
    c_final = mc.routing_forward(uh, 3)[1][1][-1][0].copy()
    frozen = lambda: mc.squash_forward(np.einsum("nji,njie->nje", c_final, uh))[0]
    np.testing.assert_allclose(frozen(), mc.routing_forward(uh, 3)[0])
    check(frozen, uh, lambda d: mc.routing_backward(d, mc.routing_forward(uh, 3)[1], full=False), rng)


def test_frozen_and_full_routing_gradients_differ(rng):
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.7
    v, cache = mc.routing_forward(uh, 3)
    d = rng.standard_normal(v.shape)
    assert rel_error(mc.routing_backward(d, cache, False), mc.routing_backward(d, cache, True)) > 1e-3


def test_leaky_coupling_is_the_softmax_with_a_zero_logit_dropped(rng):
    b = rng.standard_normal((2, 4, 6)) * 3
    full = mc.softmax(np.concatenate([np.zeros((2, 1, 6)), b], axis=1), axis=1)
    np.testing.assert_allclose(mc.coupling(b, leaky=True), full[:, 1:], rtol=1e-12)
    assert (mc.coupling(b, leaky=True).sum(1) < 1).all()
    big = np.full((1, 3, 2), 800.0)  # exp(800) overflows: the max is taken out first
    np.testing.assert_allclose(mc.coupling(big, leaky=True), 1 / 3)


def routing_variant(uh, iters, bias, leaky):
    """The plain forward with the bias added to every s_j and the leaky coupling."""
    b = np.zeros(uh.shape[:3])
    for r in range(iters):
        c = mc.coupling(b, leaky)
        v = mc.squash_forward(np.einsum("nji,njie->nje", c, uh) + bias)[0]
        b = b + np.einsum("njie,nje->nji", uh, v)
    return v


@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_routing_with_bias_and_leak_full_backward_is_exact(rng, iters, leaky):
    """Both the votes' and the bias's gradient, through every iteration."""
    uh, bias = rng.standard_normal((2, 4, 6, 3)) * 0.7, rng.standard_normal((4, 3)) * 0.3
    f = lambda: mc.routing_forward(uh, iters, bias, leaky)[0]
    np.testing.assert_allclose(f(), routing_variant(uh, iters, bias, leaky), rtol=1e-12)
    grads = lambda d: mc.routing_backward(d, mc.routing_forward(uh, iters, bias, leaky)[1], True)
    check(f, uh, lambda d: grads(d)[0], rng)
    check(f, bias, lambda d: grads(d)[1], rng)


def test_routing_with_bias_frozen_backward_differentiates_the_frozen_c_function(rng):
    uh, bias = rng.standard_normal((2, 4, 6, 3)) * 0.7, rng.standard_normal((4, 3)) * 0.3
    c_final = mc.routing_forward(uh, 3, bias, True)[1][1][-1][0].copy()
    frozen = lambda: mc.squash_forward(np.einsum("nji,njie->nje", c_final, uh) + bias)[0]
    grads = lambda d: mc.routing_backward(d, mc.routing_forward(uh, 3, bias, True)[1], False)
    check(frozen, uh, lambda d: grads(d)[0], rng)
    check(frozen, bias, lambda d: grads(d)[1], rng)


def test_margin_loss_value_by_hand():
    v = np.zeros((1, 10, 2))
    v[0, 3] = [0.6, 0.0]    # label, too short: (0.9 - 0.6)^2 = 0.09
    v[0, 5] = [0.0, 0.95]   # label, long enough: 0
    v[0, 7] = [0.3, 0.4]    # not a label, length 0.5: 0.5 * 0.4^2 = 0.08
    loss, _ = mc.margin_forward(v, np.array([[3, 5]]))
    assert loss == pytest.approx(0.09 + 0.08)


@pytest.mark.parametrize("scale", [1.0, 1 / 20])
def test_margin_backward(rng, scale):
    v = rng.standard_normal((4, 10, 5)) * 0.4
    labels = np.array([[0, 1], [2, 9], [5, 3], [7, 8]])
    check(lambda: mc.margin_forward(v, labels, scale)[0], v,
          lambda d: d * mc.margin_backward(mc.margin_forward(v, labels, scale)[1]), rng)


def test_tf_margin_loss_is_the_mean_over_classes_halved(rng):
    """The TF reference: 0.5 T pos^2 + 0.25 (1 - T) neg^2, averaged over batch and classes."""
    v = rng.standard_normal((4, 10, 5)) * 0.4
    labels = np.array([[0, 1], [2, 9], [5, 3], [7, 8]])
    t = np.zeros((4, 10))
    t[np.arange(4)[:, None], labels] = 1
    length = np.linalg.norm(v, axis=-1)
    tf = (0.5 * t * np.maximum(0, 0.9 - length) ** 2
          + 0.25 * (1 - t) * np.maximum(0, length - 0.1) ** 2).mean()
    assert mc.margin_forward(v, labels, mc.MARGIN_SCALE["tf"])[0] == pytest.approx(tf, rel=1e-12)


def decoder_params(rng, e=3, hw=16):
    shapes = dict(dec1_w=(10 * e, 6), dec1_b=(6,), dec2_w=(6, 7), dec2_b=(7,), dec3_w=(7, hw), dec3_b=(hw,))
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def test_mask_forward_keeps_only_the_chosen_capsule(rng):
    v = rng.standard_normal((3, 10, 2))
    labels = np.array([[1, 4], [0, 9], [7, 2]])
    z, _ = mc.mask_forward(v, labels)
    z = z.reshape(2, 3, 10, 2)
    for k in range(2):
        for n in range(3):
            np.testing.assert_array_equal(z[k, n, labels[n, k]], v[n, labels[n, k]])
            assert np.count_nonzero(z[k, n]) == np.count_nonzero(v[n, labels[n, k]])


def test_mask_backward(rng):
    v, labels = rng.standard_normal((3, 10, 2)), np.array([[1, 4], [0, 9], [7, 2]])
    check(lambda: mc.mask_forward(v, labels)[0], v,
          lambda d: mc.mask_backward(d, mc.mask_forward(v, labels)[1]), rng)


def test_decoder_and_reconstruction_loss_backward(rng):
    p = decoder_params(rng)
    z, target = rng.standard_normal((4, 30)), rng.uniform(size=(4, 16))

    def loss():
        return mc.recon_forward(mc.decoder_forward(z, p)[0], target, 2)[0]

    def grads():
        recon, cache = mc.decoder_forward(z, p)
        return mc.decoder_backward(mc.recon_backward(mc.recon_forward(recon, target, 2)[1]), cache)
    check(loss, z, lambda d: d * grads()[0], rng)
    for name in p:
        check(loss, p[name], lambda d: d * grads()[1][name], rng)


def test_recon_loss_is_sum_over_pixels_mean_over_composites():
    recon, target = np.full((4, 5), 0.5), np.zeros((4, 5))  # 2 composites x 2 passes x 5 pixels
    assert mc.recon_forward(recon, target, 2)[0] == pytest.approx(4 * 5 * 0.25 / 2)


def test_adam_two_steps_by_hand():
    p, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, -1.0]), np.array([-0.1, 0.2])
    params, state = {"w": p.copy()}, mc.adam_init({"w": p})
    mc.adam_step(params, {"w": g1}, state, lr=0.1)
    # step 1: m = 0.1 g1, v = 0.001 g1^2; bias-corrected m_hat = g1, v_hat = g1^2 -> p - 0.1 sign(g1)
    np.testing.assert_allclose(params["w"], p - 0.1 * g1 / (np.abs(g1) + 1e-8))
    mc.adam_step(params, {"w": g2}, state, lr=0.1)
    m2 = 0.9 * 0.1 * g1 + 0.1 * g2
    v2 = 0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2
    expected = p - 0.1 * g1 / (np.abs(g1) + 1e-8) \
        - 0.1 * (m2 / (1 - 0.9 ** 2)) / (np.sqrt(v2 / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(params["w"], expected, rtol=1e-12)
    assert state["t"] == 2


def test_uhat_forward_in_blocks_equals_einsum():
    """u_hat is laid out a block of capsules at a time (~2^18 numbers a block): with 2,000
    capsules of 2 composites it takes three blocks, the last one ragged."""
    rng = np.random.default_rng(0)
    u, w = rng.standard_normal((2, 2000, 8)), rng.standard_normal((2000, 10, 16, 8))
    uh, _ = mc.uhat_forward(u, w)
    np.testing.assert_allclose(uh, np.einsum("nid,ijed->njie", u, w), rtol=1e-12, atol=1e-12)


def test_adam_keeps_float32():
    params = {"w": np.ones(3, np.float32)}
    state = mc.adam_init(params)
    mc.adam_step(params, {"w": np.ones(3, np.float32)}, state, lr=1e-3)
    assert params["w"].dtype == np.float32 and state["v"]["w"].dtype == np.float32


def test_learning_rate_decay():
    cfg = mc.Config(lr=0.01, lr_decay=0.96, lr_decay_steps=100)
    assert mc.learning_rate(cfg, 0) == 0.01
    assert mc.learning_rate(cfg, 200) == pytest.approx(0.01 * 0.96 ** 2)


def test_learning_rate_warm_up_and_cosine():
    cfg = mc.Config(lr=0.01, lr_decay=0.96, lr_decay_steps=100, lr_warmup_steps=10)
    assert mc.learning_rate(cfg, 0) == pytest.approx(0.001)
    assert mc.learning_rate(cfg, 4) == pytest.approx(0.005 * 0.96 ** 0.04)  # both factors
    assert mc.learning_rate(cfg, 200) == pytest.approx(0.01 * 0.96 ** 2)  # warm-up is over
    cos = mc.Config(lr=0.01, lr_schedule="cosine", n_epochs=2, n_train=640, batch_size=32)  # 40 steps
    assert mc.learning_rate(cos, 0) == 0.01
    assert mc.learning_rate(cos, 20) == pytest.approx(0.005)
    assert mc.learning_rate(cos, 40) == pytest.approx(0, abs=1e-18)


def test_truncated_normal_stays_within_two_std():
    z = mc.truncated_normal(np.random.default_rng(0), (100_000,), 0.1)
    assert np.abs(z).max() <= 0.2 and abs(z.std() - 0.088) < 0.001  # 0.1 * 0.8796, TF's too


def test_ema_step_and_its_debiased_average():
    """ema after steps p1, p2 (decay d, zero start): (1-d)(d p1 + p2) / (1 - d^2)."""
    cfg = mc.Config(ema=0.9)
    p1, p2 = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    run = mc.Run(cfg, {"w": p1.copy()}, None, None, ema={"w": np.zeros(2)})
    assert run.eval_params["w"] is run.params["w"]  # step 0: nothing averaged yet
    mc.ema_step(run)
    run.step, run.params["w"][:] = 1, p2
    mc.ema_step(run)
    run.step = 2
    np.testing.assert_allclose(run.eval_params["w"], (0.9 * p1 + p2) * 0.1 / (1 - 0.81))


def test_a_broken_backward_fails_the_check(rng):
    """The check can fail: squash's backward without its radial term is caught."""
    s = rng.standard_normal((3, 4, 8))

    def broken(dv):
        _, _, _, g = mc.squash_forward(s)[1]
        return g * dv  # drops g'(n) (s . dv) s / n
    with pytest.raises(AssertionError, match="relative error"):
        check(lambda: mc.squash_forward(s)[0], s, broken, rng)


NET = dict(canvas=12, kernel=3, conv1_channels=3, primary_types=2, primary_dim=4, digit_dim=5,
            decoder_h1=8, decoder_h2=9, recon_weight=0.5, dtype="float64")


def tiny_batch(cfg, rng, n=3):
    labels = np.array([rng.choice(10, 2, replace=False) for _ in range(n)])
    a, b = rng.uniform(size=(2, n, cfg.canvas ** 2))
    return dict(x=np.maximum(a, b).reshape(n, cfg.canvas, cfg.canvas, 1), a=a, b=b, labels=labels)


def check_every_parameter(cfg, rng, loss_fn=None):
    params = mc.init_params(cfg, rng)
    params["digit_w"] *= 4  # longer capsules, so both sides of the margin loss are exercised
    for name in ("conv1_b", "primary_b", "dec1_b", "dec2_b", "dec3_b"):
        params[name] += rng.standard_normal(params[name].shape) * 0.1
    batch = tiny_batch(cfg, rng)
    _, grads, _ = mc.loss_and_grads(params, batch, cfg)
    loss_fn = loss_fn or (lambda: mc.loss_and_grads(params, batch, cfg)[0])
    return parameter_errors(loss_fn, params, grads, rng), params, batch


def test_every_parameter_gradient_full_routing():
    cfg = mc.Config(**NET, routing_grad="full")
    errors, _, _ = check_every_parameter(cfg, np.random.default_rng(1))
    assert set(errors) == set(mc.init_shapes(cfg))
    assert max(errors.values()) < 1e-6, errors


def test_every_parameter_gradient_frozen_routing(monkeypatch):
    """frozen differentiates the model whose final coupling coefficients are constants: freeze them
    at the unperturbed values and finite-difference that function."""
    cfg = mc.Config(**NET, routing_grad="frozen")
    rng = np.random.default_rng(2)
    frozen_c = {}
    original = mc.routing_forward

    def routing_with_frozen_c(uh, n_iters, bias=None, leaky=False):
        v, cache = original(uh, n_iters, bias, leaky)
        if "c" not in frozen_c:
            frozen_c["c"] = cache[1][-1][0].copy()
            return v, cache
        return mc.squash_forward(np.einsum("nji,njie->nje", frozen_c["c"], uh))[0], cache
    monkeypatch.setattr(mc, "routing_forward", routing_with_frozen_c)
    errors, _, _ = check_every_parameter(cfg, rng)
    assert max(errors.values()) < 1e-6, errors


def test_every_parameter_gradient_with_the_tf_reference_options():
    """Digit-capsule biases, leaky routing, the TF margin loss, exact routing. (The TF init changes
    no gradient code; its 4x longer votes here would make the routing too sharp for the finite
    differences at eps 1e-5: 3e-6 error.)"""
    cfg = mc.Config(**NET, routing_grad="full", digit_bias=True, bias_init=0.1,
                   leaky_routing=True, margin_loss="tf")
    errors, params, _ = check_every_parameter(cfg, np.random.default_rng(3))
    assert "digit_b" in errors and set(errors) == set(mc.init_shapes(cfg))
    assert max(errors.values()) < 1e-6, errors


def test_truncated_init_uses_the_tf_references_stds_and_bias():
    cfg = mc.Config(init="truncated", bias_init=0.1, digit_bias=True)
    p = mc.init_params(cfg, np.random.default_rng(0))
    z = 0.8796  # the std of a unit normal truncated at 2
    for name, std in (("conv1_w", 0.05), ("primary_w", 0.1 / cfg.primary_types),
                      ("digit_w", 0.1), ("dec3_w", 0.1)):
        assert abs(p[name].std() / (std * z) - 1) < 0.05, name
        assert np.abs(p[name]).max() <= 2 * std * (1 + 1e-6), name
    assert all((p[k] == np.float32(0.1)).all() for k in p if k.endswith("_b"))
    assert p["digit_b"].shape == (10, cfg.digit_dim)


def test_default_float32_step_stays_float32():
    cfg = mc.Config(**{**NET, "dtype": "float32"})
    rng = np.random.default_rng(0)
    params = mc.init_params(cfg, rng)
    batch = {k: (v.astype(np.float32) if k != "labels" else v) for k, v in tiny_batch(cfg, rng).items()}
    _, grads, aux = mc.loss_and_grads(params, batch, cfg)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert aux["out"].dtype == np.float32


def test_default_architecture_shapes():
    cfg = mc.Config()
    shapes = mc.init_shapes(cfg)
    assert cfg.grid() == (28, 10) and cfg.n_primary == 800
    assert shapes["conv1_w"] == (9, 9, 1, 32)
    assert shapes["primary_w"] == (9, 9, 32, 64)
    assert shapes["digit_w"] == (800, 10, 16, 8)
    assert shapes["dec1_w"] == (160, 256) and shapes["dec2_w"] == (256, 512)
    assert shapes["dec3_w"] == (512, 1296)


def test_paper_preset_shapes():
    cfg = mc.Config(**mc.PRESETS["paper"])
    shapes = mc.init_shapes(cfg)
    assert cfg.n_primary == 3200 and shapes["digit_w"] == (3200, 10, 16, 8)
    assert shapes["dec1_w"] == (160, 512) and shapes["dec3_w"] == (1024, 1296)


def test_training_on_synthetic_digits_learns():
    cfg = mc.Config(n_train=256, n_test=100, n_epochs=3, conv1_channels=8, primary_types=4,
                   decoder_h1=32, decoder_h2=32)
    mnist = mc.synthetic_mnist(np.random.default_rng(0))
    run = mc.new_run(cfg)
    pool, test = mc.make_data(cfg, mnist)
    assert mc.train(run, mnist, pool, test, progress=False)
    first, last = run.history["epochs"][0], run.history["epochs"][-1]
    assert np.mean(run.history["margin"][-8:]) < np.mean(run.history["margin"][:8])
    assert last["set_acc"] > 1 / 45 * 5 and last["recon_mse"] < first["recon_mse"]


def test_evaluate_counts_hits():
    cfg = mc.Config(canvas=12, kernel=3, conv1_channels=2, primary_types=1, primary_dim=2, digit_dim=2,
                   decoder_h1=3, decoder_h2=3)
    pairs = dict(x=np.zeros((2, 12, 12), np.uint8), a=np.zeros((2, 12, 12), np.uint8),
                 b=np.zeros((2, 12, 12), np.uint8), labels=np.array([[1, 2], [3, 4]]))
    v = np.zeros((2, 10, 2), np.float32)
    v[0, 1, 0], v[0, 2, 0] = 0.9, 0.8   # both right
    v[1, 3, 0], v[1, 7, 0] = 0.9, 0.8   # top-1 right, second wrong
    m_predict = mc.predict
    try:
        mc.predict = lambda *a: v
        out = mc.evaluate(mc.init_params(cfg, np.random.default_rng(0)), cfg, pairs)
    finally:
        mc.predict = m_predict
    assert out["set_acc"] == 0.5 and out["soft_acc"] == 1.0 and out["top1"] == 1.0


def test_sharded_step_equals_one_batch():
    """Two worker threads, each on half the batch, give the full batch's loss and gradients."""
    cfg = mc.Config(**NET)
    rng = np.random.default_rng(3)
    params = mc.init_params(cfg, rng)
    batch = tiny_batch(cfg, rng, n=5)  # odd: shards of 2 and 3, weighted by size
    loss, grads, aux = mc.loss_and_grads(params, batch, cfg)
    assert cfg.workers == 2
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the sharding, whatever the BLAS
        loss2, grads2, aux2 = mc.sharded_loss_and_grads(params, batch, cfg, pool)
    assert loss2 == pytest.approx(loss, rel=1e-12) and aux2["recon"] == pytest.approx(aux["recon"])
    for k in params:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(aux2["out"], aux["out"])


def test_adam_in_worker_threads_equals_serial():
    rng = np.random.default_rng(4)
    params = {"a": rng.standard_normal((7, 3)), "b": rng.standard_normal(5), "c": rng.standard_normal(1)}
    grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    serial, threaded = ({k: p.copy() for k, p in params.items()} for _ in range(2))
    s1, s2 = mc.adam_init(params), mc.adam_init(params)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            mc.adam_step(serial, grads, s1, 0.01)
            mc.adam_step(threaded, grads, s2, 0.01, workers=pool)
    for k in params:
        np.testing.assert_array_equal(serial[k], threaded[k])


def test_worker_pool_only_where_blas_threads_can_be_set():
    """Two threads each calling a multi-threaded BLAS are slower than one: the pool exists only
    where threadpoolctl can set this process's BLAS to one thread, and BLAS gets its thread count
    back afterwards."""
    blas = mc.blas_limiter()
    threads = lambda: [c.num_threads for c in mc.blas_limiter().lib_controllers]
    before = threads() if blas is not None else None
    with mc.worker_pool(1) as pool:
        assert pool is None
    with mc.worker_pool(2) as pool:
        assert (pool is None) == (blas is None)
        if blas is not None:
            assert threads() == [1] * len(before)
    if blas is not None:
        assert threads() == before


def test_worker_pool_runs_serially_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import now raises ImportError
    assert mc.blas_limiter() is None
    with mc.worker_pool(2) as pool:
        assert pool is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])
def test_divergence_guard_names_a_non_finite_gradient(bad):
    """NaN and inf anywhere, and a float32 norm that overflows (3e19 squared > 3.4e38)."""
    cfg = mc.Config(**dict(NET, dtype="float32"))
    run = mc.new_run(cfg)
    grads = {k: np.ones_like(p) for k, p in run.params.items()}
    mc.check_finite(run, 1.0, dict(margin=1.0, recon=0.0), grads, 1e-3)  # all finite: passes
    grads["primary_w"].reshape(-1)[7] = bad
    with pytest.raises(mc.Diverged, match="gradient norm of primary_w is not finite"):
        mc.check_finite(run, 1.0, dict(margin=1.0, recon=0.0), grads, 1e-3)


ROOT = Path(__file__).resolve().parents[1]


SCRIPT = ROOT / "multimnist_capsnet.py"


PROG = "multimnist_capsnet.py"


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


ROOT_SKIP = ("running as root: root bypasses directory permissions (os.access and open() both "
             "succeed on a 0o555 directory), so 'read-only' cannot be simulated; the same error "
             "path is covered by the rows that put the output under a regular file")


TINY = dict(data="synthetic", n_train=64, n_test=32, batch_size=16, conv1_channels=4,
            primary_types=2, decoder_h1=16, decoder_h2=16)


def tiny(*extra, **over) -> list[str]:
    """argv for a tiny synthetic run: TINY with `over` replacing values, then `extra` verbatim."""
    kw = {**TINY, **over}
    argv = [a for k, v in kw.items() for a in ("--" + k.replace("_", "-"), str(v))]
    return argv + ["--quiet"] + [str(a) for a in extra]


# ----------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def restore_sigint():
    """main() installs its own SIGINT handler; never let it leak into the rest of the session."""
    old = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, old)


def main_in(argv, capsys=None, model=None) -> tuple[int, str]:
    """mc.main in this process (cnn_baseline.py's with model cb.CNN): (exit code, captured
    stderr or '')."""
    try:
        rc = mc.main([str(a) for a in argv], model, cb.__file__ if model else mc.__file__)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def offline_env(**extra) -> dict:
    """The environment for CLI subprocesses: no route to the internet.

    urllib honours the proxy variables, so both MNIST mirrors fail at once with 'connection
    refused' from 127.0.0.1:9 (discard port, nothing listens); pip gets the same dead index, no
    config file and no retries.
    """
    env = dict(os.environ)
    dead = "http://127.0.0.1:9"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[k] = dead
    env.update(NO_PROXY="", no_proxy="", PIP_INDEX_URL=dead + "/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    env.pop("PYTHONWARNINGS", None)
    env.update(extra)
    return env


def cli(argv, cwd, timeout=120, script=SCRIPT, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=cwd,
                          env=offline_env(**env), capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str, allow=("mnist: ",), prog=PROG) -> str:
    """The one error line of a failed run; fails unless that is all there is on stderr.

    Tolerated besides it: progress notes whose prefix is in `allow` (the MNIST loader says what it
    tries). Anything else (argparse's usage block, a traceback, RuntimeWarnings, a second error)
    fails. An argparse error must point to --help.
    """
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    rest = [ln for ln in lines if not ln.startswith(tuple(allow))]
    assert len(rest) == 1, f"expected exactly one error line, got {len(rest)}:\n{stderr}"
    assert rest[0].startswith(f"{prog}: error: "), stderr
    return rest[0]


def snapshot(d: Path) -> dict[str, str]:
    """Every path under d -> sha256 of its bytes ('dir' for directories)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def strip_seconds(meta: dict) -> dict:
    for m in meta.get("history", {}).get("epochs", []):
        m.pop("seconds", None)
    return meta


def assert_same_checkpoint(p, q):
    """Every array bit for bit; the JSON meta equal apart from the per-epoch wall-clock seconds."""
    with np.load(p, allow_pickle=False) as a, np.load(q, allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if k == "meta":
                continue
            x, y = a[k], b[k]
            assert (x.dtype, x.shape) == (y.dtype, y.shape), k
            assert x.tobytes() == y.tobytes(), f"{k} differs (max |diff| {np.abs(x - y).max()})"
        assert strip_seconds(json.loads(str(a["meta"]))) == strip_seconds(json.loads(str(b["meta"])))


def metrics_wo_timing(path) -> dict:
    doc = json.loads(Path(path).read_text())
    assert isinstance(doc.pop("timing"), dict)
    return doc


def no_temp_files(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="session")
def good_ckpt(tmp_path_factory) -> Path:
    """A real one-epoch TINY checkpoint (and its metrics beside it); treat as read-only."""
    d = tmp_path_factory.mktemp("good")
    old = signal.getsignal(signal.SIGINT)
    rc, _ = main_in(tiny("--n-epochs", 1, "--save", d / "good.npz",
                         "--metrics-json", d / "good.json"))
    signal.signal(signal.SIGINT, old)
    assert rc == 0
    return d / "good.npz"


# ----------------------------------------------------------------------------------------------
# Resume equals uninterrupted


def test_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main_in(tiny("--n-epochs", 4, "--save", a, "--metrics-json", tmp_path / "a4.json"))[0] == 0
    assert mc.load_checkpoint(a).epoch == 4
    assert main_in(tiny("--n-epochs", 8, "--resume", a, "--save", a,
                        "--metrics-json", tmp_path / "a.json"))[0] == 0
    assert main_in(tiny("--n-epochs", 8, "--save", b, "--metrics-json", tmp_path / "b.json"))[0] == 0
    run = mc.load_checkpoint(a)
    assert (run.epoch, run.step) == (8, 8 * 4)
    assert_same_checkpoint(a, b)
    assert metrics_wo_timing(tmp_path / "a.json") == metrics_wo_timing(tmp_path / "b.json")


TF_OPTIONS = ("--ema", 0.9, "--digit-bias", "--leaky-routing", "--bias-init", 0.1,
              "--margin-loss", "tf", "--init", "truncated", "--lr-warmup-steps", 3)


def test_resume_with_ema_and_the_tf_options_equals_uninterrupted(tmp_path):
    """The average of the weights is checkpointed too: the resumed run ends bit for bit where the
    uninterrupted one does, and evaluates the averaged weights (not the raw ones)."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main_in(tiny("--n-epochs", 2, *TF_OPTIONS, "--save", a))[0] == 0
    assert main_in(["--resume", a, "--save", a, "--n-epochs", 4, "--quiet"])[0] == 0
    assert main_in(tiny("--n-epochs", 4, *TF_OPTIONS, "--save", b,
                        "--metrics-json", tmp_path / "b.json"))[0] == 0
    assert_same_checkpoint(a, b)
    run = mc.load_checkpoint(a)
    assert run.cfg.ema == 0.9 and run.cfg.digit_bias and "digit_b" in run.ema
    pool, test = mc.make_data(run.cfg, mc.synthetic_mnist(np.random.default_rng(run.cfg.seed)))
    final = metrics_wo_timing(tmp_path / "b.json")["final"]
    assert mc.evaluate(run.eval_params, run.cfg, test)["set_acc"] == final["set_acc"]
    raw = {k: p.astype(np.float64) for k, p in run.params.items()}
    assert any(np.abs(raw[k] - run.eval_params[k]).max() > 1e-6 for k in raw)
    mc.save_model(tmp_path / "model.npz", run)  # a model file ships the averaged weights
    model = mc.load_checkpoint(tmp_path / "model.npz")
    assert model.ema is None
    for k, p in run.eval_params.items():
        np.testing.assert_array_equal(model.eval_params[k], p)


def test_cnn_baseline_runs_through_the_same_cli_checkpoints_and_resume(tmp_path, capsys):
    cnn = ("--cnn-conv1", 4, "--cnn-conv2", 4, "--cnn-fc", 8)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main_in(tiny("--n-epochs", 1, *cnn, "--save", a), model=cb.CNN)[0] == 0
    assert main_in(["--resume", a, "--save", a, "--n-epochs", 2, "--quiet",
                    "--metrics-json", tmp_path / "a.json"], model=cb.CNN)[0] == 0
    assert main_in(tiny("--n-epochs", 2, *cnn, "--save", b, "--metrics-json", tmp_path / "b.json"),
                   model=cb.CNN)[0] == 0
    assert_same_checkpoint(a, b)
    doc = metrics_wo_timing(tmp_path / "a.json")
    assert doc == metrics_wo_timing(tmp_path / "b.json")
    assert doc["config"]["model"] == "cnn" and set(doc["history"]) == {"epochs", "xent"}
    assert {"set_acc", "soft_acc", "top1", "train_xent"} <= set(doc["final"])
    out = capsys.readouterr().out
    assert "train xent" in out and "recon" not in out
    rc, err = main_in(["--resume", a, "--n-epochs", 3, "--model", "capsnet"], capsys)
    assert rc == 1 and "--model (checkpoint 'cnn', given 'capsnet')" in error_line(err)


def test_main_restores_the_sigint_handler(tmp_path):
    """main() as a library call (the figure scripts, notebooks) must hand Ctrl-C back afterwards."""
    def mine(signum, frame):
        pass
    signal.signal(signal.SIGINT, mine)
    assert main_in(tiny("--n-epochs", 1))[0] == 0
    assert signal.getsignal(signal.SIGINT) is mine


# ----------------------------------------------------------------------------------------------
# Ctrl-C


class SigintAfter:
    """Wraps adam_step: right after Adam step number k, this process sends itself SIGINT.

    Python runs the handler (main's StopFlag) before the next bytecode, so the stop lands at a
    known step: a deterministic stand-in for a person pressing Ctrl-C mid-epoch.
    """

    def __init__(self, k):
        self.k, self.calls, self.real = k, 0, mc.adam_step

    def __call__(self, *a, **kw):
        self.real(*a, **kw)
        self.calls += 1
        if self.calls == self.k:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("k, resample, save", [
    (6, False, True),    # mid-epoch 2 (4 steps per epoch), fixed pool, --save given
    (4, False, True),    # on the last step of epoch 1: stopped before that epoch's evaluation
    (7, True, False),    # mid-epoch 2 with --resample, no --save: ./capsnet-interrupted.npz
])
def test_sigint_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch, capsys, k, resample, save):
    monkeypatch.chdir(tmp_path)
    flags = ["--resample"] if resample else []
    ckpt = tmp_path / ("s.npz" if save else "capsnet-interrupted.npz")
    spy = SigintAfter(k)
    monkeypatch.setattr(mc, "adam_step", spy)
    rc, err = main_in(tiny("--n-epochs", 3, *flags, "--metrics-json", tmp_path / "m.json",
                           *(["--save", ckpt] if save else [])), capsys)
    monkeypatch.setattr(mc, "adam_step", spy.real)
    assert rc == 130, err
    assert "Traceback" not in err and f"interrupted at step {k}" in err and "--resume" in err
    run = mc.load_checkpoint(ckpt)
    assert (run.step, run.epoch) == (k, (k - 1) // 4)
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["step"] == k and len(doc["history"]["margin"]) == k
    assert no_temp_files(tmp_path) == []

    # --resume alone: the checkpoint's own configuration, no training flag repeated
    rc, err = main_in(["--quiet", "--resume", ckpt, "--save", tmp_path / "r.npz",
                       "--metrics-json", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rc, err = main_in(tiny("--n-epochs", 3, *flags, "--save", tmp_path / "u.npz",
                           "--metrics-json", tmp_path / "u.json"), capsys)
    assert rc == 0, err
    assert_same_checkpoint(tmp_path / "r.npz", tmp_path / "u.npz")
    assert metrics_wo_timing(tmp_path / "r.json") == metrics_wo_timing(tmp_path / "u.json")


def wait_for(path: Path, proc: subprocess.Popen, deadline_s: float):
    end = time.monotonic() + deadline_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before writing {path.name}: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {deadline_s}s")
        time.sleep(0.02)


def test_sigint_subprocess_saves_exits_130_and_resumes_exactly(tmp_path):
    """A real Ctrl-C to a real process, some steps into epoch 2 of a 'long' run."""
    shape = dict(n_train=128, batch_size=8)       # 16 steps per epoch, a few ms-tens of ms each
    spe = 128 // 8
    s, m = tmp_path / "s.npz", tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *tiny("--n-epochs", 1000, "--save", s,
                                                                "--metrics-json", m, **shape)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(s, proc, 120)                    # epoch 1 is saved: the handler is installed
        time.sleep(0.1)                           # a few steps into epoch 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err and f"--resume {s}" in err
    run = mc.load_checkpoint(s)
    assert spe < run.step < 1000 * spe and run.epoch == (run.step - 1) // spe
    doc = json.loads(m.read_text())
    assert doc["step"] == run.step and len(doc["history"]["margin"]) == run.step
    assert no_temp_files(tmp_path) == []
    if run.step % spe == 0:  # Ctrl-C during the epoch's last step: still exact, just not mid-epoch
        print(f"note: the SIGINT landed on an epoch's last step ({run.step})")

    n_epochs = run.epoch + 1                      # finish the interrupted epoch
    assert main_in(tiny("--n-epochs", n_epochs, "--resume", s, "--save", tmp_path / "r.npz",
                        "--metrics-json", tmp_path / "r.json", **shape))[0] == 0
    assert main_in(tiny("--n-epochs", n_epochs, "--save", tmp_path / "u.npz",
                        "--metrics-json", tmp_path / "u.json", **shape))[0] == 0
    assert_same_checkpoint(tmp_path / "r.npz", tmp_path / "u.npz")
    assert metrics_wo_timing(tmp_path / "r.json") == metrics_wo_timing(tmp_path / "u.json")


def _stop_then_paste(tmp_path: Path, sig) -> tuple[subprocess.CompletedProcess, str, Path]:
    """A 3-epoch run of slow steps (2 per epoch), stopped by sig during epoch 2; returns (the
    stopped run, the command its message says to paste, its checkpoint). None if sig came too
    late (the run had finished)."""
    shape = dict(n_train=128, batch_size=64, conv1_channels=16, primary_types=4)
    s, m = tmp_path / "s.npz", tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *tiny("--n-epochs", 3, "--save", s,
                                                                "--metrics-json", m, **shape)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=offline_env())
    try:
        wait_for(s, proc, 120)                    # epoch 1 saved: the handlers are installed
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        return None
    assert "Traceback" not in err, err
    lines = err.splitlines()
    said = [i for i, ln in enumerate(lines) if ln.endswith("continue with:")]
    assert said, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), lines[said[0] + 1], s


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_stop_signal_saves_and_the_printed_command_resumes_exactly(tmp_path, sig, rc, word):
    """SIGTERM (timeout, schedulers, containers) does what the first Ctrl-C does; the command the
    message prints, pasted into a shell verbatim, finishes the run bit for bit."""
    for attempt in range(3):
        d = tmp_path / f"try{attempt}"
        d.mkdir()
        got = _stop_then_paste(d, sig)
        if got is not None:
            break
    else:
        pytest.fail("the signal never landed before the 6-step run ended")
    stopped, command, s = got
    assert stopped.returncode == rc, stopped.stderr
    assert f"{word} at step" in stopped.stderr and no_temp_files(d) == []
    run = mc.load_checkpoint(s)
    assert 2 <= run.step < 6
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pasted = subprocess.run(command, shell=True, cwd=d, env=offline_env(PATH=path),
                            capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 0, f"$ {command}\n{pasted.stderr}"
    shape = dict(n_train=128, batch_size=64, conv1_channels=16, primary_types=4)
    assert main_in(tiny("--n-epochs", 3, "--save", d / "u.npz", "--metrics-json", d / "u.json",
                        **shape))[0] == 0
    assert_same_checkpoint(s, d / "u.npz")
    assert metrics_wo_timing(d / "m.json") == metrics_wo_timing(d / "u.json")


def test_resume_alone_with_n_epochs_extends_and_refuses_a_finished_run(tmp_path, capsys, good_ckpt):
    a = tmp_path / "a.npz"
    shutil.copy(good_ckpt, a)
    rc, err = main_in(["--resume", a, "--save", a, "--quiet"], capsys)
    assert rc == 1 and "has finished 1 of its 1 epochs; give --n-epochs N > 1" in error_line(err)
    assert main_in(["--resume", a, "--save", a, "--quiet", "--n-epochs", 2], capsys)[0] == 0
    assert mc.load_checkpoint(a).epoch == 2


def test_resume_may_change_epochs_workers_and_lr_and_nothing_else(tmp_path, capsys, good_ckpt):
    ok = main_in(["--resume", good_ckpt, "--save", tmp_path / "b.npz", "--quiet", "--n-epochs", 2,
                  "--workers", 1, "--lr", 5e-4, "--seed", 0, "--conv1-channels", 4,
                  "--decoder-h1", 16], capsys)  # the checkpoint's own values: allowed
    assert ok[0] == 0, ok[1]
    cfg = mc.load_checkpoint(tmp_path / "b.npz").cfg
    assert (cfg.n_epochs, cfg.workers, cfg.lr, cfg.conv1_channels) == (2, 1, 5e-4, 4)
    rc, err = main_in(["--resume", good_ckpt, "--n-epochs", 2, "--recon-weight", 0.1,
                       "--resample"], capsys)
    line = error_line(err)
    assert rc == 1 and "--recon-weight (checkpoint 0.0005, given 0.1)" in line
    assert "--resample (checkpoint False, given True)" in line and "only --n-epochs" in line
    rc, err = main_in(["--resume", good_ckpt, "--n-epochs", 2, "--preset", "small"], capsys)
    assert rc == 1 and "--primary-types (checkpoint 2, given 8)" in error_line(err)  # via preset


def test_resume_says_what_it_changes(tmp_path, good_ckpt):
    """A resumed run that takes another learning rate says so, with the checkpoint's value; the
    checkpoint's own values, given again, are no change."""
    r = cli(["--resume", good_ckpt, "--save", tmp_path / "b.npz", "--quiet", "--n-epochs", 2,
             "--lr", 5e-4, "--workers", 2, "--seed", 0], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == (f"resuming {good_ckpt} with --n-epochs 2 (checkpoint 1), "
                                        "--lr 0.0005 (checkpoint 0.001)")
    r = cli(["--resume", tmp_path / "b.npz", "--save", tmp_path / "b.npz", "--quiet",
             "--n-epochs", 3, "--lr", 5e-4], tmp_path)
    assert r.returncode == 0 and "resuming" in r.stderr and "--lr" not in r.stderr, r.stderr


def test_a_model_file_predicts_but_does_not_resume(tmp_path, capsys, good_ckpt):
    run = mc.load_checkpoint(good_ckpt)
    mc.save_model(tmp_path / "model.npz", run, storage="float16", note="test")
    model = mc.load_checkpoint(tmp_path / "model.npz")
    assert model.adam is None and model.rng_state is None
    for k, p in run.params.items():
        assert model.params[k].dtype == p.dtype
        np.testing.assert_array_equal(model.params[k], p.astype(np.float16).astype(p.dtype))
    rc, err = main_in(["--resume", tmp_path / "model.npz", "--n-epochs", 2], capsys)
    assert rc == 1 and "can predict, not resume" in error_line(err)


def test_log_to_a_file_has_epoch_lines_and_no_carriage_returns(tmp_path):
    """Output redirected to a file (stderr not a terminal): no progress-bar redraws."""
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(SCRIPT), *[a for a in tiny("--n-epochs", 2)
                                                           if a != "--quiet"]],
                           cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, env=offline_env())
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text and "it/s" not in text and "step/s" not in text
    lines = text.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/2", "2/2"]
    assert lines[-1].startswith("done in ") and len(lines) == 3


def _all_parsers():
    import make_multimnist_capsnet_gif as gif
    import visualize_multimnist_capsnet as viz
    return {"train": mc.build_parser(), "predict": cp.build_predict_parser(),
            "figures": viz.build_parser(), "gif": gif.build_parser()}


@pytest.mark.parametrize("name", ["train", "predict", "figures", "gif"])
def test_every_flag_has_help_text(name):
    parser = _all_parsers()[name]
    for action in parser._actions:
        text = (action.help or "").strip()
        assert text and not text.startswith("(default"), f"{action.option_strings}: {text!r}"


@pytest.mark.parametrize("name", ["train", "predict", "figures", "gif"])
def test_argparse_error_is_one_line_pointing_to_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _all_parsers()[name].parse_args(["--no-such-flag"] + (["x.png"] if name == "predict" else []))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage" not in err
    assert "unrecognized arguments: --no-such-flag" in err and "--help" in err


# The training script with its Adam step held open, after a stop was requested, for up to HOLD_S
# seconds more (polling, so that the handler runs and can raise): a second signal then lands
# inside the first one's step however fast the machine is. Nothing else is changed.
HOLD_S = 2.5


HELD_STEP = f"""
import signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
import multimnist_capsnet as mc
step = mc.adam_step
def held(*args, **kw):
    step(*args, **kw)
    flag, end = signal.getsignal(signal.SIGINT), time.monotonic() + {HOLD_S}
    while getattr(flag, "requested", False) and time.monotonic() < end:
        time.sleep(0.01)
mc.adam_step = held
sys.exit(mc.main())
"""


def _signal_twice(tmp_path: Path, first, second, delay: float) -> tuple[int, str, float, bytes]:
    """Start a long run (its step held open after a stop request), wait for its epoch-1
    checkpoint, send `first`, wait for its acknowledgement, wait `delay` seconds, send `second`.
    Returns (exit code, stderr, seconds from the second signal to exit, the epoch-1 ckpt)."""
    s = tmp_path / "s.npz"
    proc = subprocess.Popen([sys.executable, "-c", HELD_STEP,
                             # epochs of 40 steps: on a fast machine the stop still lands
                             # mid-epoch (at 4 steps an epoch it sometimes hit a boundary)
                             *tiny("--n-epochs", 1000, "--n-train", 640, "--save", s)],
                            cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=offline_env())
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    seen = []
    try:
        wait_for(s, proc, 120)
        before = s.read_bytes()
        reader.start()
        proc.send_signal(first)
        end = time.monotonic() + 60
        while not any("finishing this step" in ln for ln in seen):
            try:
                seen.append(lines.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no acknowledgement of the first signal: {''.join(seen)}")
        time.sleep(delay)
        proc.send_signal(second)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    return proc.returncode, "".join(seen), waited, before


def test_second_sigint_exits_at_once_and_leaves_files_whole(tmp_path):
    """A second Ctrl-C more than StopFlag.REPEAT_S after the first: the user means it."""
    rc, err, waited, before = _signal_twice(tmp_path, signal.SIGINT, signal.SIGINT,
                                            mc.StopFlag.REPEAT_S + 0.3)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted twice" in err, err
    assert waited < 1, f"the second Ctrl-C took {waited:.1f}s to stop the run"
    assert no_temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no capsnet-interrupted.npz
    assert (tmp_path / "s.npz").read_bytes() == before  # whole: the epoch-1 checkpoint


@pytest.mark.parametrize("first, second, delay", [
    (signal.SIGTERM, signal.SIGTERM, 0.0),   # timeout: the child, then its process group
    (signal.SIGINT, signal.SIGINT, 0.0),     # one Ctrl-C seen twice, or a double tap
    (signal.SIGTERM, signal.SIGINT, 0.0),    # a scheduler's TERM and a terminal's INT at once
], ids=["term-term", "int-int", "term-int"])
# (a TERM repeated later is one request too: test_stop_flag_counts_only_a_later_sigint_...)
def test_a_repeated_stop_signal_is_one_request_not_the_second_ctrl_c(tmp_path, first, second,
                                                                      delay):
    rc, err, _, _ = _signal_twice(tmp_path, first, second, delay)
    word = "interrupted" if first == signal.SIGINT else "terminated"
    assert rc == 128 + first, err
    assert "twice" not in err and f"{word} at step" in err and "continue with:" in err, err
    if first == signal.SIGTERM:  # no user pressed Ctrl-C: "again" would be wrong
        assert "SIGTERM: finishing this step, then saving (Ctrl-C quits at once)" in err, err
    run = mc.load_checkpoint(tmp_path / "s.npz")
    assert run.step % run.steps_per_epoch() != 0  # saved mid-epoch, at the held step
    assert no_temp_files(tmp_path) == []


def test_sigterm_message_does_not_speak_of_ctrl_c_again(capsys):
    stop = mc.StopFlag()
    stop(signal.SIGTERM, None)
    err = capsys.readouterr().err
    assert "SIGTERM: finishing this step" in err and "again" not in err, err


def test_stop_flag_counts_only_a_later_sigint_as_the_second(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(mc.time, "monotonic", lambda: now[0])
    stop = mc.StopFlag()
    stop(signal.SIGTERM, None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        stop(signum, None)  # within the window: the same request
    now[0] += mc.StopFlag.REPEAT_S + 0.01
    stop(signal.SIGTERM, None)  # a repeated SIGTERM never counts
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)


def test_ctrl_c_before_training_is_not_reported_as_a_second_one(tmp_path, monkeypatch, capsys):
    """One Ctrl-C while the data loads (before main installs its handler): exit 130 at once,
    nothing written, and the message must not claim it was the second Ctrl-C."""
    def interrupted(args, cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(mc, "load_data", interrupted)
    rc, err = main_in(tiny("--save", tmp_path / "s.npz", "--metrics-json", tmp_path / "m.json"),
                      capsys)
    assert rc == 130
    assert "Traceback" not in err and "twice" not in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Divergence


def diverged_step(line: str) -> int:
    hit = re.search(r"diverged at step (\d+)", line)
    assert hit, line
    return int(hit.group(1))


def test_divergence_stops_with_a_clear_message_and_keeps_the_good_checkpoint(tmp_path):
    s, m = tmp_path / "s.npz", tmp_path / "m.json"
    assert main_in(tiny("--n-epochs", 1, "--save", s, "--metrics-json", m))[0] == 0
    before = snapshot(tmp_path)
    # --lr 1e30: Adam's first step moves every weight by ~1e30, the next forward pass overflows
    r = cli(tiny("--n-epochs", 3, "--resume", s, "--save", s, "--metrics-json", m, "--lr", 1e30),
            tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{PROG}: error:")][-1]
    assert 4 < diverged_step(line) <= 12          # a step after the checkpoint's 4
    assert "--lr" in line and f"last good checkpoint is {s}" in line
    assert snapshot(tmp_path) == before           # checkpoint and metrics byte-identical
    assert mc.load_checkpoint(s).epoch == 1


def test_divergence_error_is_one_line(tmp_path):
    """The NumPy overflow/invalid RuntimeWarnings of the diverging step must not reach stderr."""
    r = cli(tiny("--n-epochs", 2, "--lr", 1e30), tmp_path)
    assert r.returncode == 1
    line = error_line(r.stderr, allow=())
    assert diverged_step(line) == 2 and "--lr" in line


def test_divergence_in_epoch_one_names_no_checkpoint_and_writes_none(tmp_path):
    r = cli(tiny("--n-epochs", 2, "--lr", 1e30, "--save", tmp_path / "s.npz",
                 "--metrics-json", tmp_path / "m.json"), tmp_path)
    assert r.returncode == 1
    assert "diverged at step 2" in r.stderr and "checkpoint" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_divergence_names_only_a_checkpoint_that_exists(tmp_path, good_ckpt):
    """--resume A --save B, diverging before B is first written: the message must not send the
    user to B (which does not exist); A is the last good checkpoint."""
    a = tmp_path / "a.npz"
    shutil.copy(good_ckpt, a)
    b = tmp_path / "b.npz"
    r = cli(tiny("--n-epochs", 3, "--resume", a, "--save", b, "--lr", 1e30), tmp_path)
    assert r.returncode == 1, r.stderr
    named = re.search(r"last good checkpoint is (\S+)", r.stderr)
    if named:
        path = Path(named.group(1))
        assert path.exists(), f"the message names {path}, which does not exist"
        assert mc.load_checkpoint(path).epoch >= 1
    assert not b.exists()


# ----------------------------------------------------------------------------------------------
# Determinism and checkpoint/flags mismatch


def test_same_command_twice_gives_identical_metrics(tmp_path):
    outs = []
    for i in (1, 2):
        r = cli(tiny("--n-epochs", 2, "--metrics-json", tmp_path / f"m{i}.json",
                     "--save", tmp_path / f"s{i}.npz"), tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / f"m{i}.json").read_bytes())
    # byte-identical up to the "timing" key, which write_metrics puts last
    head = [o[:o.index(b'\n"timing":')] for o in outs]
    assert head[0] == head[1]
    # compact: one line per top-level key, not one per logged step (a long run's was 1-2 MB)
    doc = json.loads(outs[0])
    assert outs[0].count(b"\n") == len(doc) + 2 and b" " not in outs[0], outs[0][:300]
    assert len(doc["history"]["margin"]) == 8
    assert metrics_wo_timing(tmp_path / "m1.json") == metrics_wo_timing(tmp_path / "m2.json")
    assert_same_checkpoint(tmp_path / "s1.npz", tmp_path / "s2.npz")


def test_resume_with_other_architecture_names_every_mismatching_field(tmp_path, capsys, good_ckpt):
    (tmp_path / "m.json").write_text("{}")
    before = snapshot(tmp_path)
    rc, err = main_in(tiny("--resume", good_ckpt, "--conv1-channels", 8, "--decoder-h1", 32,
                           "--metrics-json", tmp_path / "m.json"), capsys)
    assert rc == 1
    line = error_line(err)
    assert "--conv1-channels (checkpoint 4, given 8)" in line
    assert "--decoder-h1 (checkpoint 16, given 32)" in line
    assert str(good_ckpt) in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Output paths are checked by a real write before any work

# /proc takes no new files, for root too, although os.access says it is writable
NO_WRITE = Path("/proc")


needs_proc = pytest.mark.skipif(not NO_WRITE.is_dir(), reason="needs Linux's /proc")


@needs_proc
def test_check_writable_probes_with_a_real_file_and_leaves_nothing(tmp_path):
    assert os.access(NO_WRITE, os.W_OK) == IS_ROOT  # what the permission bits say, for the record
    why = mc.check_writable(str(NO_WRITE / "x.npz"))
    assert why and "cannot write /proc/x.npz" in why and "not writable" in why, why
    assert mc.check_writable(str(tmp_path / "x.npz")) is None
    assert mc.check_writable(str(tmp_path)) == f"{tmp_path} is a directory"
    assert "does not exist" in mc.check_writable(str(tmp_path / "no" / "x.npz"))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


@needs_proc
@pytest.mark.parametrize("flag", ["--save", "--metrics-json"])
def test_unwritable_output_fails_before_training_in_one_line(tmp_path, flag):
    """A run of several seconds (16 steps of a bigger network) must not start at all."""
    args = tiny("--n-epochs", 1, flag, NO_WRITE / "x.out", n_train=512, batch_size=32,
                conv1_channels=16, primary_types=4)
    t0 = time.monotonic()
    r = cli(args, tmp_path, timeout=60)
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr, allow=())
    assert line == (f"{PROG}: error: {flag}: cannot write /proc/x.out: directory /proc is not "
                    "writable (No such file or directory)")
    assert r.stdout == "" and time.monotonic() - t0 < 10  # no epoch line: nothing trained
    assert list(tmp_path.iterdir()) == []


# An error names the flag the user typed (--n-epochs), never the Config field behind it (n_epochs)
INTERNAL_NAME = re.compile(r"\b(%s)\b" % "|".join(f.name for f in dataclasses.fields(mc.Config)
                                                    if "_" in f.name))


# ----------------------------------------------------------------------------------------------
# The bad-input matrix: every row is run as a real subprocess (real stderr, real exit code) from a
# fresh directory {d} holding a pre-existing metrics.json and ckpt.npz (a real checkpoint) plus
# whatever fixture files the row names (see FIXTURES). Every row must give exactly one error line
# on stderr (no usage block, no Traceback), a non-zero exit, and leave every file
# in {d} byte-identical, with nothing added. --metrics-json {d}/metrics.json and --save
# {d}/ckpt.npz are appended unless the row sets those flags itself, so a run that wrongly trains
# would overwrite them. The base flags are tiny(--n-epochs 2); a row's flags come after and win.


class Case(NamedTuple):
    id: str
    args: tuple
    expect: str              # substring of the error line (case-insensitive)
    should: str              # what should happen
    nonroot: bool = False    # cannot be simulated as root
    script: str = "multimnist_capsnet.py"


BIG = str(10 ** 12)


C = Case


MATRIX = [
    # -- --seed: 0 and 10**12 are valid seeds (not rows); negative must be refused up front
    C("seed-neg", ("--seed", "-1"), "--seed must be >= 0", "numpy refuses negative seeds"),
    C("seed-abc", ("--seed", "abc"), "invalid int value", "argparse rejects a non-integer"),
    C("seed-1e400", ("--seed", "1e400"), "invalid int value", "argparse rejects a float literal"),
    C("seed-nan", ("--seed", "nan"), "invalid int value", "argparse rejects nan for an int"),
    # -- --n-epochs
    C("n-epochs-0", ("--n-epochs", "0"), "--n-epochs must be positive", "validate refuses 0"),
    C("n-epochs-neg", ("--n-epochs", "-3"), "--n-epochs must be positive", "validate refuses < 0"),
    C("n-epochs-abc", ("--n-epochs", "abc"), "invalid int value", "argparse"),
    C("n-epochs-1e400", ("--n-epochs", "1e400"), "invalid int value", "argparse"),
    C("n-epochs-big", ("--n-epochs", BIG), "at most 100000", "refused: would never end"),
    # -- --n-train
    C("n-train-0", ("--n-train", "0"), "--n-train must be positive", "validate"),
    C("n-train-neg", ("--n-train", "-64"), "--n-train must be positive", "validate"),
    C("n-train-abc", ("--n-train", "abc"), "invalid int value", "argparse"),
    C("n-train-inf", ("--n-train", "inf"), "invalid int value", "argparse"),
    C("n-train-big", ("--n-train", BIG, "--batch-size", "16"), "too large",
      "refused before any allocation (over 1e7 training pairs)"),
    # -- --n-test
    C("n-test-0", ("--n-test", "0"), "--n-test must be positive", "validate"),
    C("n-test-neg", ("--n-test", "-1"), "--n-test must be positive", "validate"),
    C("n-test-abc", ("--n-test", "ten"), "invalid int value", "argparse"),
    C("n-test-1e400", ("--n-test", "1e400"), "invalid int value", "argparse"),
    C("n-test-big", ("--n-test", BIG), "too large", "refused before any allocation"),
    # -- --batch-size
    C("batch-0", ("--batch-size", "0"), "--batch-size must be positive", "validate"),
    C("batch-neg", ("--batch-size", "-16"), "--batch-size must be positive", "validate"),
    C("batch-abc", ("--batch-size", "abc"), "invalid int value", "argparse"),
    C("batch-1e400", ("--batch-size", "1e400"), "invalid int value", "argparse"),
    C("batch-big", ("--batch-size", BIG), "larger than --n-train", "validate"),
    C("batch-gt-n-train", ("--batch-size", "65"), "--batch-size (65) is larger than --n-train (64)",
      "a run with zero steps per epoch is refused"),
    # -- --lr (float)
    C("lr-0", ("--lr", "0"), "--lr must be a positive finite number", "validate"),
    C("lr-neg", ("--lr", "-1"), "--lr must be a positive finite number", "validate"),
    C("lr-neg-sci", ("--lr=-1e-3",), "--lr must be a positive finite number", "validate"),
    # argparse only takes '-1' / '-.5' as negative numbers: '--lr -1e-3' reads -1e-3 as a flag.
    # Still one clear line (exit 2); '--lr=-1e-3' (the row above) reaches validate.
    C("lr-neg-sci-space", ("--lr", "-1e-3"), "argument --lr: expected one argument", "argparse"),
    C("lr-abc", ("--lr", "fast"), "invalid float value", "argparse"),
    C("lr-nan", ("--lr", "nan"), "--lr must be a positive finite number", "validate"),
    C("lr-inf", ("--lr", "inf"), "--lr must be a positive finite number", "validate"),
    C("lr-neg-inf", ("--lr=-inf",), "--lr must be a positive finite number", "validate"),
    C("lr-1e400", ("--lr", "1e400"), "--lr must be a positive finite number",
      "1e400 parses as inf"),
    C("lr-big", ("--lr", "1e12"), "try a lower --lr",
      "finite, so allowed, but training diverges at step 2: Diverged, exit 1"),
    # -- --lr-decay (float)
    C("lr-decay-0", ("--lr-decay", "0"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-neg", ("--lr-decay", "-0.96"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-abc", ("--lr-decay", "x"), "invalid float value", "argparse"),
    C("lr-decay-nan", ("--lr-decay", "nan"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-inf", ("--lr-decay", "inf"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-1e400", ("--lr-decay", "1e400"), "--lr-decay must be a positive finite", "= inf"),
    C("lr-decay-huge", ("--lr-decay", "1e300", "--lr-decay-steps", "1"), "lr",
      "lr grows 1e300x per step: a one-line error about the learning rate (refused up front, or "
      "'diverged ... try a lower --lr'), never a Python OverflowError traceback"),
    # -- --lr-decay-steps (10**12 is valid: the lr is then constant)
    C("lr-decay-steps-0", ("--lr-decay-steps", "0"), "--lr-decay-steps must be positive",
      "validate"),
    C("lr-decay-steps-neg", ("--lr-decay-steps", "-5"), "--lr-decay-steps must be positive", ""),
    C("lr-decay-steps-abc", ("--lr-decay-steps", "abc"), "invalid int value", "argparse"),
    C("lr-decay-steps-1e400", ("--lr-decay-steps", "1e400"), "invalid int value", "argparse"),
    # -- --recon-weight (float; 0 is valid: no reconstruction loss)
    C("recon-neg", ("--recon-weight", "-0.0005"), "--recon-weight must be a finite number >= 0",
      ""),
    C("recon-abc", ("--recon-weight", "abc"), "invalid float value", "argparse"),
    C("recon-nan", ("--recon-weight", "nan"), "--recon-weight must be a finite number >= 0", ""),
    C("recon-inf", ("--recon-weight", "inf"), "--recon-weight must be a finite number >= 0", ""),
    C("recon-1e400", ("--recon-weight", "1e400"), "--recon-weight must be a finite number", "inf"),
    # -- --min-iou (float; 0 is valid: the paper's setting)
    C("ema-1", ("--ema", "1"), "--ema must be in [0, 1)", "an average that never moves"),
    C("ema-neg", ("--ema", "-0.5"), "--ema must be in [0, 1)", "validate"),
    C("ema-nan", ("--ema", "nan"), "--ema must be in [0, 1)", "nan fails 0 <= x < 1"),
    C("warmup-neg", ("--lr-warmup-steps", "-1"), "--lr-warmup-steps must be >= 0", "validate"),
    C("warmup-abc", ("--lr-warmup-steps", "abc"), "invalid int value", "argparse"),
    C("bias-init-nan", ("--bias-init", "nan"), "--bias-init must be a finite number", "validate"),
    C("bias-init-inf", ("--bias-init", "inf"), "--bias-init must be a finite number", "validate"),
    C("schedule-abc", ("--lr-schedule", "step"), "invalid choice", "argparse"),
    C("margin-abc", ("--margin-loss", "hinge"), "invalid choice", "argparse"),
    C("min-iou-neg", ("--min-iou", "-0.1"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-1", ("--min-iou", "1"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-big", ("--min-iou", "1e12"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-nan", ("--min-iou", "nan"), "--min-iou must be in [0, 1)", "nan fails 0 <= x < 1"),
    C("min-iou-1e400", ("--min-iou", "1e400"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-abc", ("--min-iou", "abc"), "invalid float value", "argparse"),
    C("min-iou-unreachable", ("--min-iou", "0.999"), "lower --min-iou",
      "valid range but no pair can reach it: make_pairs gives up after 1000 redraws"),
    # -- capacity flags
    C("conv1-0", ("--conv1-channels", "0"), "--conv1-channels must be positive", "validate"),
    C("conv1-neg", ("--conv1-channels", "-4"), "--conv1-channels must be positive", "validate"),
    C("conv1-abc", ("--conv1-channels", "abc"), "invalid int value", "argparse"),
    C("conv1-1e400", ("--conv1-channels", "1e400"), "invalid int value", "argparse"),
    C("conv1-big", ("--conv1-channels", BIG), "too large",
      "refused by validate, not a MemoryError traceback from allocating 589 TiB"),
    C("conv1-huge", ("--conv1-channels", str(10 ** 23)), "too large",
      "refused by validate, not numpy's 'Maximum allowed dimension exceeded' traceback"),
    C("types-0", ("--primary-types", "0"), "--primary-types must be positive", "validate"),
    C("types-neg", ("--primary-types", "-2"), "--primary-types must be positive", "validate"),
    C("types-abc", ("--primary-types", "abc"), "invalid int value", "argparse"),
    C("types-1e400", ("--primary-types", "1e400"), "invalid int value", "argparse"),
    C("types-big", ("--primary-types", BIG), "too large", "over 2e8 routing weights"),
    C("h1-0", ("--decoder-h1", "0"), "--decoder-h1 must be positive", "validate"),
    C("h1-neg", ("--decoder-h1", "-16"), "--decoder-h1 must be positive", "validate"),
    C("h1-abc", ("--decoder-h1", "abc"), "invalid int value", "argparse"),
    C("h1-1e400", ("--decoder-h1", "1e400"), "invalid int value", "argparse"),
    C("h1-big", ("--decoder-h1", BIG), "too large", "refused, not a MemoryError traceback"),
    C("h2-0", ("--decoder-h2", "0"), "--decoder-h2 must be positive", "validate"),
    C("h2-neg", ("--decoder-h2", "-16"), "--decoder-h2 must be positive", "validate"),
    C("h2-abc", ("--decoder-h2", "abc"), "invalid int value", "argparse"),
    C("h2-1e400", ("--decoder-h2", "1e400"), "invalid int value", "argparse"),
    C("h2-big", ("--decoder-h2", BIG), "too large", "refused, not a MemoryError traceback"),
    C("pdim-0", ("--primary-dim", "0"), "--primary-dim must be positive", "validate"),
    C("pdim-neg", ("--primary-dim", "-8"), "--primary-dim must be positive", "validate"),
    C("pdim-abc", ("--primary-dim", "abc"), "invalid int value", "argparse"),
    C("pdim-1e400", ("--primary-dim", "1e400"), "invalid int value", "argparse"),
    C("pdim-big", ("--primary-dim", BIG), "too large", "over 2e8 routing weights"),
    C("ddim-0", ("--digit-dim", "0"), "--digit-dim must be positive", "validate"),
    C("ddim-neg", ("--digit-dim", "-16"), "--digit-dim must be positive", "validate"),
    C("ddim-abc", ("--digit-dim", "abc"), "invalid int value", "argparse"),
    C("ddim-1e400", ("--digit-dim", "1e400"), "invalid int value", "argparse"),
    C("ddim-big", ("--digit-dim", BIG), "too large", "over 2e8 routing weights"),
    C("iters-0", ("--routing-iters", "0"), "--routing-iters must be positive", "validate"),
    C("iters-neg", ("--routing-iters", "-3"), "--routing-iters must be positive", "validate"),
    C("iters-abc", ("--routing-iters", "abc"), "invalid int value", "argparse"),
    C("iters-1e400", ("--routing-iters", "1e400"), "invalid int value", "argparse"),
    C("iters-big", ("--routing-iters", BIG), "--routing-iters must be at most 100",
      "refused up front (an upper bound), not a run that never finishes one step"),
    # -- --workers
    C("workers-0", ("--workers", "0"), "--workers must be positive", "validate"),
    C("workers-neg", ("--workers", "-2"), "--workers must be positive", "validate"),
    C("workers-abc", ("--workers", "two"), "invalid int value", "argparse"),
    C("workers-1e400", ("--workers", "1e400"), "invalid int value", "argparse"),
    C("workers-big", ("--workers", BIG), "--workers must be at most 64",
      "refused up front, not 10**12 threads"),
    # -- choices, unknown and malformed flags
    C("unknown-flag", ("--frobnicate",), "unrecognized arguments: --frobnicate", "argparse"),
    C("stray-positional", ("extra",), "unrecognized arguments: extra", "argparse"),
    C("missing-value", ("--lr",), "argument --lr: expected one argument",
      "the appended --metrics-json is not taken as the value"),
    C("bad-dtype", ("--dtype", "float16"), "invalid choice", "argparse choices"),
    C("bad-preset", ("--preset", "huge"), "invalid choice", "argparse choices"),
    C("bad-data", ("--data", "cifar"), "invalid choice", "argparse choices"),
    C("bad-routing-grad", ("--routing-grad", "none"), "invalid choice", "argparse choices"),
    C("bad-model", ("--model", "mlp"), "--model must name a registered model", "the registry"),
    C("cnn-unregistered", ("--model", "cnn"), "(cnn_baseline.py registers and trains it)",
      "the model module does not import the CNN: it says where it is"),
    C("cnn-width-0", ("--cnn-conv2", "0"), "--cnn-conv2 must be positive", "",
      script="cnn_baseline.py"),
    C("cnn-too-big", ("--cnn-fc", BIG), "too large", "over 2e8 weights", script="cnn_baseline.py"),
    # -- output paths (checked before any work)
    C("metrics-missing-dir", ("--metrics-json", "{d}/missing/m.json"), "does not exist",
      "the parent directory does not exist"),
    C("save-missing-dir", ("--save", "{d}/missing/s.npz"), "does not exist", "same for --save"),
    C("metrics-under-file", ("--metrics-json", "{d}/afile/m.json"), "afile",
      "the 'directory' is a regular file (unwritable even for root); the error names it"),
    C("save-under-file", ("--save", "{d}/afile/s.npz"), "afile", "same for --save"),
    C("save-is-dir", ("--save", "{d}"), "is a directory", "--save names a directory"),
    C("metrics-is-dir", ("--metrics-json", "{d}/ro"), "is a directory", "a directory"),
    C("metrics-read-only", ("--metrics-json", "{d}/ro/m.json"), "not writable",
      "0o555 directory: refused before training", True),
    C("save-read-only", ("--save", "{d}/ro/s.npz"), "not writable", "same for --save", True),
    # -- --resume with something that is not our checkpoint
    C("resume-missing", ("--resume", "{d}/nope.npz"), "does not exist", "named clearly"),
    C("resume-dir", ("--resume", "{d}/ro"), "not a readable", "a directory is not a checkpoint"),
    C("resume-random-npz", ("--resume", "{d}/random.npz"), "not a readable",
      "np.savez of random arrays: no meta (KeyError)"),
    C("resume-text", ("--resume", "{d}/text.npz"), "not a readable", "a text file named .npz"),
    C("resume-truncated", ("--resume", "{d}/half.npz"), "not a readable",
      "the first half of a real checkpoint (BadZipFile)"),
    C("resume-empty", ("--resume", "{d}/empty.npz"), "not a readable", "zero bytes (EOFError)"),
    C("resume-meta-not-json", ("--resume", "{d}/notjson.npz"), "not a readable", "JSONDecodeError"),
    C("resume-pickled", ("--resume", "{d}/pickled.npz"), "not a readable",
      "object array inside: refused (allow_pickle=False), never unpickled"),
    C("resume-bad-shape", ("--resume", "{d}/badshape.npz"), "parameter shapes do not match",
      "conv1_w of the wrong shape for the checkpoint's own config"),
    C("resume-bad-rng", ("--resume", "{d}/badrng.npz"), "not a readable",
      "meta rng_state is {}: rejected at load, not a ValueError traceback from inside train()"),
    C("resume-arch", ("--resume", "{d}/good.npz", "--conv1-channels", "8"),
      "--conv1-channels (checkpoint 4, given 8)", "architecture mismatch names the field"),
    C("resume-data-seed", ("--resume", "{d}/good.npz", "--seed", "1"),
      "--seed (checkpoint 0, given 1)",
      "a different data stream is a mismatch too"),
    C("resume-data-batch", ("--resume", "{d}/good.npz", "--batch-size", "8"),
      "--batch-size (checkpoint 16, given 8)",
      "batch size changes the stream of batches"),
    C("resume-data-source", ("--resume", "{d}/good.npz", "--data", "mnist"),
      "--data (checkpoint 'synthetic', given 'mnist')",
      "a synthetic run is not continued on MNIST"),
    C("resume-n-test", ("--resume", "{d}/good.npz", "--n-test", "16"),
      "--n-test (checkpoint 32, given 16)",
      "another test set would make the history's accuracies incomparable"),
    C("resume-bad-config", ("--resume", "{d}/badconfig.npz"), "saved config is invalid",
      "meta config with conv1_channels -4: refused at load, not a traceback from init_params"),
    # -- MNIST cache (network: every proxy and pip point at 127.0.0.1:9, so all sources fail fast)
    C("mnist-empty-cache", ("--data", "mnist", "--data-dir", "{d}/emptycache"),
      "MNIST is not in {d}/emptycache (4 of its 4 files missing or damaged); fetch it once with: "
      "python3 -m mnist_fetch --data-dir {d}/emptycache", "training never downloads: it names "
      "the command that does"),
    C("mnist-read-only-cache", ("--data", "mnist", "--data-dir", "{d}/ro"), "MNIST is not in",
      "read-only and empty: same single line, nothing written"),
    C("mnist-cache-is-file", ("--data", "mnist", "--data-dir", "{d}/afile"),
      "the MNIST cache {d}/afile is a file, not a directory", "said as such"),
    C("mnist-cache-under-file", ("--data", "mnist", "--data-dir", "{d}/afile/cache"),
      "MNIST is not in {d}/afile/cache", "its parent is a file: nothing to read, nothing made"),
    C("mnist-corrupt-cache", ("--data", "mnist", "--data-dir", "{d}/corruptcache"),
      "MNIST is not in", "four garbage files: noted, named, left as they were"),
]


def _checkpoint_variant(good: bytes, path: Path, edit):
    with np.load(io.BytesIO(good)) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_meta(key, value):
    def edit(arrays):
        meta = json.loads(str(arrays["meta"]))
        meta[key] = value
        arrays["meta"] = np.array(json.dumps(meta))
    return edit


def _edit_config(key, value):
    def edit(arrays):
        meta = json.loads(str(arrays["meta"]))
        meta["config"][key] = value
        arrays["meta"] = np.array(json.dumps(meta))
    return edit


FIXTURES = {  # file or directory under {d} -> how to make it from the good checkpoint's bytes
    "good.npz": lambda p, g: p.write_bytes(g),
    "random.npz": lambda p, g: np.savez(p, a=np.random.default_rng(0).standard_normal((3, 4)),
                                        b=np.arange(5)),
    "text.npz": lambda p, g: p.write_text("this is a text file, not a checkpoint\n"),
    "half.npz": lambda p, g: p.write_bytes(g[:len(g) // 2]),
    "empty.npz": lambda p, g: p.write_bytes(b""),
    "notjson.npz": lambda p, g: _checkpoint_variant(
        g, p, lambda a: a.__setitem__("meta", np.array("{not json"))),
    "pickled.npz": lambda p, g: _checkpoint_variant(
        g, p, lambda a: a.__setitem__("meta", np.array([{"format": 1}], dtype=object))),
    "badshape.npz": lambda p, g: _checkpoint_variant(
        g, p, lambda a: a.__setitem__("param.conv1_w", a["param.conv1_w"][:, :, :, :2])),
    "badrng.npz": lambda p, g: _checkpoint_variant(g, p, _edit_meta("rng_state", {})),
    "badconfig.npz": lambda p, g: _checkpoint_variant(g, p, _edit_config("conv1_channels", -4)),
    "afile": lambda p, g: p.write_text("a regular file where a directory is expected\n"),
    "emptycache": lambda p, g: p.mkdir(),
    "corruptcache": lambda p, g: (p.mkdir(), [(p / n).write_bytes(b"garbage " + n.encode())
                                              for n in mc.MNIST_FILES]),
}


def _argv(case: Case, d: Path) -> list[str]:
    args = [a.replace("{d}", str(d)) for a in case.args]
    if "--metrics-json" not in args:
        args += ["--metrics-json", str(d / "metrics.json")]
    if "--save" not in args:
        args += ["--save", str(d / "ckpt.npz")]
    return tiny("--n-epochs", 2) + args


def _run_case(case: Case, d: Path, good: bytes) -> dict:
    d.mkdir()
    (d / "metrics.json").write_text('{"pre-existing": true}\n')
    (d / "ckpt.npz").write_bytes(good)
    joined = " ".join(case.args)
    for name, make in FIXTURES.items():
        if "{d}/" + name in joined:
            make(d / name, good)
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    before = snapshot(d)
    t0 = time.monotonic()
    try:
        # one BLAS thread: these runs only ever fail, and several run at once
        r = cli(_argv(case, d), cwd=d, timeout=20, script=ROOT / case.script,
                OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", HINTON_MNIST_DIR=str(d / "default-cache"))
        out = dict(rc=r.returncode, stderr=r.stderr, timed_out=False)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        out = dict(rc=None, stderr=err, timed_out=True)
    out.update(seconds=time.monotonic() - t0, before=before, after=snapshot(d), dir=d)
    (d / "ro").chmod(0o755)
    return out


@pytest.fixture(scope="module")
def matrix_results(request, tmp_path_factory, good_ckpt):
    """Runs the selected matrix rows concurrently (subprocess start-up dominates), once."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input"
                and hasattr(item, "callspec")]
    todo = [c for c in selected if not (c.nonroot and IS_ROOT)]
    base = tmp_path_factory.mktemp("matrix")
    good = good_ckpt.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1))) as ex:
        futures = {c.id: ex.submit(_run_case, c, base / c.id, good) for c in todo}
        return {k: f.result() for k, f in futures.items()}


def test_matrix_ids_are_unique():
    assert len({c.id for c in MATRIX}) == len(MATRIX)


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_bad_input(case, matrix_results, tmp_path, good_ckpt):
    if case.nonroot and IS_ROOT:
        pytest.skip(ROOT_SKIP)
    res = matrix_results.get(case.id) or _run_case(case, tmp_path / "case", good_ckpt.read_bytes())
    assert not res["timed_out"], f"still running after 20 s (should: {case.should}):\n{res['stderr']}"
    assert res["rc"] not in (0, None), f"exit {res['rc']} (should: {case.should}):\n{res['stderr']}"
    line = error_line(res["stderr"], prog=case.script)
    expect = case.expect.replace("{d}", str(res["dir"]))
    assert expect.lower() in line.lower(), f"should: {case.should}\ngot: {line}"
    assert not INTERNAL_NAME.search(line), f"names a Config field, not its flag: {line}"
    assert res["after"] == res["before"], "a failed run changed, added or removed files"


# ----------------------------------------------------------------------------------------------
# A team of processes (mpi_train.py) plugs into main: its step, its agreed stop, one writer

class FakeTeam:
    """A team of one that behaves as rank `rank` of a larger one: its step is the threaded step,
    and it agrees to stop after `stop_after` steps (0: never)."""
    launcher = ("mpiexec", "-n", "2")

    def __init__(self, rank, stop_after=0):
        self.rank, self.stop_after, self.steps, self.signum = rank, stop_after, 0, 0

    def step(self, params, batch, cfg, workers, signum):
        self.steps += 1
        if self.steps == self.stop_after:
            self.signum = int(signal.SIGTERM)  # as if another rank had been sent it
        return mc.sharded_loss_and_grads(params, batch, cfg, workers)


def test_a_team_rank_other_than_0_writes_nothing_and_the_team_stop_is_obeyed(tmp_path, capsys):
    argv = [str(a) for a in tiny("--n-epochs", 3, "--save", tmp_path / "c.npz",
                                 "--metrics-json", tmp_path / "m.json")]
    assert mc.main(argv, team=FakeTeam(rank=1)) == 0
    assert list(tmp_path.iterdir()) == []          # rank 1 trained, and wrote nothing
    team = FakeTeam(rank=0, stop_after=6)           # a stop no signal here asked for
    assert mc.main(argv, team=team) == 128 + signal.SIGTERM and team.steps == 6
    err = capsys.readouterr().err
    assert "terminated at step 6" in err and "continue with:\n  mpiexec -n 2 python3 " in err
    assert mc.load_checkpoint(tmp_path / "c.npz").step == 6
