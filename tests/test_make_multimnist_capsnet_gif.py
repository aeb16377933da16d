"""make_multimnist_capsnet_gif.py: the GIF's frames, timing and loop, and its errors before any
training."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import make_multimnist_capsnet_gif as gif
import multimnist_capsnet as mc
from test_visualize_multimnist_capsnet import TINY


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
