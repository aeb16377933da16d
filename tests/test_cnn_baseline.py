"""cnn_baseline.py: its layer pairs against finite differences, the MultiMNIST and MNIST CNNs
through the model module's loop, CLI, checkpoints and resume."""
from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

import cnn_baseline as cb
import multimnist_capsnet as mc
from gradcheck import check, numeric_grad, parameter_errors, rel_error
from test_multimnist_capsnet import (SYNTH, SigintAfter, assert_same_checkpoint, main_in,
                                     one_label_batch, tiny_batch)


MNIST_CNN = dict(task="mnist", model="cnn", canvas=8, cnn_conv1=2, cnn_conv2=3, cnn_conv3=2, cnn_fc=6,
           cnn_fc2=5, dtype="float64")


# ----------------------------------------------------------------------------------------------
# Softmax cross-entropy and dropout


def test_softmax_xent_forward_is_the_mean_negative_log_probability(rng):
    z = rng.standard_normal((4, 10)) * 3
    y = rng.integers(0, 10, (4, 1))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss, _ = cb.softmax_xent_forward(z, y)
    assert loss == pytest.approx(-np.log(p[np.arange(4), y[:, 0]]).mean(), rel=1e-12)
    assert np.isfinite(cb.softmax_xent_forward(z * 1e4, y)[0])  # no overflow


def test_softmax_xent_backward(rng):
    z, y = rng.standard_normal((4, 10)), rng.integers(0, 10, (4, 1))
    num = numeric_grad(lambda: cb.softmax_xent_forward(z, y)[0], z)
    ana = cb.softmax_xent_backward(cb.softmax_xent_forward(z, y)[1])
    assert rel_error(ana, num) < 1e-7


def test_dropout_with_a_fixed_mask(rng):
    x = rng.standard_normal((5, 7))
    keep = cb.dropout_mask(rng, (5, 7), 0.4, np.float64)
    assert set(np.unique(keep)) <= {0.0, 1 / 0.6}
    check(lambda: cb.dropout_forward(x, keep)[0], x, lambda d: cb.dropout_backward(d, keep), rng)


def test_dropout_mask_keeps_the_expected_value(rng):
    keep = cb.dropout_mask(rng, (400, 500), 0.5, np.float32)
    assert keep.dtype == np.float32 and abs(keep.mean() - 1) < 0.01
    assert abs((keep == 0).mean() - 0.5) < 0.01


def test_a_backward_that_ignores_the_dropout_mask_fails_the_check(rng):
    """The check can fail: dropout's backward passing dout through unmasked is caught."""
    x = rng.standard_normal((5, 7))
    keep = cb.dropout_mask(rng, (5, 7), 0.5, np.float64)
    with pytest.raises(AssertionError, match="relative error"):
        check(lambda: cb.dropout_forward(x, keep)[0], x, lambda d: d.copy(), rng)


def one_label_cnn_check(cfg, rng):
    """A one-digit CNN's loss, aux and per-parameter gradient errors on a batch of 3 with a
    dropout mask, its biases moved off zero."""
    params = mc.init_params(cfg, rng)
    assert set(params) == {f"cnn_{n}_{w}" for n in ("conv1", "conv2", "conv3", "fc", "fc2", "out")
                           for w in "wb"}
    for k in params:
        if k.endswith("_b"):
            params[k] += 0.1 * rng.standard_normal(params[k].shape)
    batch = one_label_batch(cfg, rng)
    batch["keep"] = cb.dropout_mask(rng, (3, cfg.cnn_fc2), 0.5, np.float64)
    loss, grads, aux = mc.loss_and_grads(params, batch, cfg)
    errors = parameter_errors(lambda: mc.loss_and_grads(params, batch, cfg)[0], params, grads, rng)
    return loss, aux, errors


def test_mnist_cnn_gradient_for_every_parameter_with_dropout(rng):
    loss, aux, errors = one_label_cnn_check(mc.Config(**MNIST_CNN), rng)
    assert aux["out"].shape == (3, 10) and loss == aux["xent"]
    assert max(errors.values()) < 1e-7, errors


def test_expanded_mnist_cnn_pools_and_its_gradient_holds_for_every_parameter(rng):
    """Section 5.2's CNN (--task expanded): each 5x5 conv pooled 2x2, dropout before the softmax."""
    cfg = mc.Config(**dict(MNIST_CNN, task="expanded", canvas=16))
    arch = cb.cnn_arch(cfg)
    assert arch.pool and arch.kernels == (5, 5, 5) and arch.flat() == 2 * 2 * cfg.cnn_conv3
    errors = one_label_cnn_check(cfg, rng)[2]
    assert max(errors.values()) < 1e-7, errors


