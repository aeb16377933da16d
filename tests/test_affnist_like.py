"""The affNIST-like test set (affnist_like.py): the warp, its inverse, the parameters' ranges, the
ink on the canvas, the seed, the CLI."""
import numpy as np
import pytest

import affnist_like as al
import multimnist_capsnet as mc


@pytest.fixture(scope="module")
def digits():
    m = mc.synthetic_mnist(np.random.default_rng(0), n_train=10, n_test=300)
    return m["test_x"], m["test_y"]


def smooth_digits(rng, n):
    """n smooth 28x28 'digits': sums of Gaussian blobs (sigma 3 px) under a smooth window that is
    zero beyond 9 px from the centre, so that bilinear resampling loses almost nothing."""
    yy, xx = np.mgrid[0:28, 0:28]
    r = np.hypot(yy - 13.5, xx - 13.5)
    window = np.where(r < 9, np.cos(np.pi * r / 18) ** 2, 0)
    out = np.zeros((n, 28, 28))
    for i in range(n):
        for cy, cx in rng.uniform(10, 17, (4, 2)):
            out[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0 ** 2))
    out *= window
    return 255 * out / out.max(axis=(1, 2), keepdims=True)


def test_a_transform_followed_by_its_inverse_gives_back_the_digit():
    rng = np.random.default_rng(1)
    img = smooth_digits(rng, 50)
    params = al.draw(img.round().astype(np.uint8), rng)
    back = al.untransform(al.transform(img, params), params)
    inner = (slice(None), slice(3, 25), slice(3, 25))  # away from the border
    # two bilinear resamplings (one of them shrinking by up to 0.8) blur a little: measured
    # 0.078 and 0.0035 of full scale; the wrong inverse below is off by more than 0.2
    assert np.abs(back - img)[inner].max() < 0.1 * 255
    assert np.abs(back - img)[inner].mean() < 0.01 * 255
    wrong = dict(params, angle=-params["angle"])
    wrong["matrix"] = al.affine_matrix(-params["angle"], params["shear"], params["scale_x"],
                                       params["scale_y"])
    assert np.abs(al.untransform(al.transform(img, params), wrong) - img)[inner].max() > 0.2 * 255


def test_the_identity_with_a_whole_pixel_shift_places_the_digit_exactly(digits):
    x = digits[0][:5]
    ones = np.ones(5)
    params = dict(matrix=al.affine_matrix(0 * ones, 0 * ones, ones, ones),
                  centre=np.full((5, 2), 13.0), t=np.full((5, 2), 19.0))
    np.testing.assert_allclose(al.transform(x, params),
                               mc.shift_digits(x, np.zeros(5), None, 0, 40)["x"], atol=1e-9)


def test_affine_matrix_rotates_shears_and_scales():
    a = al.affine_matrix([90], [0], [1], [1])[0]
    np.testing.assert_allclose(a @ [1, 0], [0, 1], atol=1e-12)  # x to y: clockwise on screen
    np.testing.assert_allclose(al.affine_matrix([0], [0.2], [2], [3])[0], [[2, 0.6], [0, 3]])


def test_drawn_parameters_stay_in_their_ranges_and_the_ink_on_the_canvas(digits):
    s = al.make_set(*digits, seed=3)
    n = len(digits[0])
    assert s["x"].shape == (n, 40, 40) and s["x"].dtype == np.uint8
    np.testing.assert_array_equal(s["labels"], digits[1])
    for k, (lo, hi) in al.RANGES.items():
        assert s[k].shape == (n,) and lo <= s[k].min() and s[k].max() <= hi
        assert s[k].min() < lo + 0.2 * (hi - lo) and s[k].max() > hi - 0.2 * (hi - lo)
    # no ink reaches the outer pixel ring: none was cut off; and the ink kept its mass, det A
    edge = np.ones((40, 40), bool)
    edge[1:-1, 1:-1] = False
    assert s["x"][:, edge].max() == 0
    mass = s["x"].reshape(n, -1).sum(1) / digits[0].reshape(n, -1).sum(1)
    rel = np.abs(mass / (s["scale_x"] * s["scale_y"]) - 1)  # thin synthetic strokes: a few %
    assert rel.mean() < 0.02 and rel.max() < 0.15
    # the digits land all over the canvas
    boxes = mc.bounding_boxes(s["x"])
    assert boxes[:, 0].min() <= 4 and boxes[:, 1].max() >= 35


def test_the_same_seed_gives_the_same_set_and_another_a_different_one(digits):
    a, b = al.make_set(*digits, seed=5), al.make_set(*digits, seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = al.make_set(*digits, seed=6)
    assert (a["x"] != c["x"]).any(axis=(1, 2)).mean() > 0.9


def test_cli_writes_the_set_and_the_figure(tmp_path, monkeypatch, capsys, digits):
    monkeypatch.setattr(mc, "read_mnist", lambda d=None: dict(test_x=digits[0], test_y=digits[1]))
    out, fig = tmp_path / "s.npz", tmp_path / "f.png"
    assert al.main(["--n", "20", "--out", str(out), "--figure", str(fig)]) == 0
    with np.load(out) as z:
        assert z["x"].shape == (20, 40, 40) and int(z["seed"]) == 0
        np.testing.assert_array_equal(z["x"], al.make_set(digits[0][:20], digits[1][:20])["x"])
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "s.npz"]  # no temp files left


@pytest.mark.parametrize("argv, words", [
    ([], "nothing to do"), (["--out", "x.txt"], "expected a .npz"),
    (["--out", "/nonexistent-dir/x.npz"], "does not exist"), (["--n", "0", "--out", "a.npz"], "--n")])
def test_cli_bad_input_is_one_line_and_non_zero(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        al.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and words in err[-1]


def test_cli_missing_mnist_is_one_line(tmp_path, capsys):
    assert al.main(["--out", str(tmp_path / "s.npz"), "--data-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("affnist_like.py: error:")
