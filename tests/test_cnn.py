"""The CNN baseline's layers and whole network against centered finite differences, in float64."""
import numpy as np
import pytest

import multimnist_capsnet as m
from gradcheck import check, rel_error

TINY = m.CnnArch((9, 5), (3, 4), (8,), True, 10)  # 10 -> 10 -> 5 -> 5 -> 2: the second pool drops a row
# both of TINY's convolutions go by kernel rows (F < K*C); this one's conv1 (F >= K*C) by im2col
TINY_IM2COL = m.CnnArch((3, 3), (4, 2), (8,), True, 10)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def distinct(rng, shape):
    """Distinct values (a random permutation, spaced 1 apart, scaled): no max-pool ties."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) - 0.5 * np.prod(shape)) * 0.01


def tiny_problem(rng, n=2, dtype=np.float64, arch=TINY):
    params = m.cnn_init_params(arch, rng, dtype)
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
    out, _ = m.pad_forward(x, 2)
    assert out.shape == (2, 9, 8, 3)
    np.testing.assert_array_equal(out[:, 2:7, 2:6], x)
    out[:, 2:7, 2:6] = 0
    assert not out.any()


def test_pad_backward(rng):
    x = rng.standard_normal((2, 5, 4, 3))
    f = lambda: m.pad_forward(x, 2)[0]
    check(f, x, lambda d: m.pad_backward(d, m.pad_forward(x, 2)[1]), rng)


def padded_conv(x, w, b):
    """The 'same' convolution as pad + the valid im2col convolution, its reference."""
    return m.conv_forward(m.pad_forward(x, w.shape[0] // 2)[0], w, b, 1)[0]


ROWCONV_SHAPES = [(3, 3, 2), (5, 4, 3), (5, 1, 3)]  # (K, C, F): F below K*C, and C = 1


@pytest.mark.parametrize("k, c, f", ROWCONV_SHAPES)
def test_rowconv_forward_matches_padded_im2col(rng, k, c, f):
    x, w, b = rng.standard_normal((2, 6, 7, c)), rng.standard_normal((k, k, c, f)), rng.standard_normal(f)
    out, _ = m.rowconv_forward(x, w, b)
    np.testing.assert_allclose(out, padded_conv(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, c, f", ROWCONV_SHAPES)
def test_rowconv_backward(rng, k, c, f):
    x, w, b = rng.standard_normal((2, 6, 7, c)), rng.standard_normal((k, k, c, f)), rng.standard_normal(f)
    fwd = lambda: m.rowconv_forward(x, w, b)[0]
    grads = lambda d: m.rowconv_backward(d, m.rowconv_forward(x, w, b)[1])
    for i, a in enumerate((x, w, b)):
        check(fwd, a, lambda d: grads(d)[i], rng)


def test_rowconv_backward_without_dx_gives_same_weight_grads(rng):
    x, w, b = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 3, 2)), np.zeros(2)
    out, cache = m.rowconv_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    full, skip = m.rowconv_backward(dout, cache), m.rowconv_backward(dout, cache, need_dx=False)
    assert skip[0] is None
    np.testing.assert_array_equal(full[1], skip[1])
    np.testing.assert_array_equal(full[2], skip[2])


@pytest.mark.parametrize("c, f", [(1, 6), (3, 2)])  # F >= K*C: pad and im2col; F < K*C: rows
def test_same_conv_backward_on_both_paths(rng, c, f):
    x, w, b = rng.standard_normal((2, 5, 6, c)), rng.standard_normal((3, 3, c, f)), rng.standard_normal(f)
    out, cache = m.same_conv_forward(x, w, b)
    assert cache[0] is (m.rowconv_backward if f < 3 * c else m.conv_backward)
    np.testing.assert_allclose(out, padded_conv(x, w, b), rtol=1e-12, atol=1e-12)
    fwd = lambda: m.same_conv_forward(x, w, b)[0]
    grads = lambda d: m.same_conv_backward(d, m.same_conv_forward(x, w, b)[1])
    for i, a in enumerate((x, w, b)):
        check(fwd, a, lambda d: grads(d)[i], rng)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 9, 3)])
def test_maxpool_forward_matches_naive_loop(rng, shape):
    x = rng.standard_normal(shape)
    out, _ = m.maxpool_forward(x)
    np.testing.assert_array_equal(out, naive_maxpool(x))


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 9, 3)])
def test_maxpool_backward(rng, shape):
    x = distinct(rng, shape)
    f = lambda: m.maxpool_forward(x)[0]
    check(f, x, lambda d: m.maxpool_backward(d, m.maxpool_forward(x)[1]), rng)


def test_maxpool_backward_sends_a_tie_to_the_first_max_only(rng):
    x = np.zeros((1, 2, 2, 1))
    out, cache = m.maxpool_forward(x)
    dx = m.maxpool_backward(np.full(out.shape, 3.0), cache)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[3.0, 0.0], [0.0, 0.0]])


def broken_maxpool_backward(dout, cache):
    """Wrong on purpose: every window entry gets the output's gradient."""
    _, (n, h, w, c) = cache
    dx = np.zeros((n, h, w, c))
    dx[:, :h // 2 * 2, :w // 2 * 2] = dout.repeat(2, axis=1).repeat(2, axis=2)
    return dx


def test_gradient_check_rejects_a_broken_maxpool_backward(rng):
    x = distinct(rng, (2, 6, 8, 3))
    f = lambda: m.maxpool_forward(x)[0]
    with pytest.raises(AssertionError):
        check(f, x, lambda d: broken_maxpool_backward(d, m.maxpool_forward(x)[1]), rng)


def test_sigmoid_xent_forward_matches_naive_formula(rng):
    z, labels = 3 * rng.standard_normal((5, 10)), np.array([[0, 1], [2, 9], [5, 3], [7, 8], [4, 6]])
    loss, _ = m.sigmoid_xent_forward(z, labels)
    t = np.zeros((5, 10))
    for i, (a, b) in enumerate(labels):
        t[i, a] = t[i, b] = 1
    p = 1 / (1 + np.exp(-z))
    naive = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum() / 5
    assert abs(loss - naive) < 1e-12 * abs(naive)


def test_sigmoid_xent_is_finite_for_huge_logits():
    z = np.array([[1e3, -1e3, 1e3, -1e3, 0, 0, 0, 0, 0, 0]])
    loss, cache = m.sigmoid_xent_forward(z, np.array([[0, 1]]))
    # class 0 right (t=1, z=+1e3): 0; class 1 wrong (t=1, z=-1e3): 1e3; class 2 wrong: 1e3;
    # class 3 right: 0; six at z=0: log 2 each
    assert loss == pytest.approx(2e3 + 6 * np.log(2), rel=1e-12)
    assert np.all(np.isfinite(m.sigmoid_xent_backward(cache)))


def test_sigmoid_xent_backward(rng):
    z, labels = 3 * rng.standard_normal((4, 10)), np.array([[0, 1], [2, 9], [5, 3], [7, 8]])
    f = lambda: m.sigmoid_xent_forward(z, labels)[0]
    check(f, z, lambda d: d * m.sigmoid_xent_backward(m.sigmoid_xent_forward(z, labels)[1]),
          rng)


# ----------------------------------------------------------------------------------------------
# The whole network

def test_param_count_matches_the_paper_and_the_arrays(rng):
    assert m.cnn_param_count(m.Config().cnn_arch) == 24_563_978  # the paper: 24.56M
    params = m.cnn_init_params(TINY, rng, np.float64)
    assert m.cnn_param_count(TINY) == sum(a.size for a in params.values())
    assert params["cnn_conv1_w"].shape == (9, 9, 1, 3)
    assert params["cnn_conv2_w"].shape == (5, 5, 3, 4)
    assert params["cnn_fc_w"].shape == (2 * 2 * 4, 8)
    assert params["cnn_out_w"].shape == (8, 10)


def test_forward_shapes(rng):
    params, x, _ = tiny_problem(rng, n=3)
    logits, _ = m.cnn_forward(params, x)
    assert logits.shape == (3, 10)


def entries_to_check(grad, rng, n_top=15, n_random=15):
    """All entries of a small array; else the largest |grad| entries plus random ones."""
    if grad.size <= n_top + n_random:
        return None
    top = np.argsort(-np.abs(grad).reshape(-1))[:n_top]
    return sorted(set(top) | set(rng.choice(grad.size, n_random, replace=False)))


@pytest.mark.parametrize("arch", [TINY, TINY_IM2COL], ids=["rows", "im2col-conv1"])
@pytest.mark.parametrize("name", ["cnn_conv1_w", "cnn_conv1_b", "cnn_conv2_w", "cnn_conv2_b",
                                  "cnn_fc_w", "cnn_fc_b", "cnn_out_w", "cnn_out_b"])
def test_cnn_backward(rng, name, arch):
    params, x, labels = tiny_problem(rng, arch=arch)

    def loss():
        return m.sigmoid_xent_forward(m.cnn_forward(params, x)[0], labels)[0]

    def grads():
        logits, cache = m.cnn_forward(params, x)
        return m.cnn_backward(m.sigmoid_xent_backward(m.sigmoid_xent_forward(logits, labels)[1]),
                                cache)

    g = grads()
    assert set(g) == set(params)
    assert np.abs(g[name]).max() > 0  # a dead layer would pass the check vacuously
    check(loss, params[name], lambda d: d * grads()[name], rng, idx=entries_to_check(g[name], rng))


@pytest.mark.parametrize("arch", [TINY, TINY_IM2COL], ids=["rows", "im2col-conv1"])
def test_float32_in_float32_out(rng, arch):
    params, x, labels = tiny_problem(rng, dtype=np.float32, arch=arch)
    logits, cache = m.cnn_forward(params, x)
    loss, c_loss = m.sigmoid_xent_forward(logits, labels)
    dlogits = m.sigmoid_xent_backward(c_loss)
    grads = m.cnn_backward(dlogits, cache)
    assert logits.dtype == np.float32 and np.asarray(loss).dtype == np.float32
    assert dlogits.dtype == np.float32
    assert {k: g.dtype for k, g in grads.items()} == {k: np.dtype(np.float32) for k in params}
    # and they are the float64 gradients, to float32 accuracy
    p64 = {k: a.astype(np.float64) for k, a in params.items()}
    logits64, cache64 = m.cnn_forward(p64, x.astype(np.float64))
    g64 = m.cnn_backward(m.sigmoid_xent_backward(m.sigmoid_xent_forward(logits64, labels)[1]),
                           cache64)
    for k in params:
        assert rel_error(grads[k].astype(np.float64), g64[k]) < 1e-5, k


def test_backward_leaves_the_upstream_gradient_alone(rng):
    params, x, labels = tiny_problem(rng)
    logits, cache = m.cnn_forward(params, x)
    dlogits = rng.standard_normal(logits.shape)
    before = dlogits.copy()
    m.cnn_backward(dlogits, cache)
    np.testing.assert_array_equal(dlogits, before)
    d = rng.standard_normal((2, 3, 4, 5))
    before = d.copy()
    m.maxpool_backward(d, m.maxpool_forward(rng.standard_normal((2, 6, 8, 5)))[1])
    m.pad_backward(d, 0)
    m.rowconv_backward(d, m.rowconv_forward(rng.standard_normal((2, 3, 4, 2)),
                                            rng.standard_normal((3, 3, 2, 5)), np.zeros(5))[1])
    np.testing.assert_array_equal(d, before)