def test_the_expanded_mnist_cnn_matches_the_small_capsnets_parameters():
    parse = lambda m: mc.config_from_args(mc.build_parser().parse_args(
        ["--task", "expanded", "--model", m]))
    cnn = cb.cnn_param_count(cb.cnn_arch(parse("cnn")))
    caps = sum(np.prod(s) for s in mc.init_shapes(parse("capsnet")).values())
    assert cnn == 2_647_818 and abs(cnn / caps - 1) < 0.01


def test_the_papers_mnist_cnn_has_35_4m_parameters():
    cfg = mc.config_from_args(mc.build_parser().parse_args(["--task", "mnist", "--model", "cnn"]))
    assert cb.cnn_arch(cfg).flat() == 28 * 28 * 128  # 'same' padding, no pooling
    assert cb.cnn_param_count(cb.cnn_arch(cfg)) == 35_445_522


def test_mnist_cnn_with_dropout_resumes_mid_epoch_bit_for_bit(tmp_path, monkeypatch):
    """The dropout masks come from a generator per step, so a run stopped by Ctrl-C in the middle
    of an epoch and resumed draws the same ones as a straight run."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    cnn = ("--cnn-conv1", 3, "--cnn-conv2", 3, "--cnn-conv3", 2, "--cnn-fc", 8,
           "--cnn-fc2", 6)
    spy = SigintAfter(6)  # 4 steps an epoch: stopped after step 2 of epoch 2
    monkeypatch.setattr(mc, "adam_step", spy)
    assert main_in([*SYNTH, *cnn, "--n-epochs", 2, "--save", a], model=cb.CNN)[0] == 130
    monkeypatch.setattr(mc, "adam_step", spy.real)
    assert mc.load_checkpoint(a).step == 6
    assert main_in(["--resume", a, "--save", a, "--quiet"], model=cb.CNN)[0] == 0
    assert main_in([*SYNTH, *cnn, "--n-epochs", 2, "--save", b], model=cb.CNN)[0] == 0
    assert_same_checkpoint(a, b)
    run = mc.load_checkpoint(a)
    assert cb.cnn_arch(run.cfg).kernels == (5, 5, 5) and not cb.cnn_arch(run.cfg).pool
    assert "test_error" in run.history["epochs"][-1]


CNN = dict(model="cnn", canvas=12, cnn_conv1=3, cnn_conv2=4, cnn_fc=6, dtype="float64")


def test_cnn_model_gradient_through_loss_and_grads_for_every_parameter():
    """The dispatch path: --model cnn reaches the CNN's forward, loss and backward, every array."""
    cfg = mc.Config(**CNN)
    rng = np.random.default_rng(12)  # no pre-ReLU value within 2e-3 of the kink (seed 5 has 7e-6)
    params = mc.init_params(cfg, rng)
    assert set(params) == set(mc.init_shapes(cfg)) and all(k.startswith("cnn_") for k in params)
    for k in params:
        if k.endswith("_b"):
            params[k] += 0.1 * rng.standard_normal(params[k].shape)
    batch = tiny_batch(cfg, rng)
    loss, grads, aux = mc.loss_and_grads(params, batch, cfg)
    assert set(aux) == {"xent", "out"} and aux["out"].shape == (3, 10) and loss == aux["xent"]
    errors = parameter_errors(lambda: mc.loss_and_grads(params, batch, cfg)[0], params, grads, rng)
    assert max(errors.values()) < 1e-7, errors


def test_cnn_sharded_step_equals_one_batch():
    cfg = mc.Config(**CNN)
    rng = np.random.default_rng(6)
    params = mc.init_params(cfg, rng)
    batch = tiny_batch(cfg, rng, n=5)
    loss, grads, _ = mc.loss_and_grads(params, batch, cfg)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        loss2, grads2, aux2 = mc.sharded_loss_and_grads(params, batch, cfg, pool)
    assert loss2 == pytest.approx(loss, rel=1e-12) and aux2["out"].shape == (5, 10)
    for k in params:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-13)


