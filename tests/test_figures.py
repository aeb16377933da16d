"""The figure and GIF scripts end to end on a tiny synthetic run (no network, in-process)."""
import os
import time

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import make_multimnist_capsnet_gif as gif
import multimnist_capsnet as mc
import visualize_multimnist_capsnet as viz

TINY = ["--data", "synthetic", "--n-train", "64", "--n-test", "40", "--batch-size", "16",
        "--n-epochs", "1", "--quiet"]
FIGURES = ("training_curves.png", "reconstructions.png", "capsule_activations.png",
           "multimnist_examples.png", "paper_overlay.png", "capsule_dimensions.png")


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
    assert shapes["training_curves.png"][1] > shapes["training_curves.png"][0]  # wide
    assert shapes["capsule_dimensions.png"][0] > shapes["capsule_dimensions.png"][1]  # 16 rows


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


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a checkpoint")
    assert viz.main(["--checkpoint", str(bad), "--outdir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("visualize_multimnist_capsnet.py: error:") and "\n" not in err


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
    with pytest.raises(SystemExit):
        gif.main(TINY + ["--fps", "0"])
