"""`capsnet_predict.py`: reading the user's images, the command, and the shipped model.

Nothing here needs MNIST: the command runs on stub models whose capsule lengths are set by hand,
and the shipped model is asked about digits that matplotlib's bundled font draws, as composites
and as photos of printed digits.
"""
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import cnn_baseline
import capsnet_predict as cp
import multimnist_capsnet as mc

ROOT = Path(__file__).resolve().parents[1]
def digit(rng, side=28) -> np.ndarray:
    """A uint8 blob on black as MNIST draws a digit: its ink box 20 px tall (MNIST's), at the
    centre."""
    img = np.zeros((side, side), np.uint8)
    img[side // 2 - 10:side // 2 + 10, side // 2 - 3:side // 2 + 3] = rng.integers(100, 256, (20, 6))
    return img


# ----------------------------------------------------------------------------------------------
# Reading an image: read_image, ink_on_black, to_canvas

def model_input(path, canvas=36, n_digits=1, background="auto") -> np.ndarray:
    """What predict feeds the model for the image at path."""
    x, _ = cp.ink_on_black(cp.read_image(path), background)
    return cp.to_canvas(x, canvas, n_digits)[0]


def test_a_28x28_digit_is_placed_at_the_canvas_centre(tmp_path):
    img = digit(np.random.default_rng(0))
    iio.imwrite(tmp_path / "d.png", img)
    x = model_input(tmp_path / "d.png")
    assert x.shape == (36, 36) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[4:32, 4:32], img)
    assert x.sum() == img.sum()
    np.testing.assert_array_equal(model_input(tmp_path / "d.png", canvas=28), img)  # as it is
    assert cp.to_canvas(img / 255, 28, 1)[1] == ("ink box 20 px, MNIST's: taken as it is, its "
                                                 "mass centred in 28x28")


def test_a_digit_at_mnists_scale_is_moved_by_whole_pixels_never_resampled():
    """MNIST's convention at any image size: an ink box 20 px long is only moved, by whole
    pixels, to centre its mass (by up to a pixel off is centred, as MNIST's own are)."""
    img = digit(np.random.default_rng(1))
    big = np.zeros((90, 120))
    big[7:35, 70:98] = img / 255                                        # off-centre, unscaled
    x, how = cp.to_canvas(big, 28, 1)
    np.testing.assert_array_equal(x, img)
    assert how.startswith("ink box 20 px, MNIST's: taken as it is, moved by ")
    off = np.zeros((28, 28), np.uint8)
    off[:, 3:] = img[:, :-3]                                            # 3 px right of centre
    x, how = cp.to_canvas(off / 255, 28, 1)
    np.testing.assert_array_equal(x, img)
    assert how.endswith("moved by +0, -3 px to centre its mass in 28x28"), how


@pytest.mark.parametrize("case", ["frame-filling", "small", "grey paper", "cut off"])
def test_an_image_off_mnists_convention_is_normalised_at_28x28_too(case):
    """A 28x28 image is no longer taken as it is because of its size: a digit filling the
    frame, a small one, one on grey paper, one whose centring would cut ink off are each
    scaled to MNIST's 20 px box and centred by mass."""
    x = np.zeros((28, 28))
    if case == "frame-filling":
        x[0:28, 10:18] = 1
    elif case == "small":
        x[10:22, 12:16] = 1
    elif case == "grey paper":
        x[:] = 0.3
        x[4:24, 12:16] = 1
    else:
        x[0:20, 0:4], x[19, 0:20] = 1, 1                                # an L in the corner
    img, how = cp.to_canvas(x, 28, 1)
    h, w, com = box_and_centre(img)
    assert max(h, w) == cp.DIGIT_BOX and "scaled" in how and cp.AS_MADE not in how, how
    if case != "cut off":                  # fit_digits keeps the box inside: off-centre mass
        np.testing.assert_allclose(com, 14, atol=0.5)


def test_two_digits_are_taken_as_made_only_on_the_models_own_canvas():
    pair = np.zeros((36, 36))
    pair[5:30, 8:30] = 0.8                                              # a 36x36 composite
    img, how = cp.to_canvas(pair, 36, 2)
    np.testing.assert_array_equal(img, np.round(255 * pair))
    assert how == "36x36, ink box 25 px: a composite as the model's were made, taken as it is"
    for x in (pair[4:32, 4:32], np.pad(pair, 10), pair[:, :30] * 0 + (pair[:, :30] > 0) * 0.8):
        img, how = cp.to_canvas(x, 36, 2)                            # 28x28, 56x56, 36x30
        assert cp.AS_MADE not in how and max(box_and_centre(img)[:2]) == cp.PAIR_BOX, how
    small = np.zeros((36, 36))
    small[12:24, 16:20] = 1                                             # 12 px: not MNIST's
    assert max(box_and_centre(cp.to_canvas(small, 36, 2)[0])[:2]) == cp.PAIR_BOX


def test_a_36x36_composite_is_taken_as_it_is(tmp_path):
    img = np.zeros((36, 36), np.uint8)
    img[5:30, 10:20] = 200
    np.save(tmp_path / "c.npy", img)
    np.testing.assert_array_equal(model_input(tmp_path / "c.npy", n_digits=2), img)


@pytest.mark.parametrize("form", ["grey-u8", "rgb-u8", "rgba-u8", "grey-u16", "float01", "float255",
                                  "black-on-white", "black-on-white-rgb", "bool"])
def test_forms_of_the_same_digit_read_alike(tmp_path, form):
    img = digit(np.random.default_rng(1))
    ink = img.astype(np.float64) / 255
    rgb = lambda g: np.stack([g] * 3, -1)
    arr = {"grey-u8": img, "rgb-u8": rgb(img),
           "rgba-u8": np.concatenate([rgb(img), np.full((28, 28, 1), 255, np.uint8)], -1),
           "grey-u16": img.astype(np.uint16) * 257, "float01": ink, "float255": ink * 255,
           "black-on-white": 255 - img, "black-on-white-rgb": rgb(255 - img),
           "bool": img > 0}[form]
    path = tmp_path / ("d.png" if arr.dtype == np.uint8 else "d.npy")
    if path.suffix == ".png":
        iio.imwrite(path, arr)
    else:
        np.save(path, arr)
    want = mc.place(img[None], np.zeros(1, int), np.zeros(1, int), 36)[0].astype(int)
    if form == "bool":
        want = np.where(want > 0, 255, 0)
    np.testing.assert_allclose(model_input(path).astype(int), want, atol=1)


