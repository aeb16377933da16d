"""--task mnist: the shifted single digits, the one-label CapsNet, the paper's MNIST CNN (softmax,
dropout), routing statistics, and the CLI end to end. Gradients in float64 against centered
finite differences, as everywhere else."""
import math

import numpy as np
import pytest

import multimnist_capsnet as m
from gradcheck import check, numeric_grad, parameter_errors, rel_error
from test_cli import SigintAfter, assert_same_checkpoint, main_in, metrics_wo_timing

CAPS = dict(task="mnist", canvas=12, max_shift=2, kernel=3, conv1_channels=3, primary_types=2,
            primary_dim=4, digit_dim=5, decoder_h1=8, decoder_h2=9, recon_weight=0.5,
            dtype="float64")
CNN = dict(task="mnist", model="cnn", canvas=8, cnn_conv1=2, cnn_conv2=3, cnn_conv3=2, cnn_fc=6,
           cnn_fc2=5, dtype="float64")
SYNTH = ("--task", "mnist", "--data", "synthetic", "--n-train", 64, "--n-test", 32,
         "--batch-size", 16, "--quiet")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def digits(rng, n, side=28):
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
    x = digits(rng, 200)
    labels = rng.integers(0, 10, 200).astype(np.uint8)
    d = m.shift_digits(x, labels, rng, 2)
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
    out = m.shift_digits(x, np.zeros(1, np.uint8), np.random.default_rng(3), 2)["x"][0]
    moved = np.argwhere(out == 0)
    assert 0 < len(moved) <= 28 * 4 + 4 * 26  # at most two rows and two columns go to zero
    same = m.shift_digits(x, np.zeros(1, np.uint8), None)
    np.testing.assert_array_equal(same["x"], x)


def test_every_epoch_shifts_afresh_and_the_test_digits_are_unshifted():
    cfg = m.Config(task="mnist", canvas=28, max_shift=2, n_train=200, n_test=50)
    mnist = m.synthetic_mnist(np.random.default_rng(0))
    pool, test = m.make_data(cfg, mnist)
    assert pool is None
    np.testing.assert_array_equal(test["x"], mnist["test_x"][:50])
    np.testing.assert_array_equal(test["labels"][:, 0], mnist["test_y"][:50])
    rng = np.random.default_rng(1)
    e1 = m.shift_digits(mnist["train_x"][:200], mnist["train_y"][:200], rng, 2)["x"]
    e2 = m.shift_digits(mnist["train_x"][:200], mnist["train_y"][:200], rng, 2)["x"]
    assert (e1 != e2).any(axis=(1, 2)).mean() > 0.8


def test_batch_arrays_for_one_digit_holds_x_a_and_one_label_column(rng):
    d = m.shift_digits(digits(rng, 10), rng.integers(0, 10, 10), None)
    b = m.batch_arrays(d, np.arange(4), np.float32)
    assert set(b) == {"x", "a", "labels"} and b["labels"].shape == (4, 1)
    assert b["x"].shape == (4, 28, 28, 1) and b["a"].shape == (4, 784)
    np.testing.assert_array_equal(b["a"], b["x"].reshape(4, -1))


def test_mnist_task_defaults_and_limits():
    parse = lambda *a: m.config_from_args(m.build_parser().parse_args(list(a)))
    cfg = parse("--task", "mnist")
    assert (cfg.canvas, cfg.max_shift, cfg.n_train, cfg.n_test, cfg.n_labels) == (28, 2, 60000,
                                                                                  10000, 1)
    assert cfg.n_primary == 6 * 6 * 8  # 28 -> 20 (Conv1 9x9) -> 6 (PrimaryCaps 9x9, stride 2)
    assert parse("--task", "mnist", "--n-train", "500").n_train == 500
    assert parse().n_train == 6000 and parse().canvas == 36
    with pytest.raises(m.CapsNetError, match="60000 training"):
        parse("--task", "mnist", "--n-train", "60001")


