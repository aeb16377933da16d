"""visualize_multimnist_capsnet.py: receptive fields, routing purity, segmentation, and every
figure from a fresh run, a checkpoint and a model file."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import mnist_fetch as mf
import multimnist_capsnet as mc
import visualize_multimnist_capsnet as viz


ROOT = Path(__file__).resolve().parents[1]


TINY = ["--data", "synthetic", "--n-train", "64", "--n-test", "40", "--batch-size", "16",
        "--n-epochs", "1", "--quiet"]


CFG = mc.Config(data="synthetic", n_train=64, n_test=40, batch_size=16, dtype="float64")


def synthetic_test(cfg: mc.Config) -> dict:
    return mc.make_data(cfg, mc.synthetic_mnist(np.random.default_rng(cfg.seed)))[1]


@pytest.fixture(scope="module")
def fresh():
    """Freshly initialised float64 parameters and their synthetic test pairs."""
    return mc.new_run(CFG).params, synthetic_test(CFG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run.npz"
    assert mc.main(TINY + ["--save", str(path)]) == 0
    return path


# ----------------------------------------------------------------------------------------------
# Where primary capsule i looks: perturb one input pixel, see which capsules change

@pytest.mark.parametrize("kernel, stride", [(9, 2), (5, 3)])
def test_receptive_field_centres_by_perturbation(kernel, stride):
    cfg = dataclasses.replace(CFG, kernel=kernel, primary_stride=stride, conv1_channels=8,
                              primary_types=4)
    params = mc.new_run(cfg).params
    g, t, cen = cfg.grid()[1], cfg.primary_types, viz.rf_centres(cfg)
    x = np.zeros((1, cfg.canvas, cfg.canvas), np.uint8)
    digits = np.zeros((1, 2), np.int64)
    base = next(viz.routing_batches(params, cfg, x, digits))[1]
    sees = lambda z: np.abs(cen - z) <= kernel - 1         # field [centre - K + 1, centre + K - 1]
    # the last pixel: unseen by every capsule with K 9, S 2 on 36 px, seen by the last with K 5, S 3
    for p, q in [(0, 0), (8, 8), (17, 20), (30, 3), (cfg.canvas - 1, cfg.canvas - 1)]:
        x1 = x.copy()
        x1[0, p, q] = 255
        ulen = next(viz.routing_batches(params, cfg, x1, digits))[1]
        changed = (ulen != base).reshape(g, g, t)          # i = (row * G + col) * T + t
        expect = sees(p)[:, None] & sees(q)[None, :]
        assert (changed == expect[..., None]).all(), (p, q)  # every type of a seeing cell changes
        if expect.any():  # the nearest centre's capsules are among those that change
            assert changed[np.abs(cen - p).argmin(), np.abs(cen - q).argmin()].all()
    assert sees(cfg.canvas - 1).any() == (kernel == 5)


def test_upsample_grid_paints_stride_patches():
    cfg = CFG
    g, s, cen = cfg.grid()[1], cfg.primary_stride, viz.rf_centres(cfg)
    grid = np.arange(1, g * g + 1, dtype=np.float64).reshape(g, g, 1)
    up = viz.upsample_grid(cfg, grid)[..., 0]
    assert up.shape == (cfg.canvas, cfg.canvas)
    assert (up[cen[:, None], cen[None, :]] == grid[..., 0]).all()   # each centre shows its cell
    values, counts = np.unique(up[up > 0], return_counts=True)
    assert len(values) == g * g and (counts == s * s).all()          # a stride x stride patch


def test_capsule_owner_reads_the_centre_pixel():
    cfg = CFG
    t, cen = cfg.primary_types, viz.rf_centres(cfg)
    a = np.zeros((1, cfg.canvas, cfg.canvas), np.uint8)
    b = a.copy()
    a[0, cen[0], cen[0]] = 200                     # a only: cell (0, 0)
    b[0, cen[1], cen[2]] = 255                     # b only: cell (1, 2)
    a[0, cen[3], cen[3]] = b[0, cen[3], cen[3]] = 255  # both: nobody's
    a[0, cen[4], cen[4]] = 100                     # faint (< half): nobody's
    a[0, cen[5] + 1, cen[5]] = 255                 # not on a centre pixel
    own = viz.capsule_owner(cfg, a, b).reshape(cfg.grid()[1], cfg.grid()[1], t)
    assert (own[0, 0] == 0).all() and (own[1, 2] == 1).all()
    assert (own == 0).sum() == t and (own == 1).sum() == t


# ----------------------------------------------------------------------------------------------
# Routing purity

def test_purity_is_a_tenth_at_iteration_one(fresh):
    params, test = fresh
    pur = viz.routing_purity(params, CFG, test)
    assert pur["n_a"] > 0 and pur["n_b"] > 0
    for key in ("a", "b", "mean", "cross_a", "cross_b", "cross"):
        assert pur[key].shape == (CFG.routing_iters,)
        assert abs(pur[key][0] - 0.1) < 1e-12, (key, pur[key][0])  # softmax of zero logits
        assert ((pur[key] >= 0) & (pur[key] <= 1)).all()
    assert np.abs(pur["a"][1:] - 0.1).max() > 1e-9                  # routing moved something
    np.testing.assert_allclose(pur["mean"], (pur["a"] + pur["b"]) / 2)


def test_purity_of_a_trained_run_float32(checkpoint):
    run = mc.load_checkpoint(checkpoint)
    pur = viz.routing_purity(run.params, run.cfg, synthetic_test(run.cfg))
    assert abs(pur["a"][0] - 0.1) < 1e-7 and abs(pur["b"][0] - 0.1) < 1e-7  # float32 1/10
    for key in ("a", "b"):
        assert ((pur[key] >= 0) & (pur["cross_" + key] >= 0)).all()
        assert (pur[key] + pur["cross_" + key] <= 1 + 1e-6).all()    # two of ten capsules' share


def test_purity_matches_a_direct_computation(fresh):
    params, test = fresh
    sub = {k: v[:5] for k, v in test.items()}
    pur = viz.routing_purity(params, CFG, sub)
    x = sub["x"].astype(np.float64)[..., None] / 255
    _, cache = mc.encode(params, x, CFG)
    u = np.linalg.norm(cache[4][0] * cache[4][3], axis=2)                 # |u| of u = s g
    c = cache[-1][1][-1][0]                                              # last iteration (N, J, I)
    own = viz.capsule_owner(CFG, sub["a"], sub["b"])
    ca = c[np.arange(5), sub["labels"][:, 0]]                            # (N, I)
    w = u * (own == 0)
    assert pur["a"][-1] == pytest.approx((w * ca).sum() / w.sum(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Segmentation by reconstruction

def test_assign_pixels_constructed_case():
    a = np.array([[0.0, 0.9, 0.9, 0.3, 0.0, 0.8]])   # px 1, 2: a only; px 3: faint; px 5: both
    b = np.array([[0.9, 0.0, 0.0, 0.0, 0.0, 0.8]])   # px 0: b only; px 4: no ink
    x = np.maximum(a, b)
    scored, right = viz.assign_pixels(x, a, b, a, b)            # reconstructions = the sources
    assert scored.tolist() == [[True, True, True, False, False, False]]
    assert (right == scored).all()                              # accuracy 1.0
    _, right = viz.assign_pixels(x, b, a, a, b)                 # swapped: every pixel wrong
    assert not right.any()
    _, right = viz.assign_pixels(x, np.full_like(a, 0.5), np.full_like(a, 0.5), a, b)
    assert not right.any()                                      # a tie is not right


def test_segmentation_accuracy_hand_built_and_fresh(fresh, monkeypatch):
    params, test = fresh
    seg = viz.segmentation_accuracy(params, CFG, test)
    assert 0 <= seg["accuracy"] <= 1 and seg["n_pixels"] > 0
    labels, n = test["labels"], len(test["x"])
    perfect = lambda p, v, digits: np.where((digits == labels[:, 0])[:, None],
                                            test["a"].reshape(n, -1), test["b"].reshape(n, -1)) / 255
    monkeypatch.setattr(viz, "decode", perfect)
    seg = viz.segmentation_accuracy(params, CFG, test)
    assert seg["accuracy"] == seg["acc_a"] == seg["acc_b"] == 1.0


# ----------------------------------------------------------------------------------------------
# The routing figure

def test_fig_routing_size_follows_iterations(tmp_path, fresh):
    cfg = dataclasses.replace(CFG, routing_iters=2)
    params, test = fresh                        # routing_iters has no parameters of its own
    viz.save_png(viz.fig_routing(params, cfg, test, np.arange(4)), tmp_path / "r.png")
    img = iio.imread(tmp_path / "r.png")
    assert img.shape[:2] == (600, 800)          # 4 rows; 3 + 2 iterations + excess columns
    assert img[..., :3].std() > 10
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


# ----------------------------------------------------------------------------------------------
# Every figure, from a fresh run, a checkpoint and a model file

FIGURES = ("training_curves.png", "reconstructions.png", "capsule_activations.png",
           "multimnist_examples.png", "paper_overlay.png", "capsule_dimensions.png", "routing.png")


def check_png(path, min_side=200):
    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert min(img.shape[:2]) >= min_side, img.shape
    assert img[..., :3].std() > 10, f"{path.name} looks blank"  # drawn, not a flat colour
    return img.shape


def test_visualize_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "new" / "viz"  # created, parents too
    assert viz.main(TINY + ["--outdir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES)  # no temp files left
    shapes = {name: check_png(out / name) for name in FIGURES}
    # figsize x dpi exactly (no tight bbox), so a layout change shows up here
    assert shapes["training_curves.png"][:2] == (380, 1300)
    assert shapes["capsule_dimensions.png"][:2] == (1100, 900)  # 16 rows of 11 decodings
    assert shapes["routing.png"][:2] == (850, 925)  # 6 composites x (3 + 3 iterations + excess)


def test_visualize_from_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "run.npz"
    assert mc.main(TINY + ["--save", str(ckpt)]) == 0
    capsys.readouterr()
    out = tmp_path / "viz"
    assert viz.main(["--data", "synthetic", "--quiet", "--checkpoint", str(ckpt),
                     "--outdir", str(out)]) == 0
    assert "epoch 1/1" not in capsys.readouterr().out  # drawn from the checkpoint, not retrained
    for name in FIGURES:
        check_png(out / name)
    assert viz.main(["--quiet", "--checkpoint", str(ckpt), "--n-epochs", "3", "--lr", "0.5",
                     "--outdir", str(tmp_path / "other")]) == 1   # a flag that would be ignored
    err = capsys.readouterr().err
    assert err == (f"visualize_multimnist_capsnet.py: error: --lr, --n-epochs: {ckpt} was trained "
                   "otherwise and is drawn as it was trained; drop the flag, or train without "
                   "--checkpoint\n") and not list((tmp_path / "other").glob("*.png"))


def test_visualize_a_model_file(tmp_path, capsys):
    """A model file (parameters and per-epoch history only, as models/ ships) draws every figure."""
    ckpt, model = tmp_path / "run.npz", tmp_path / "model.npz"
    assert mc.main(TINY + ["--save", str(ckpt)]) == 0
    mc.save_model(model, mc.load_checkpoint(ckpt), storage="float16")
    out = tmp_path / "viz"
    assert viz.main(["--quiet", "--checkpoint", str(model), "--outdir", str(out)]) == 0
    for name in FIGURES:
        check_png(out / name)


def test_a_checkpoints_figures_go_to_their_own_folder(tmp_path):
    """Without --outdir, a saved model's figures go to viz/NAME, never over the default run's
    committed figures in viz/ (the script run as a user runs it, from the checkout)."""
    assert mc.main(TINY + ["--save", str(tmp_path / "run.npz")]) == 0
    (tmp_path / "viz").mkdir()
    (tmp_path / "viz" / "training_curves.png").write_bytes(b"the default run's figure")
    r = subprocess.run([sys.executable, str(ROOT / "visualize_multimnist_capsnet.py"), "--quiet",
                        "--checkpoint", "run.npz"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "viz" / "training_curves.png").read_bytes() == b"the default run's figure"
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == ["run", "training_curves.png"]
    assert sorted(p.name for p in (tmp_path / "viz" / "run").iterdir()) == sorted(FIGURES)
    assert r.stdout.splitlines()[0] == f"wrote {Path('viz') / 'run' / FIGURES[0]}"
    assert viz.default_outdir(str(mc.MODEL_FILE)) == str(Path("viz") / "shipped")
    assert viz.default_outdir(None) == "viz"


def test_training_curves_show_final_values_and_weights_saved_mid_epoch(tmp_path):
    """The legend carries each curve's last value; weights saved after the last evaluation (a
    run stopped mid-epoch) get their own point and a title that says which step each is."""
    assert mc.main(TINY + ["--save", str(tmp_path / "run.npz")]) == 0
    run = mc.load_checkpoint(tmp_path / "run.npz")
    _, test = mc.make_data(run.cfg, mf.load_data(None, run.cfg))
    an = viz.analyse(run.eval_params, run.cfg, test)
    last = run.history["epochs"][-1]
    labels = lambda fig: fig.axes[2].get_legend_handles_labels()[1]
    fig = viz.fig_training_curves(run, an)
    assert f"both digits (set): {last['set_acc']:.3f}" in labels(fig)
    assert not any("weights drawn" in t for t in labels(fig))
    run.step += 1  # as if saved one step after the last evaluation
    fig = viz.fig_training_curves(run, an)
    assert (f"set, the weights drawn (step {run.step}): {(an['hits'] == 2).mean():.3f}"
            in labels(fig))
    assert f"the last at step {last['step']}" in fig.axes[2].get_title()


@pytest.mark.parametrize("kind", ["text", "truncated", "foreign-npz", "missing"])
def test_bad_checkpoint_is_one_line(tmp_path, capsys, kind):
    bad = tmp_path / "bad.npz"
    if kind == "text":
        bad.write_bytes(b"not a checkpoint")
    elif kind == "truncated":
        good = tmp_path / "good.npz"
        assert mc.main(TINY + ["--save", str(good)]) == 0
        bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    elif kind == "foreign-npz":
        np.savez(bad, weights=np.ones((3, 3)))
    capsys.readouterr()
    assert viz.main(["--checkpoint", str(bad), "--outdir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("visualize_multimnist_capsnet.py: error:") and "\n" not in err
    assert "bad.npz" in err and not any((tmp_path / "o").glob("*"))  # no figure, no temp file


@pytest.mark.parametrize("make_bad", ["file", "under_file", "read_only"])
def test_unwritable_outdir_errors_before_training(tmp_path, capsys, monkeypatch, make_bad):
    target = tmp_path / "x"
    if make_bad == "read_only":
        target.mkdir()
        target.chmod(0o555)
        if os.geteuid() == 0:  # root writes there anyway: make the probe write fail as it would
            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(viz.tempfile, "TemporaryFile", refuse)
    else:
        target.write_text("a file")
        target = target / "sub" if make_bad == "under_file" else target
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained before checking"))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        viz.main(TINY + ["--outdir", str(target)])
    assert e.value.code == 2 and time.perf_counter() - t0 < 2
    assert "error: --outdir" in capsys.readouterr().err
