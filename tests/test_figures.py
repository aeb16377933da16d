"""The figure and GIF scripts end to end on a tiny synthetic run (no network, in-process)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import make_multimnist_capsnet_gif as gif
import multimnist_capsnet as mc
import visualize_multimnist_capsnet as viz

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--n-train", "64", "--n-test", "40", "--batch-size", "16",
        "--n-epochs", "1", "--quiet"]
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
    _, test = mc.make_data(run.cfg, mc.load_data(None, run.cfg))
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


@pytest.mark.parametrize("flags, expect", [
    (["--snapshot-every", "0"], "--snapshot-every: must be positive"),
    (["--snapshot-every", "x"], "--snapshot-every: invalid"),
    (["--fps", "0"], "--fps: must be positive"),
    (["--fps", "-6"], "--fps: must be positive"),
    (["--fps", "nan"], "--fps: must be positive"),
    (["--fps", "1e9"], "--fps must be at most 100"),
    (["--n-watch", "0"], "--n-watch: must be positive"),
    (["--n-watch", "41"], "--n-watch 41 exceeds the test pairs scored (40)"),
    (["--n-eval", "-1"], "--n-eval: must be positive"),
    (["--out", "{tmp}"], "is a directory"),
])
def test_gif_bad_flags_are_one_line_before_training(tmp_path, capsys, monkeypatch, flags, expect):
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(SystemExit) as e:
        gif.main(TINY + [f.replace("{tmp}", str(tmp_path)) for f in flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and expect in err[-1], err
    assert list(tmp_path.iterdir()) == []


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


def test_gif_frames_duration_loop(tmp_path, capsys):
    out = tmp_path / "anim.gif"
    # 4 steps, a frame every 3: steps 0, 3 and the end (4)
    assert gif.main(TINY + ["--snapshot-every", "3", "--fps", "5", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.n_frames == 3 and im.size == (800, 450)
        assert im.info["loop"] == 0 and im.info["duration"] == 200
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (3, 450, 800) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])  # training changed the picture
    assert out.stat().st_size < 5e6
    assert [p.name for p in tmp_path.iterdir()] == ["anim.gif"]


def test_gif_no_duplicate_end_frame(tmp_path, capsys):
    out = tmp_path / "anim.gif"
    assert gif.main(TINY + ["--snapshot-every", "2", "--out", str(out)]) == 0  # 0, 2, 4
    with Image.open(out) as im:
        assert im.n_frames == 3 and im.info["duration"] == 170  # 1000/6 to whole centiseconds


def test_gif_unwritable_out_errors_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(SystemExit) as e:
        gif.main(TINY + ["--out", str(tmp_path / "missing" / "a.gif")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