# ----------------------------------------------------------------------------------------------
# Softmax cross-entropy and dropout


def test_softmax_xent_forward_is_the_mean_negative_log_probability(rng):
    z = rng.standard_normal((4, 10)) * 3
    y = rng.integers(0, 10, (4, 1))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss, _ = m.softmax_xent_forward(z, y)
    assert loss == pytest.approx(-np.log(p[np.arange(4), y[:, 0]]).mean(), rel=1e-12)
    assert np.isfinite(m.softmax_xent_forward(z * 1e4, y)[0])  # no overflow


def test_softmax_xent_backward(rng):
    z, y = rng.standard_normal((4, 10)), rng.integers(0, 10, (4, 1))
    num = numeric_grad(lambda: m.softmax_xent_forward(z, y)[0], z)
    ana = m.softmax_xent_backward(m.softmax_xent_forward(z, y)[1])
    assert rel_error(ana, num) < 1e-7


def test_dropout_with_a_fixed_mask(rng):
    x = rng.standard_normal((5, 7))
    keep = m.dropout_mask(rng, (5, 7), 0.4, np.float64)
    assert set(np.unique(keep)) <= {0.0, 1 / 0.6}
    check(lambda: m.dropout_forward(x, keep)[0], x, lambda d: m.dropout_backward(d, keep), rng)


def test_dropout_mask_keeps_the_expected_value(rng):
    keep = m.dropout_mask(rng, (400, 500), 0.5, np.float32)
    assert keep.dtype == np.float32 and abs(keep.mean() - 1) < 0.01
    assert abs((keep == 0).mean() - 0.5) < 0.01


def test_a_backward_that_ignores_the_dropout_mask_fails_the_check(rng):
    """The check can fail: dropout's backward passing dout through unmasked is caught."""
    x = rng.standard_normal((5, 7))
    keep = m.dropout_mask(rng, (5, 7), 0.5, np.float64)
    with pytest.raises(AssertionError, match="relative error"):
        check(lambda: m.dropout_forward(x, keep)[0], x, lambda d: d.copy(), rng)


# ----------------------------------------------------------------------------------------------
# Whole models on one-digit batches


def test_mnist_capsnet_gradient_for_every_parameter(rng):
    cfg = m.Config(**CAPS, routing_grad="full", digit_bias=True, bias_init=0.1)
    params = m.init_params(cfg, rng)
    params["digit_w"] *= 4  # longer capsules: both sides of the margin loss are exercised
    batch = one_label_batch(cfg, rng)
    _, grads, aux = m.loss_and_grads(params, batch, cfg)
    assert aux["out"].shape == (3, 10, 5)
    assert set(grads) == set(params) == set(m.init_shapes(cfg))
    errors = parameter_errors(lambda: m.loss_and_grads(params, batch, cfg)[0], params, grads, rng)
    assert max(errors.values()) < 1e-6, errors


def test_mnist_capsnet_reconstructs_only_the_true_digit(rng):
    """One label: the decoder runs once per image, against the image itself."""
    cfg = m.Config(**CAPS)
    params = m.init_params(cfg, rng)
    batch = one_label_batch(cfg, rng)
    v, _ = m.encode(params, batch["x"], cfg)
    recon = m.reconstruct(params, v, batch["labels"][:, 0])
    expected = ((recon - batch["a"]) ** 2).sum() / 3
    _, _, aux = m.loss_and_grads(params, batch, cfg)
    assert aux["recon"] == pytest.approx(expected, rel=1e-12)