def test_cnn_trains_on_synthetic_digits_with_the_same_loop_and_metrics():
    cfg = mc.Config(model="cnn", n_train=256, n_test=100, n_epochs=3, cnn_conv1=8, cnn_conv2=8,
                   cnn_fc=32)
    mnist = mc.synthetic_mnist(np.random.default_rng(0))
    run = mc.new_run(cfg)
    pool, test = mc.make_data(cfg, mnist)
    assert mc.train(run, mnist, pool, test, progress=False)
    assert set(run.history) == {"xent", "epochs"}
    last = run.history["epochs"][-1]
    assert np.mean(run.history["xent"][-8:]) < np.mean(run.history["xent"][:8])
    assert last["set_acc"] > 1 / 45 * 5 and "recon_mse" not in last and "train_xent" in last


def test_cnn_paper_widths_give_the_papers_24_56m_parameters():
    cfg = mc.Config(model="cnn")
    shapes = mc.init_shapes(mc.Config(model="cnn", cnn_conv1=5, cnn_conv2=6, cnn_fc=7))
    assert shapes["cnn_fc_w"] == (9 * 9 * 6, 7)  # 'same' convolutions: 36 -> 18 -> 9
    assert cb.cnn_param_count(cb.cnn_arch(cfg)) == 24_563_978


ARCH = cb.CnnArch((9, 5), (3, 4), (8,), True, 10)  # 10 -> 10 -> 5 -> 5 -> 2: the second pool drops a row