@pytest.mark.parametrize("background", ["black", "white"])
def test_a_jpeg_reads_like_its_png_up_to_compression(tmp_path, background):
    img = digit(np.random.default_rng(4))
    iio.imwrite(tmp_path / "d.jpg", img if background == "black" else 255 - img, quality=95)
    x = model_input(tmp_path / "d.jpg").astype(int)
    want = mc.place(img[None], np.zeros(1, int), np.zeros(1, int), 36)[0].astype(int)
    assert np.abs(x - want).mean() < 3 and np.abs(x - want).max() < 80  # JPEG's ringing at edges


def test_background_flag_forces_the_inversion(tmp_path):
    img = digit(np.random.default_rng(2))
    np.save(tmp_path / "d.npy", img)
    np.save(tmp_path / "w.npy", 255 - img)
    auto = model_input(tmp_path / "d.npy")
    np.testing.assert_array_equal(model_input(tmp_path / "w.npy", background="white"), auto)
    np.testing.assert_array_equal(model_input(tmp_path / "d.npy", background="black"), auto)
    x = cp.read_image(tmp_path / "d.npy")
    assert cp.ink_on_black(x, "auto")[1] is False and cp.ink_on_black(x, "black")[1] is False
    forced, inverted = cp.ink_on_black(x, "white")
    assert inverted and np.array_equal(forced, 1 - x)


def test_a_bold_digit_filling_its_frame_keeps_its_polarity():
    """Ink covering most of the frame is the majority of the pixels; the frame itself shows the
    paper, so white on black stays, black on white is inverted (was: the other way round)."""
    x = np.zeros((28, 28))
    x[0:28, 2:26] = 1
    x[6:22, 9:19] = 0                                          # a bold 0: 66% of the pixels ink
    assert (x > 0.5).mean() > 0.5
    assert cp.ink_on_black(x)[1] is False and cp.ink_on_black(1 - x)[1] is True
    np.testing.assert_array_equal(cp.ink_on_black(1 - x)[0], x)
    grey = 0.6 + 0.1 * np.random.default_rng(0).random((28, 28))   # uneven paper, dark ink
    grey[8:20, 12:15] = 0.05
    assert cp.ink_on_black(grey)[1] is True                    # the minority rule still reads it


def test_a_small_image_takes_the_path_of_the_same_digit_drawn_larger():
    """fit_digits finds a small image's ink at FINE_SIDE: a digit filling 28x28 comes out as
    the same digit drawn at 64x64 does (before: binarised on the 28-px grid, a staircase)."""
    rng = np.random.default_rng(3)
    d = np.zeros((28, 28))
    r, c = np.mgrid[:28, :28]
    for _ in range(3):                                         # three random thick strokes
        (r0, c0), (r1, c1) = rng.uniform(1, 27, (2, 2))
        t = np.clip(((r - r0) * (r1 - r0) + (c - c0) * (c1 - c0)) /
                    ((r1 - r0) ** 2 + (c1 - c0) ** 2), 0, 1)
        d = np.maximum(d, np.clip(2.2 - np.hypot(r - r0 - t * (r1 - r0), c - c0 - t * (c1 - c0)),
                                  0, 1))
    small, how = cp.fit_digits(d, 28, 1)
    large = cp.fit_digits(np.clip(cp.resize(d, 64, 64), 0, 1), 28, 1)[0]
    assert how.startswith("enlarged to 128x128; ")
    gap = np.abs(small / 255 - large / 255).mean()
    assert gap < 0.02, gap


def bar(h: int, w: int, top: int, left: int, side=(90, 120)) -> np.ndarray:
    """A white h x w rectangle on black at (top, left), float in [0, 1]."""
    x = np.zeros(side)
    x[top:top + h, left:left + w] = 1
    return x


def box_and_centre(img: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Height and width of the nonzero pixels' box, and the centre of mass (row, col)."""
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    w = img.astype(np.float64)
    com = np.array([(w.sum(1) * (np.arange(len(w)) + 0.5)).sum(),
                    (w.sum(0) * (np.arange(len(w)) + 0.5)).sum()]) / w.sum()
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, com


@pytest.mark.parametrize("n_digits, long_side", [(1, cp.DIGIT_BOX), (2, cp.PAIR_BOX)])
@pytest.mark.parametrize("canvas", [28, 36])
def test_any_size_is_scaled_to_mnists_box_keeping_its_aspect_and_centred_by_mass(canvas, n_digits,
                                                                                 long_side):
    x = bar(60, 15, top=20, left=80)  # off-centre, 4:1
    img, how = cp.fit_digits(x, canvas, n_digits)
    h, w, com = box_and_centre(img)
    assert img.shape == (canvas, canvas) and (h, w) == (long_side, round(long_side / 4))
    np.testing.assert_allclose(com, canvas / 2, atol=0.5)
    assert img.max() == 255 and f"enlarged to 128x96; ink >= 0.50 above the background, its box " \
        f"15x60 at row 20, col 80 scaled x{long_side / 60:.3g} to {w}x{h}, centred by mass in " \
        f"{canvas}x{canvas}" == how  # the box in the image's own pixels, found at 128 px


def test_a_digit_scaled_up_and_back_down_comes_back():
    """A 28x28 MNIST-like digit drawn 4x larger on a 150x130 image, normalised, matches the digit
    normalised at its own size: the resampling loses little."""
    small = np.zeros((28, 28))
    small[4:24, 10:18] = 1
    small[4:8, 6:22] = 1                                                # a 'T', 20 tall
    big = np.zeros((130, 150))
    big[10:122, 30:142] = cp.resize(small, 112, 112)
    a = cp.fit_digits(big, 28, 1)[0].astype(int)
    b = cp.fit_digits(small, 28, 1)[0].astype(int)
    assert box_and_centre(a)[:2] == box_and_centre(b)[:2] == (cp.DIGIT_BOX, 16)
    assert ((a > 127) == (b > 127)).mean() > 0.97                       # only edges differ


def test_the_resize_matrices_keep_the_mean_and_skip_no_pixel():
    for n_in, n_out in ((100, 20), (20, 100), (37, 36), (5, 5)):
        m = cp._resize_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(1), 1)
        assert (m.sum(0) > 0).all() or n_out > n_in
    np.testing.assert_allclose(cp.resize(np.eye(5), 5, 5), np.eye(5))