def test_mnist_cnn_gradient_for_every_parameter_with_dropout(rng):
    cfg = m.Config(**CNN)
    params = m.init_params(cfg, rng)
    assert set(params) == {f"cnn_{n}_{w}" for n in ("conv1", "conv2", "conv3", "fc", "fc2", "out")
                           for w in "wb"}
    for k in params:
        if k.endswith("_b"):
            params[k] += 0.1 * rng.standard_normal(params[k].shape)
    batch = one_label_batch(cfg, rng)
    batch["keep"] = m.dropout_mask(rng, (3, cfg.cnn_fc2), 0.5, np.float64)
    loss, grads, aux = m.loss_and_grads(params, batch, cfg)
    assert aux["out"].shape == (3, 10) and loss == aux["xent"]
    errors = parameter_errors(lambda: m.loss_and_grads(params, batch, cfg)[0], params, grads, rng)
    assert max(errors.values()) < 1e-7, errors


def test_the_papers_mnist_cnn_has_35_4m_parameters():
    cfg = m.config_from_args(m.build_parser().parse_args(["--task", "mnist", "--model", "cnn"]))
    assert cfg.cnn_arch.flat() == 28 * 28 * 128  # 'same' padding, no pooling
    assert m.cnn_param_count(cfg.cnn_arch) == 35_445_522


# ----------------------------------------------------------------------------------------------
# Evaluation and routing statistics


def test_evaluate_on_digits_counts_errors_of_the_longest_capsule(rng, monkeypatch):
    cfg = m.Config(**{**CAPS, "dtype": "float32"})
    params = m.init_params(cfg, rng)
    pairs = m.shift_digits(digits(rng, 6, 12), np.array([0, 1, 2, 3, 4, 5]), None)
    v = np.zeros((6, 10, 5), np.float32)
    v[np.arange(6), [0, 1, 2, 9, 9, 5], 0] = 0.9  # images 3 and 4 read as 9
    monkeypatch.setattr(m, "predict", lambda *a, **k: v)
    met = m.evaluate(params, cfg, pairs)
    assert (met["n_errors"], met["test_error"], met["top1"]) == (2, 2 / 6, 4 / 6)
    assert "set_acc" not in met and "recon_mse" in met
    assert "error 33.33% (2 digits wrong)" in m.score_str(met)


def test_routing_stats_first_iteration_is_uniform_and_agreement_is_measured(rng):
    cfg = m.Config(**{**CAPS, "dtype": "float32"})
    params = m.init_params(cfg, rng)
    x = digits(rng, 5, 12)
    st = m.routing_stats(params, cfg, x)
    assert len(st["routing_db"]) == len(st["routing_entropy"]) == cfg.routing_iters
    assert st["routing_entropy"][0] == pytest.approx(math.log(10), abs=1e-5)
    assert all(e <= math.log(10) + 1e-5 for e in st["routing_entropy"])
    # the first update, recomputed by hand: mean over N, J, I of |uh_ij . v_j|
    uh, iters, _ = m.encode(params, x.astype(np.float32)[..., None] / 255, cfg)[1][-1]
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


def test_mnist_cnn_with_dropout_resumes_mid_epoch_bit_for_bit(tmp_path, monkeypatch):
    """The dropout masks come from a generator per step, so a run stopped by Ctrl-C in the middle
    of an epoch and resumed draws the same ones as a straight run."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    cnn = ("--model", "cnn", "--cnn-conv1", 3, "--cnn-conv2", 3, "--cnn-conv3", 2, "--cnn-fc", 8,
           "--cnn-fc2", 6)
    spy = SigintAfter(6)  # 4 steps an epoch: stopped after step 2 of epoch 2
    monkeypatch.setattr(m, "adam_step", spy)
    assert main_in([*SYNTH, *cnn, "--n-epochs", 2, "--save", a])[0] == 130
    monkeypatch.setattr(m, "adam_step", spy.real)
    assert m.load_checkpoint(a).step == 6
    assert main_in(["--resume", a, "--save", a, "--quiet"])[0] == 0
    assert main_in([*SYNTH, *cnn, "--n-epochs", 2, "--save", b])[0] == 0
    assert_same_checkpoint(a, b)
    run = m.load_checkpoint(a)
    assert run.cfg.cnn_arch.kernels == (5, 5, 5) and not run.cfg.cnn_arch.pool
    assert "test_error" in run.history["epochs"][-1]