# both of ARCH's convolutions go by kernel rows (F < K*C); this one's conv1 (F >= K*C) by im2col
TINY_IM2COL = cb.CnnArch((3, 3), (4, 2), (8,), True, 10)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def distinct(rng, shape):
    """Distinct values (a random permutation, spaced 1 apart, scaled): no max-pool ties."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) - 0.5 * np.prod(shape)) * 0.01


def tiny_problem(rng, n=2, dtype=np.float64, arch=ARCH):
    params = cb.cnn_init_params(arch, rng, dtype)
    for k in params:  # nonzero biases, so their gradients are tested in general position
        if k.endswith("_b"):
            params[k] = (0.1 * rng.standard_normal(params[k].shape)).astype(dtype)
    x = rng.random((n, arch.canvas, arch.canvas, 1)).astype(dtype)
    labels = np.stack([rng.choice(10, 2, replace=False) for _ in range(n)])
    return params, x, labels


def naive_maxpool(x):
    n, h, w, c = x.shape
    out = np.zeros((n, h // 2, w // 2, c))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
    return out


# ----------------------------------------------------------------------------------------------
# Layers

def test_pad_forward_places_x_in_a_zero_border(rng):
    x = rng.standard_normal((2, 5, 4, 3))
    out, _ = cb.pad_forward(x, 2)
    assert out.shape == (2, 9, 8, 3)
    np.testing.assert_array_equal(out[:, 2:7, 2:6], x)
    out[:, 2:7, 2:6] = 0
    assert not out.any()


def test_pad_backward(rng):
    x = rng.standard_normal((2, 5, 4, 3))
    f = lambda: cb.pad_forward(x, 2)[0]
    check(f, x, lambda d: cb.pad_backward(d, cb.pad_forward(x, 2)[1]), rng)


def padded_conv(x, w, b):
    """The 'same' convolution as pad + the valid im2col convolution, its reference."""
    return mc.conv_forward(cb.pad_forward(x, w.shape[0] // 2)[0], w, b, 1)[0]


ROWCONV_SHAPES = [(3, 3, 2), (5, 4, 3), (5, 1, 3)]  # (K, C, F): F below K*C, and C = 1


@pytest.mark.parametrize("k, c, f", ROWCONV_SHAPES)
def test_rowconv_forward_matches_padded_im2col(rng, k, c, f):
    x, w, b = rng.standard_normal((2, 6, 7, c)), rng.standard_normal((k, k, c, f)), rng.standard_normal(f)
    out, _ = cb.rowconv_forward(x, w, b)
    np.testing.assert_allclose(out, padded_conv(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, c, f", ROWCONV_SHAPES)
def test_rowconv_backward(rng, k, c, f):
    x, w, b = rng.standard_normal((2, 6, 7, c)), rng.standard_normal((k, k, c, f)), rng.standard_normal(f)
    fwd = lambda: cb.rowconv_forward(x, w, b)[0]
    grads = lambda d: cb.rowconv_backward(d, cb.rowconv_forward(x, w, b)[1])
    for i, a in enumerate((x, w, b)):
        check(fwd, a, lambda d: grads(d)[i], rng)


def test_rowconv_backward_without_dx_gives_same_weight_grads(rng):
    x, w, b = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 3, 2)), np.zeros(2)
    out, cache = cb.rowconv_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    full, skip = cb.rowconv_backward(dout, cache), cb.rowconv_backward(dout, cache, need_dx=False)
    assert skip[0] is None
    np.testing.assert_array_equal(full[1], skip[1])
    np.testing.assert_array_equal(full[2], skip[2])


@pytest.mark.parametrize("c, f", [(1, 6), (3, 2)])  # F >= K*C: pad and im2col; F < K*C: rows
def test_same_conv_backward_on_both_paths(rng, c, f):
    x, w, b = rng.standard_normal((2, 5, 6, c)), rng.standard_normal((3, 3, c, f)), rng.standard_normal(f)
    out, cache = cb.same_conv_forward(x, w, b)
    assert cache[0] is (cb.rowconv_backward if f < 3 * c else mc.conv_backward)
    np.testing.assert_allclose(out, padded_conv(x, w, b), rtol=1e-12, atol=1e-12)
    fwd = lambda: cb.same_conv_forward(x, w, b)[0]
    grads = lambda d: cb.same_conv_backward(d, cb.same_conv_forward(x, w, b)[1])
    for i, a in enumerate((x, w, b)):
        check(fwd, a, lambda d: grads(d)[i], rng)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 9, 3)])
def test_maxpool_forward_matches_naive_loop(rng, shape):
    x = rng.standard_normal(shape)
    out, _ = cb.maxpool_forward(x)
    np.testing.assert_array_equal(out, naive_maxpool(x))


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 9, 3)])
def test_maxpool_backward(rng, shape):
    x = distinct(rng, shape)
    f = lambda: cb.maxpool_forward(x)[0]
    check(f, x, lambda d: cb.maxpool_backward(d, cb.maxpool_forward(x)[1]), rng)


def test_maxpool_backward_sends_a_tie_to_the_first_max_only(rng):
    x = np.zeros((1, 2, 2, 1))
    out, cache = cb.maxpool_forward(x)
    dx = cb.maxpool_backward(np.full(out.shape, 3.0), cache)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[3.0, 0.0], [0.0, 0.0]])


def broken_maxpool_backward(dout, cache):
    """Wrong on purpose: every window entry gets the output's gradient."""
    _, (n, h, w, c) = cache
    dx = np.zeros((n, h, w, c))
    dx[:, :h // 2 * 2, :w // 2 * 2] = dout.repeat(2, axis=1).repeat(2, axis=2)
    return dx


def test_gradient_check_rejects_a_broken_maxpool_backward(rng):
    x = distinct(rng, (2, 6, 8, 3))
    f = lambda: cb.maxpool_forward(x)[0]
    with pytest.raises(AssertionError):
        check(f, x, lambda d: broken_maxpool_backward(d, cb.maxpool_forward(x)[1]), rng)


def test_sigmoid_xent_forward_matches_naive_formula(rng):
    z, labels = 3 * rng.standard_normal((5, 10)), np.array([[0, 1], [2, 9], [5, 3], [7, 8], [4, 6]])
    loss, _ = cb.sigmoid_xent_forward(z, labels)
    t = np.zeros((5, 10))
    for i, (a, b) in enumerate(labels):
        t[i, a] = t[i, b] = 1
    p = 1 / (1 + np.exp(-z))
    naive = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum() / 5
    assert abs(loss - naive) < 1e-12 * abs(naive)


def test_sigmoid_xent_is_finite_for_huge_logits():
    z = np.array([[1e3, -1e3, 1e3, -1e3, 0, 0, 0, 0, 0, 0]])
    loss, cache = cb.sigmoid_xent_forward(z, np.array([[0, 1]]))
    # class 0 right (t=1, z=+1e3): 0; class 1 wrong (t=1, z=-1e3): 1e3; class 2 wrong: 1e3;
    # class 3 right: 0; six at z=0: log 2 each
    assert loss == pytest.approx(2e3 + 6 * np.log(2), rel=1e-12)
    assert np.all(np.isfinite(cb.sigmoid_xent_backward(cache)))


def test_sigmoid_xent_backward(rng):
    z, labels = 3 * rng.standard_normal((4, 10)), np.array([[0, 1], [2, 9], [5, 3], [7, 8]])
    f = lambda: cb.sigmoid_xent_forward(z, labels)[0]
    check(f, z, lambda d: d * cb.sigmoid_xent_backward(cb.sigmoid_xent_forward(z, labels)[1]),
          rng)


# ----------------------------------------------------------------------------------------------
# The whole network

def test_param_count_matches_the_paper_and_the_arrays(rng):
    assert cb.cnn_param_count(cb.cnn_arch(mc.Config())) == 24_563_978  # the paper: 24.56M
    params = cb.cnn_init_params(ARCH, rng, np.float64)
    assert cb.cnn_param_count(ARCH) == sum(a.size for a in params.values())
    assert params["cnn_conv1_w"].shape == (9, 9, 1, 3)
    assert params["cnn_conv2_w"].shape == (5, 5, 3, 4)
    assert params["cnn_fc_w"].shape == (2 * 2 * 4, 8)
    assert params["cnn_out_w"].shape == (8, 10)


def test_forward_shapes(rng):
    params, x, _ = tiny_problem(rng, n=3)
    logits, _ = cb.cnn_forward(params, x)
    assert logits.shape == (3, 10)


def entries_to_check(grad, rng, n_top=15, n_random=15):
    """All entries of a small array; else the largest |grad| entries plus random ones."""
    if grad.size <= n_top + n_random:
        return None
    top = np.argsort(-np.abs(grad).reshape(-1))[:n_top]
    return sorted(set(top) | set(rng.choice(grad.size, n_random, replace=False)))


@pytest.mark.parametrize("arch", [ARCH, TINY_IM2COL], ids=["rows", "im2col-conv1"])
@pytest.mark.parametrize("name", ["cnn_conv1_w", "cnn_conv1_b", "cnn_conv2_w", "cnn_conv2_b",
                                  "cnn_fc_w", "cnn_fc_b", "cnn_out_w", "cnn_out_b"])
def test_cnn_backward(rng, name, arch):
    params, x, labels = tiny_problem(rng, arch=arch)

    def loss():
        return cb.sigmoid_xent_forward(cb.cnn_forward(params, x)[0], labels)[0]

    def grads():
        logits, cache = cb.cnn_forward(params, x)
        return cb.cnn_backward(cb.sigmoid_xent_backward(cb.sigmoid_xent_forward(logits, labels)[1]),
                                cache)

    g = grads()
    assert set(g) == set(params)
    assert np.abs(g[name]).max() > 0  # a dead layer would pass the check vacuously
    check(loss, params[name], lambda d: d * grads()[name], rng, idx=entries_to_check(g[name], rng))


@pytest.mark.parametrize("arch", [ARCH, TINY_IM2COL], ids=["rows", "im2col-conv1"])
def test_float32_in_float32_out(rng, arch):
    params, x, labels = tiny_problem(rng, dtype=np.float32, arch=arch)
    logits, cache = cb.cnn_forward(params, x)
    loss, c_loss = cb.sigmoid_xent_forward(logits, labels)
    dlogits = cb.sigmoid_xent_backward(c_loss)
    grads = cb.cnn_backward(dlogits, cache)
    assert logits.dtype == np.float32 and np.asarray(loss).dtype == np.float32
    assert dlogits.dtype == np.float32
    assert {k: g.dtype for k, g in grads.items()} == {k: np.dtype(np.float32) for k in params}
    # and they are the float64 gradients, to float32 accuracy
    p64 = {k: a.astype(np.float64) for k, a in params.items()}
    logits64, cache64 = cb.cnn_forward(p64, x.astype(np.float64))
    g64 = cb.cnn_backward(cb.sigmoid_xent_backward(cb.sigmoid_xent_forward(logits64, labels)[1]),
                           cache64)
    for k in params:
        assert rel_error(grads[k].astype(np.float64), g64[k]) < 1e-5, k


def test_backward_leaves_the_upstream_gradient_alone(rng):
    params, x, labels = tiny_problem(rng)
    logits, cache = cb.cnn_forward(params, x)
    dlogits = rng.standard_normal(logits.shape)
    before = dlogits.copy()
    cb.cnn_backward(dlogits, cache)
    np.testing.assert_array_equal(dlogits, before)
    d = rng.standard_normal((2, 3, 4, 5))
    before = d.copy()
    cb.maxpool_backward(d, cb.maxpool_forward(rng.standard_normal((2, 6, 8, 5)))[1])
    cb.pad_backward(d, 0)
    cb.rowconv_backward(d, cb.rowconv_forward(rng.standard_normal((2, 3, 4, 2)),
                                            rng.standard_normal((3, 3, 2, 5)), np.zeros(5))[1])
    np.testing.assert_array_equal(d, before)