def photo(ink: np.ndarray, rng, noise=0.05) -> np.ndarray:
    """ink (H, W) in [0, 1] as dark ink on light-grey paper lit unevenly (brighter to the right,
    darker in the corners), in colour, with noise in every pixel."""
    h, w = ink.shape
    r, c = np.mgrid[:h, :w] / [[[h]], [[w]]] - 0.5
    paper = 0.75 + 0.15 * c - 0.3 * (r * r + c * c)
    lum = paper * (1 - 0.8 * ink) + rng.normal(0, noise, ink.shape)
    return np.round(255 * np.clip(lum[..., None] * [1.05, 1.0, 0.9], 0, 1)).astype(np.uint8)


@pytest.mark.parametrize("kind", ["black", "white", "grey", "noisy-grey-jpeg", "faint-specks"])
def test_an_image_without_ink_has_none(tmp_path, kind):
    rng = np.random.default_rng(5)
    x = {"black": np.zeros((90, 120)), "white": np.ones((90, 120)),
         "grey": np.full((36, 36), 0.6), "noisy-grey-jpeg": None,
         "faint-specks": (rng.random((28, 28)) < 0.02) * 0.15}[kind]
    if x is None:
        iio.imwrite(tmp_path / "p.jpg", photo(np.zeros((90, 120)), rng, noise=0.08), quality=70)
        x = cp.read_image(tmp_path / "p.jpg")
    ink, _ = cp.ink_on_black(x)
    assert cp.to_canvas(ink, 36, 2) == (None, "no ink")


def test_faint_ink_on_noisy_paper_is_found_and_stretched_to_white(tmp_path):
    rng = np.random.default_rng(6)
    iio.imwrite(tmp_path / "p.jpg", photo(bar(50, 12, 20, 50) * 0.4, rng), quality=70)
    ink, inverted = cp.ink_on_black(cp.read_image(tmp_path / "p.jpg"))
    img, _ = cp.to_canvas(ink, 36, 1)
    assert inverted and box_and_centre(img)[0] == 20 and box_and_centre(img)[1] in (4, 5)
    assert np.percentile(img[img > 0], 90) > 160  # twice its contrast on the paper (0.32)
    assert (img > 0).sum() < 2 * 20 * 5                                 # the noise did not come


BAD = {
    "nan": (lambda p: np.save(p.with_suffix(".npy"), np.full((28, 28), np.nan)), ".npy", "NaN"),
    "empty-file": (lambda p: p.with_suffix(".png").write_bytes(b""), ".png", "not a readable image"),
    "empty-array": (lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 28))), ".npy", "is empty"),
    "text": (lambda p: p.with_suffix(".png").write_text("not an image"), ".png", "not a readable"),
    "missing": (lambda p: None, ".png", "does not exist"),
    "directory": (lambda p: p.with_suffix(".png").mkdir(), ".png", "not a readable image"),
    "3-d": (lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 28, 28))), ".npy", "has shape"),
    "negative": (lambda p: np.save(p.with_suffix(".npy"), -np.ones((28, 28))), ".npy", "outside"),
    "too-bright": (lambda p: np.save(p.with_suffix(".npy"), np.full((28, 28), 300)), ".npy",
                   "outside 0..255"),
    "strings": (lambda p: np.save(p.with_suffix(".npy"), np.full((28, 28), "a")), ".npy",
                "are not numbers"),
    "pickled": (lambda p: np.save(p.with_suffix(".npy"), np.array([{}], dtype=object)), ".npy",
                "not a readable image"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_images_are_a_clear_error_naming_the_file(tmp_path, kind):
    make, suffix, expect = BAD[kind]
    path = (tmp_path / "img").with_suffix(suffix)
    make(path)
    with pytest.raises(mc.CapsNetError, match=expect) as e:
        cp.read_image(path)
    assert str(path) in str(e.value)


def test_see_through_pixels_read_as_white_paper(tmp_path):
    """A drawing app's PNG, black ink on see-through black (RGBA, or grey and alpha), reads as
    that ink on white paper, and predict names its digit; an opaque alpha changes nothing."""
    ink = digit(np.random.default_rng(3))
    clear = np.zeros((28, 28), np.uint8)
    iio.imwrite(tmp_path / "rgba.png", np.stack([clear, clear, clear, ink], -1))
    iio.imwrite(tmp_path / "la.png", np.stack([clear, ink], -1))
    for name in ("rgba.png", "la.png"):
        np.testing.assert_allclose(cp.read_image(tmp_path / name), 1 - ink / 255, atol=1e-12)
    np.testing.assert_array_equal(model_input(tmp_path / "la.png", canvas=28), ink)
    rgb = np.random.default_rng(4).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    iio.imwrite(tmp_path / "opaque.png", np.dstack([rgb, np.full((28, 28), 255, np.uint8)]))
    np.testing.assert_array_equal(cp.read_image(tmp_path / "opaque.png"),
                                  cp.read_image(tmp_path / "rgb.png"))


# ----------------------------------------------------------------------------------------------
# The command

def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "capsnet_predict.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def stub_model(path, canvas: int, lengths: dict) -> Path:
    """A model file whose digit capsules have the given lengths {digit: length} whatever the
    image (votes zeroed, each length set by its capsule's bias), at canvas 28 or 36."""
    cfg = mc.Config(task="mnist" if canvas == 28 else "multimnist", canvas=canvas,
                    max_shift=(canvas - 28) // 2, digit_bias=True,
                    conv1_channels=4, primary_types=2, decoder_h1=16, decoder_h2=16)
    run = mc.new_run(cfg)
    run.params["digit_w"][:] = 0
    for k, length in lengths.items():
        run.params["digit_b"][k, 0] = np.sqrt(length / (1 - length))  # squash: n^2 / (1 + n^2)
    mc.save_model(path, run)
    return path


def test_answers_name_only_capsules_of_at_least_half(tmp_path):
    s = np.full(10, 0.1)
    s[[9, 4]] = 0.95, 0.45
    assert cp.digits_found(s, 2) == [9] and cp.digits_found(s, 1) == [9]
    assert cp.answer(s, 2) == "9  (capsule length 0.95; no second digit: the next, 4, is 0.45)"
    s[4] = 0.5
    assert cp.answer(s, 2) == "9 and 4  (capsule lengths 0.95, 0.50)"
    assert cp.answer(s, 1) == "9  (capsule length 0.95)"
    s[9] = 0.3
    assert cp.answer(s, 2) == "4  (capsule length 0.50; no second digit: the next, 9, is 0.30)"
    s[4] = 0.49
    assert cp.answer(s, 2) == ("no digit found  (the longest capsule length, 4's, is 0.49; a "
                               "digit needs 0.50)")


@pytest.mark.parametrize("canvas, want", [(36, "3 and 5  (capsule lengths 0.97, 0.80)"),
                                          (28, "3  (capsule length 0.97)")])
def test_a_one_digit_model_answers_one_digit_and_a_two_digit_model_two(tmp_path, canvas, want):
    ckpt = stub_model(tmp_path / "m.npz", canvas, {3: 0.97, 5: 0.8})
    iio.imwrite(tmp_path / "a.png", digit(np.random.default_rng(0), 28))
    iio.imwrite(tmp_path / "b.png", digit(np.random.default_rng(1), 50))
    r = cli("--checkpoint", ckpt, "a.png", "b.png", "--digits", "2" if canvas == 36 else "auto",
            cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == f"a.png: {want}\nb.png: {want}\n", r.stderr
    if canvas == 28:
        r = cli("--checkpoint", ckpt, "--digits", "2", "a.png", cwd=tmp_path)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
        assert "--digits 2: " in r.stderr and "is a one-digit model" in r.stderr


def test_a_weak_capsule_is_no_digit(tmp_path):
    ckpt = stub_model(tmp_path / "m.npz", 36, {6: 0.45})
    iio.imwrite(tmp_path / "a.png", digit(np.random.default_rng(0), 36))
    r = cli("--checkpoint", ckpt, "a.png", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("a.png: no digit found  (the longest "
                                                     "capsule length, 6's, is 0.45")


def test_the_model_is_chosen_by_the_digits_an_image_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "MNIST_MODEL_FILE", tmp_path / "capsnet-mnist.npz")
    choose = cp.choose_model
    assert choose(1, None) == mc.MODEL_FILE                   # no MNIST model: the pairs'
    assert choose(2, None) == mc.MODEL_FILE
    (tmp_path / "capsnet-mnist.npz").touch()
    assert choose(1, None) == cp.MNIST_MODEL_FILE and choose(2, None) == mc.MODEL_FILE
    assert choose(1, "m.npz") == choose(2, "m.npz") == Path("m.npz")


def test_a_broken_counter_file_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """A counter file that is no zip, or a zip of other arrays, stops predict with one line
    naming it, never a traceback; --digits 1 does not need it."""
    iio.imwrite(tmp_path / "five.png", font_digit(5)[4:32, 4:32])
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    monkeypatch.chdir(tmp_path)
    for name, why in (("junk.npz", "is not a readable counter (ValueError)"),
                      ("other.npz", "not a counter (count train writes one)")):
        monkeypatch.setattr(cp, "COUNT_MODEL_FILE", tmp_path / name)
        assert cp.main(["five.png"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err.startswith(f"capsnet_predict.py: error: {tmp_path / name}") and why in err
    assert cp.main(["--digits", "1", "five.png"]) == 0


def test_the_count_and_the_answer_read_each_image_once(tmp_path, monkeypatch, capsys):
    """The capsules the count read are the answer's: one forward pass of each shipped model an
    image (the count weighs both), the same line as --digits 1 gives."""
    (a, b), (ya, xa, yb, xb) = SHIPPED_CASES[0]
    pair = np.minimum(font_digit(a, xa, ya).astype(int) + font_digit(b, xb, yb), 255)
    iio.imwrite(tmp_path / "pair.png", pair.astype(np.uint8))
    iio.imwrite(tmp_path / "five.png", font_digit(5)[4:32, 4:32])
    canvases, predict = [], mc.predict
    monkeypatch.setattr(mc, "predict", lambda params, cfg, x, *more: (
        canvases.append(cfg.canvas), predict(params, cfg, x, *more))[1])
    monkeypatch.chdir(tmp_path)
    assert cp.main(["five.png", "pair.png"]) == 0
    assert canvases == [28, 36, 28, 36]
    auto = capsys.readouterr().out.splitlines()
    assert cp.main(["--digits", "1", "five.png"]) == 0
    assert auto[0] == capsys.readouterr().out.strip() and auto[0].startswith("five.png: 5  (")


def test_predict_reads_any_image_and_draws_what_it_did(tmp_path):
    """The shipped models, with no flag, on a composite, a 28x28 digit, a large photo of a digit
    on paper, a blank page: each counted, read, and drawn in one titled row."""
    rng = np.random.default_rng(3)
    (a, b), (ya, xa, yb, xb) = SHIPPED_CASES[0]
    pair = np.minimum(font_digit(a, xa, ya).astype(int) + font_digit(b, xb, yb), 255)
    iio.imwrite(tmp_path / "pair.png", pair.astype(np.uint8))
    iio.imwrite(tmp_path / "five.png", font_digit(5)[4:32, 4:32])
    iio.imwrite(tmp_path / "photo.jpg", photo(big_font_digit(3), rng), quality=70)
    iio.imwrite(tmp_path / "blank.jpg", photo(np.zeros((300, 400)), rng), quality=70)
    r = cli("--verbose", "--out", "p.png", "pair.png", "five.png", "photo.jpg", "blank.jpg",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    heads = [ln for ln in r.stdout.splitlines() if not ln.startswith(" ")]
    assert heads[0].startswith(("pair.png: 2 and 3  (", "pair.png: 3 and 2  ("))
    assert heads[1].startswith("five.png: 5  (capsule length ")
    assert heads[2].startswith("photo.jpg: 3  (capsule length ")
    assert heads[3] == "blank.jpg: no digit found  (no ink)" and heads[4] == "wrote p.png"
    assert "  120x90, inverted; enlarged to 128x96; ink >= " in r.stdout and "centred by mass in 28x28" in r.stdout
    assert "  28x28; ink box 19 px, MNIST's: taken as it is, moved by +3, +0 px to centre its " \
        "mass in 28x28; model capsnet-mnist.npz, 1 digit (auto: the count's score -" in r.stdout
    assert "model capsnet-multimnist.npz, 2 digits (auto: the count's score +" in r.stdout
    assert r.stdout.count("  all ten: ") == 3
    pair_model = cli("--verbose", "--checkpoint", mc.MODEL_FILE, "five.png", cwd=tmp_path)
    assert "five.png: 5  (capsule length " in pair_model.stdout, pair_model.stdout
    assert "MNIST's: taken as it is, moved by +3, +0 px to centre its mass in 36x36; model " \
        "capsnet-multimnist.npz, 1 digit (auto: " in pair_model.stdout
    fig = iio.imread(tmp_path / "p.png")
    assert fig.ndim == 3 and fig.shape[0] > 4 * 140 and fig.shape[1] > 4 * 140


def rows_for_figure():
    """Three rows for the --out figure: two digits found, one counted, a white page."""
    two = cp.Row("pair.png", np.zeros((36, 36)), np.zeros((36, 36), np.uint8), [2, 3],
                 [0.97, 0.61], [np.full(36 * 36, 0.5)] * 2, "capsnet-multimnist.npz", 2)
    one = cp.Row("a/very/long/path/to/a/folder/five.png", np.zeros((90, 120)),
                 np.zeros((28, 28), np.uint8), [5], [0.98], [np.zeros(28 * 28)],
                 "capsnet-mnist.npz", 1)
    white = cp.Row("white.png", np.ones((50, 50)), None, [], [], [], "capsnet-mnist.npz", 1)
    return [two, one, white]


def test_the_out_figure_explains_itself():
    """Column titles; under each image its size, the model, each digit and capsule length, or
    why there is none; the file name beside its row; a grey frame round every image."""
    fig = cp.prediction_figure(rows_for_figure())
    axes = np.array(fig.axes).reshape(3, 4)
    assert [a.get_title() for a in axes[0]] == list(cp.COLUMNS)
    assert [a.get_title() for a in axes[1:].ravel()] == [""] * 8
    under = [[a.get_xlabel() for a in row] for row in axes]
    assert under == [["36x36", "capsnet-multimnist, 36x36", "2, length 0.97", "3, length 0.61"],
                     ["120x90", "capsnet-mnist, 28x28", "5, length 0.98", "one digit counted"],
                     ["50x50", "no ink", "", ""]]
    assert [row[0].get_ylabel() for row in axes] == ["pair.png", "…th/to/a/folder/five.png",
                                                     "white.png"]
    for a in axes.ravel():
        assert all(sp.get_visible() and sp.get_linewidth() == 0.8 for sp in a.spines.values())
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    box = axes[2, 0].get_window_extent()                          # the white page's cell
    row = fig.canvas.get_width_height()[1] - int(box.y0 + box.height / 2)
    line = rgb[row, int(box.x0) - 2:int(box.x1) + 3]
    assert (line == 0x99).all(1).any() and (line == 255).all(1).sum() > box.width / 2


def test_predict_photo_of_one_digit(tmp_path):
    """Photos of printed digits, --digits 1: the shipped model names each one, also in a
    1200x900 photo (shrunk first)."""
    rng = np.random.default_rng(7)
    for d in (2, 5):
        iio.imwrite(tmp_path / f"{d}.jpg", photo(big_font_digit(d), rng), quality=70)
    iio.imwrite(tmp_path / "7.jpg", photo(cp.resize(big_font_digit(7), 900, 1200), rng),
                quality=80)
    r = cli("--digits", "1", "--verbose", "2.jpg", "5.jpg", "7.jpg", cwd=tmp_path)
    heads = [ln.split("  ")[0] for ln in r.stdout.splitlines() if not ln.startswith(" ")]
    assert r.returncode == 0 and heads == ["2.jpg: 2", "5.jpg: 5", "7.jpg: 7"], r.stdout
    assert "  1200x900, inverted; shrunk to 256x192; ink >= " in r.stdout


def test_one_bad_file_among_good_ones_is_one_line_and_the_rest_are_answered(tmp_path):
    ckpt = stub_model(tmp_path / "m.npz", 36, {3: 0.97, 5: 0.8})
    iio.imwrite(tmp_path / "a.png", digit(np.random.default_rng(0), 36))
    iio.imwrite(tmp_path / "c.png", digit(np.random.default_rng(1), 36))
    (tmp_path / "t.png").write_text("not an image")
    r = cli("--checkpoint", ckpt, "a.png", "missing.png", "t.png", "c.png", "--out", "p.jpg",
            "--digits", "2", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["a.png: 3 and 5  (capsule lengths 0.97, 0.80)",
                                     "c.png: 3 and 5  (capsule lengths 0.97, 0.80)", "wrote p.jpg"]
    assert [ln[:ln.find("(") + 1 or None] for ln in r.stderr.splitlines()] == [
        "capsnet_predict.py: error: missing.png does not exist",
        "capsnet_predict.py: error: t.png is not a readable image ("]
    assert (tmp_path / "p.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as its suffix says
    assert iio.imread(tmp_path / "p.jpg").shape[0] == round(100 * (2 * (cp.FIGURE_CELL + 0.25) + 0.35))


@pytest.mark.parametrize("out, expect", [("p.xyz", "no image format for the suffix '.xyz'"),
                                         ("p", "give it a suffix that names an image format")])
def test_predict_refuses_an_out_format_before_any_work(tmp_path, out, expect):
    iio.imwrite(tmp_path / "a.png", digit(np.random.default_rng(0), 36))
    r = cli("--checkpoint", tmp_path / "none.npz", "--out", out, "a.png", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and expect in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")
def test_predict_unwritable_out_fails_before_predicting(tmp_path):
    """/proc takes no files, even from root: refused before any prediction is printed, in one
    line, exit 1 and without a traceback."""
    model = stub_model(tmp_path / "m.npz", 36, {3: 0.9})
    iio.imwrite(tmp_path / "a.png", digit(np.random.default_rng(4)))
    r = cli("--checkpoint", model, "--out", "/proc/p.png", "a.png", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("capsnet_predict.py: error: --out: cannot write "
                               "/proc/p.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "m.npz"]


@pytest.mark.parametrize("args, expect", [
    ((), "the following arguments are required: IMAGE"),
    (("--checkpoint", "{tmp}/none.npz", "x.png"), "does not exist"),
    (("--out", "{tmp}/no/dir/p.png", "x.png"), "does not exist"),
    (("--background", "grey", "x.png"), "invalid choice"),
])
def test_predict_bad_flags_are_one_line(tmp_path, args, expect):
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The shipped model

def big_font_digit(d: int) -> np.ndarray:
    """Digit d in matplotlib's bundled DejaVu Sans, about 60 px tall, a little off-centre in a
    120x90 image: ink (1) on paper (0)."""
    fig = Figure(figsize=(1.2, 0.9), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.text(0.55, 0.45, str(d), fontsize=60, ha="center", va="center", fontweight="bold")
    canvas.draw()
    return 1 - np.asarray(canvas.buffer_rgba())[..., 0] / 255


def font_digit(d: int, dx: int = 0, dy: int = 0) -> np.ndarray:
    """Digit d drawn in matplotlib's bundled DejaVu Sans, white on black, as MNIST frames its
    digits (about 20 px tall in a 28x28 box), on a 36x36 canvas shifted by (dy, dx)."""
    fig = Figure(figsize=(0.28, 0.28), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    fig.text(0.5, 0.5, str(d), color="white", fontsize=17, ha="center", va="center",
             fontweight="bold")
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., 0]
    return mc.place(img[None], np.array([dy]), np.array([dx]), 36)[0]


# Font digits are not MNIST's handwriting: the shipped model names both digits of 19 of the 45
# font pairs at these shifts. These four it gets with a wide margin (the second-longest capsule
# 0.39-0.72 longer than the third), so they pin its behaviour without resting on a near tie.
SHIPPED_CASES = [((2, 3), (-2, 0, 2, 1)), ((4, 7), (-2, 0, 2, 1)), ((3, 5), (-2, 0, 2, 1)),
                 ((0, 5), (-2, 0, 2, 1))]  # (digits, (dy_a, dx_a, dy_b, dx_b))


def test_the_shipped_model_loads_without_pickle_and_reads_a_composite_it_never_saw():
    assert mc.MODEL_FILE.exists(), "the shipped model is part of the repository"
    assert mc.MODEL_FILE.stat().st_size <= 10 * 2 ** 20
    run = mc.load_checkpoint(mc.MODEL_FILE)  # np.load(allow_pickle=False) inside
    assert run.adam is None and run.cfg.dtype == "float32"
    for (a, b), (ya, xa, yb, xb) in SHIPPED_CASES:
        x = np.minimum(font_digit(a, xa, ya).astype(int) + font_digit(b, xb, yb), 255).astype(np.uint8)
        v = mc.predict(run.params, run.cfg, x[None])
        lengths = np.linalg.norm(v[0], axis=1)
        assert set(np.argsort(-lengths)[:2]) == {a, b}, lengths.round(3)
        assert np.sort(lengths)[-2] - np.sort(lengths)[-3] > 0.2, lengths.round(3)
        np.testing.assert_array_equal(mc.predict(run.params, run.cfg, x[None]), v)  # deterministic


def test_predict_into_a_pipe_its_reader_closed_ends_without_a_traceback(tmp_path):
    """`predict ... | head -1`: the reader leaves; predict stops quietly with 141, as SIGPIPE."""
    model = stub_model(tmp_path / "m.npz", 36, {3: 0.9})
    for k in range(3):
        iio.imwrite(tmp_path / f"{k}.png", digit(np.random.default_rng(k), 36))
    p = subprocess.Popen([sys.executable, str(ROOT / "capsnet_predict.py"),
                          "--checkpoint", str(model), "0.png", "1.png", "2.png"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the model has loaded: every line predict prints meets a closed pipe
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


# Font digits the shipped MNIST model reads with a wide margin (its longest capsule over 0.8, the
# second under 0.2), so they pin its behaviour without resting on a near tie.
MNIST_CASES = (0, 2, 3, 5, 8)


def test_the_shipped_mnist_model_names_one_digit_deterministically():
    assert cp.MNIST_MODEL_FILE.exists(), "the shipped MNIST model is part of the repository"
    assert cp.MNIST_MODEL_FILE.stat().st_size <= 10 * 2 ** 20
    run = mc.load_checkpoint(cp.MNIST_MODEL_FILE)
    assert run.adam is None and run.cfg.task == "mnist" and run.cfg.canvas == 28
    for d in MNIST_CASES:
        x = font_digit(d)[4:32, 4:32][None]                       # (1, 28, 28) as MNIST frames it
        lengths = mc.class_scores(mc.predict(run.params, run.cfg, x), run.cfg)[0]
        assert np.argmax(lengths) == d and lengths[d] > 0.8, lengths.round(3)
        assert np.sort(lengths)[-2] < 0.2, lengths.round(3)
        np.testing.assert_array_equal(mc.predict(run.params, run.cfg, x), mc.predict(
            run.params, run.cfg, x))


def test_predict_sends_a_28x28_digit_to_the_mnist_model_and_names_one_digit(tmp_path):
    """--digits 1: the counter reads this bold font at 28 px as two for some digits (see
    ONE_DIGIT_CASES); the count without a flag is tested on MNIST digits below."""
    for d in MNIST_CASES:
        iio.imwrite(tmp_path / f"{d}.png", font_digit(d)[4:32, 4:32])
    r = cli("--verbose", "--digits", "1", *(f"{d}.png" for d in MNIST_CASES), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    heads = [ln for ln in r.stdout.splitlines() if not ln.startswith(" ")]
    assert [h.split("  (")[0] for h in heads] == [f"{d}.png: {d}" for d in MNIST_CASES]
    assert all("(capsule length " in h and " and " not in h for h in heads), heads
    assert r.stdout.count("model capsnet-mnist.npz, 1 digit") == len(MNIST_CASES), r.stdout
    assert r.stdout.count("all ten: ") == len(MNIST_CASES)


# ----------------------------------------------------------------------------------------------
# --digits auto: how many digits, from both shipped models

def frame_filling(img: np.ndarray, side: int = 28) -> np.ndarray:
    """img's ink box scaled (keeping its aspect) to fill a side x side frame, float in [0, 1]."""
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] / 255
    h, w = (max(1, round(n * side / max(crop.shape))) for n in crop.shape)
    out = np.zeros((side, side))
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = cp.resize(
        crop, h, w)
    return np.clip(out, 0, 1)


# Font digits the count calls one with a margin of at least ONE_MARGIN at 200x200 and filling
# 28x28 (runs/predict/count_fuse.txt's weights); composites of font digits it calls two with at
# least TWO_MARGIN. At 28 and 36 px this bold font (strokes 4-6 px, twice MNIST's, wider than
# the pens the counter learnt from) reads as two for some digits: docs/model.md says so.
ONE_DIGIT_CASES = (0, 2, 3, 5, 7)
ONE_MARGIN, TWO_MARGIN = 2.0, 2.0


def shipped_runs() -> tuple:
    """The shipped MNIST and MultiMNIST models, which the count weighs."""
    return mc.load_checkpoint(cp.MNIST_MODEL_FILE), mc.load_checkpoint(cp.MODEL_FILE)


def lone_digits() -> dict:
    """{name: float image} of font digits at every size, either polarity, frame-filling too."""
    out = {}
    for d in ONE_DIGIT_CASES:
        mnist_like = font_digit(d)[4:32, 4:32]
        out[f"{d} as MNIST frames it"] = mnist_like / 255
        out[f"{d} filling 28x28"] = frame_filling(mnist_like)
        out[f"{d} at 36x36, black on white"] = 1 - cp.resize(mnist_like / 255, 36, 36)
        out[f"{d} at 200x200, black on white"] = 1 - cp.resize(big_font_digit(d), 200, 200)
    return out


def composites() -> dict:
    out = {}
    for (a, b), (ya, xa, yb, xb) in SHIPPED_CASES:
        c = np.minimum(font_digit(a, xa, ya).astype(int) + font_digit(b, xb, yb), 255) / 255
        out[f"{a}{b} at 36x36"] = c
        out[f"{a}{b} at 200x200, black on white"] = 1 - np.clip(cp.resize(c, 200, 200), 0, 1)
    return out


def test_auto_counts_one_digit_at_any_size_and_two_in_a_composite():
    """The shipped count (a small counter on both views as two channels, weighed with the MNIST
    model's reconstruction error) on font digits at 200x200 and filling 28x28, either polarity, and font
    composites: each counted right, with a margin; which images are taken as they are."""
    assert cp.COUNT_MODEL_FILE.exists() and cp.COUNT_MODEL_FILE.stat().st_size < 2 ** 20
    assert cp.load_counter()["cnn_conv1_w"].shape[2] == 2
    images = {**lone_digits(), **composites()}
    v = cp.both_views([cp.ink_on_black(x)[0] for x in images.values()])
    score = dict(zip(images, cp.count_scores(v, None, *shipped_runs())))
    ones = {k: round(s, 2) for k, s in score.items()
            if len(k.split()[0]) == 1 and ("200x200" in k or "filling" in k)}
    twos = {k: round(s, 2) for k, s in score.items() if len(k.split()[0]) == 2}
    assert len(ones) == 2 * len(ONE_DIGIT_CASES) and len(twos) == 2 * len(SHIPPED_CASES)
    assert max(ones.values()) < -ONE_MARGIN and min(twos.values()) > TWO_MARGIN, (ones, twos)
    made = {k: [cp.AS_MADE in h for h in hows] for k, hows in zip(images, v.hows)}
    assert made["3 as MNIST frames it"] == [True, False] and made["23 at 36x36"] == [False, True]
    assert made["3 filling 28x28"] == [False, False]


# ----------------------------------------------------------------------------------------------
# The pixel counter: its gradients by finite differences, and the shipped one

def counter_params(rng) -> dict:
    """A tiny counter in float64: two 5x5 convolutions (3 and 2 channels), each pooled, on 8x8x2
    inputs, then 4 ReLUs and the logit."""
    shapes = dict(cnn_conv1_w=(5, 5, 2, 3), cnn_conv1_b=(3,), cnn_conv2_w=(5, 5, 3, 2),
                  cnn_conv2_b=(2,), cnn_fc_w=(8, 4), cnn_fc_b=(4,), cnn_out_w=(4, 1), cnn_out_b=(1,))
    return {k: rng.normal(size=s) for k, s in shapes.items()}


def numeric_grad(f, p: dict, k: str, h: float = 1e-6) -> np.ndarray:
    """The centred finite-difference gradient of the scalar f() w.r.t. p[k], entry by entry."""
    g = np.zeros_like(p[k])
    for i in np.ndindex(p[k].shape):
        old = p[k][i]
        p[k][i] = old + h
        up = f()
        p[k][i] = old - h
        g[i] = (up - f()) / (2 * h)
        p[k][i] = old
    return g


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def counter_grad_errors(backward=None) -> dict:
    """{check: the largest relative error against finite differences}: counter_loss's gradient
    (with L2) w.r.t. every parameter array, and counter_backward's for a random upstream
    gradient of the logits (backward: a replacement to check instead)."""
    rng = np.random.default_rng(0)
    p, x, y = counter_params(rng), rng.normal(size=(6, 8, 8, 2)), rng.integers(0, 2, 6).astype(float)
    ds = rng.normal(size=6)
    loss = lambda: cp.counter_loss(p, x, y, l2=0.1)[0]
    logits = lambda: float((cp.counter_forward(x, p)[0] * ds).sum())
    back = backward or cp.counter_backward
    _, grads = cp.counter_loss(p, x, y, l2=0.1)
    upstream = back(ds, cp.counter_forward(x, p)[1])
    errors = {}
    for k in p:
        assert grads[k].shape == upstream[k].shape == p[k].shape
        errors["loss", k] = rel_error(grads[k], numeric_grad(loss, p, k, 1e-5))
        errors["upstream", k] = rel_error(upstream[k], numeric_grad(logits, p, k, 1e-5))
    return errors


def test_the_counters_gradients_match_finite_differences():
    errors = counter_grad_errors()
    assert max(errors.values()) < 1e-6, errors


def test_a_broken_backward_fails_the_gradient_check(monkeypatch):
    """The ReLUs' mask forgotten in the backward pass: every layer below the last ReLU is
    wrong, the output layer stays right."""
    monkeypatch.setattr(cnn_baseline, "relu_backward", lambda dout, out: dout)
    errors = counter_grad_errors()
    assert min(errors["upstream", k] for k in ("cnn_conv1_w", "cnn_fc_w")) > 1e-2, errors
    assert max(errors["upstream", k] for k in ("cnn_out_w", "cnn_out_b")) < 1e-6, errors


def test_the_shipped_counter_counts_mnist_test_digits_and_composites():
    """Ten MNIST test digits and ten composites of two of them, each as made and at the other
    sizes of 28, 36, 64 and 200 px black on white: each counted right (skipped without MNIST's
    test files in the cache)."""
    raws = [mc.cached_idx(mc.mnist_dir(None) / n) for n in ("t10k-images-idx3-ubyte.gz",
                                                             "t10k-labels-idx1-ubyte.gz")]
    if None in raws:
        pytest.skip("MNIST's test files are not in the cache")
    x = mc.parse_idx(raws[0], "images")[:20]
    pairs = [np.minimum(np.pad(a, 4).astype(int) + np.pad(b, ((6, 2), (2, 6))), 255)
             for a, b in zip(x[:10], x[10:])]
    ones = [d / 255 for d in x[:10]] + [1 - np.clip(cp.resize(d / 255, n, n), 0, 1)
                                        for n in (36, 64, 200) for d in x[:10]]
    twos = [c / 255 for c in pairs] + [1 - np.clip(cp.resize(c / 255, n, n), 0, 1)
                                       for n in (28, 64, 200) for c in pairs]
    s = cp.count_scores(cp.both_views([cp.ink_on_black(i)[0] for i in ones + twos]), None,
                        *shipped_runs())
    two = np.arange(len(s)) >= len(ones)
    assert ((s > 0) == two).all(), np.round(s, 1)


def test_the_shipped_counter_is_the_one_its_training_wrote():
    """The counter's threshold is runs/predict/count_train.txt's, chosen on held-out training
    images (`python3 bench/samples.py count train --seed 0`)."""
    text = (ROOT / "runs" / "predict" / "count_train.txt").read_text()
    threshold = float(text.split("threshold on the logit: ")[1].split()[0])
    assert round(float(cp.load_counter()["threshold"]), 2) == threshold
    assert text.startswith("# python3 bench/samples.py count train --n 20000 --seed 0: ")


def test_the_shipped_count_weighs_what_count_fuse_wrote():
    """The shipped count's weights are runs/predict/count_fuse.txt's, fitted on held-out training
    images (`python3 bench/samples.py count fuse --seed 0`); without them (or without the MNIST
    model) the score is the counter's logit less its threshold."""
    text = (ROOT / "runs" / "predict" / "count_fuse.txt").read_text()
    words = text.split("fitted on all: score = ")[1].split(", two above 0")[0].split()
    c = cp.load_counter()
    np.testing.assert_allclose([*c["fuse_w"], c["fuse_b"][0]],
                               [float(t) for t in words if t[0] in "+-"], atol=6e-5)
    assert text.startswith("# python3 bench/samples.py count fuse --counter models/count_cnn.npz ")


def test_no_flag_reads_a_lone_digit_as_one_at_200x200_and_filling_28x28(tmp_path):
    """The issue's cases: a thick 7 drawn at 200x200 was '7 and 1', a frame-filling 28x28 digit
    was taken as it is. With no flag each is one digit now; a composite stays two."""
    iio.imwrite(tmp_path / "seven.png", np.round(255 * (1 - cp.resize(big_font_digit(7), 200,
                                                                       200))).astype(np.uint8))
    iio.imwrite(tmp_path / "three.png", np.round(255 * frame_filling(
        font_digit(3)[4:32, 4:32])).astype(np.uint8))
    (a, b), (ya, xa, yb, xb) = SHIPPED_CASES[3]
    iio.imwrite(tmp_path / "pair.png", np.minimum(font_digit(a, xa, ya).astype(int)
                                                  + font_digit(b, xb, yb), 255).astype(np.uint8))
    r = cli("--verbose", "seven.png", "three.png", "pair.png", cwd=tmp_path)
    heads = [ln for ln in r.stdout.splitlines() if not ln.startswith(" ")]
    assert r.returncode == 0 and [h.split("  (")[0] for h in heads] == [
        "seven.png: 7", "three.png: 3", "pair.png: 0 and 5"], r.stdout
    assert "  28x28; enlarged to 128x128; ink >= " in r.stdout and "to 15x20" in r.stdout
    assert r.stdout.count("1 digit (auto: the count's score -") == 2


def test_the_count_benchs_counter_threshold_and_drawing():
    """bench/samples.py count: a new counter's shapes and logits, the threshold that serves the
    worst group best, and an image drawn black on white reads as drawn white on black, in the
    counter's 8-bit views too."""
    sys.path.insert(0, str(ROOT / "bench"))
    import samples
    rng = np.random.default_rng(0)
    p = samples.counter_init(rng, (4, 6), 8)
    assert p["cnn_conv2_w"].shape == (5, 5, 4, 6) and p["cnn_fc_w"].shape == (9 * 9 * 6, 8)
    assert all(a.dtype == np.float32 for a in p.values())
    groups = {"a": (np.array([-1.0, -0.5, 0.345]), np.array([False, False, False])),
              "b": (np.array([0.6, 1.0, 2.0]), np.array([True, True, True]))}
    assert round(samples.maximin_bias(groups), 2) == -0.35       # the shift nearest 0 at 1.0
    img = digit(rng)
    np.testing.assert_allclose(cp.ink_on_black(samples.drawn(img, 64, "black on white"))[0],
                               samples.drawn(img, 64, "white on black"), atol=1e-12)
    assert samples.drawn(img, 28, "white on black").tolist() == (img / 255).tolist()
    views = samples.drawn_views(np.stack([img, img]), [64, 200], ["black on white"] * 2, [1, 3])
    v = cp.both_views([samples.drawn(img, 64, "white on black")])
    assert views.dtype == np.uint8 and views.shape == (2, 36, 36, 2)
    assert (views[0, ..., 0] == v.twos[0]).all() and (views[0, 4:32, 4:32, 1] == v.ones[0]).all()
    assert samples.counter_logits(views, p).shape == (2,)
