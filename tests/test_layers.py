"""Every layer's backward against centered finite differences, in float64."""
import numpy as np
import pytest

import multimnist_capsnet as m
from gradcheck import check, rel_error


@pytest.fixture
def rng():
    return np.random.default_rng(0)


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
    out, _ = m.conv_forward(x, w, b, stride)
    np.testing.assert_allclose(out, naive_conv(x, w, b, stride), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_backward(rng, stride):
    x, w, b = rng.standard_normal((2, 9, 10, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
    f = lambda: m.conv_forward(x, w, b, stride)[0]
    grads = lambda dout: m.conv_backward(dout, m.conv_forward(x, w, b, stride)[1])
    check(f, x, lambda d: grads(d)[0], rng)
    check(f, w, lambda d: grads(d)[1], rng)
    check(f, b, lambda d: grads(d)[2], rng)


def test_conv_backward_without_dx_gives_same_weight_grads(rng):
    x, w, b = rng.standard_normal((2, 9, 9, 2)), rng.standard_normal((3, 3, 2, 4)), np.zeros(4)
    out, cache = m.conv_forward(x, w, b, 2)
    dout = rng.standard_normal(out.shape)
    full, skip = m.conv_backward(dout, cache), m.conv_backward(dout, cache, need_dx=False)
    assert skip[0] is None
    np.testing.assert_array_equal(full[1], skip[1])


def test_relu_backward(rng):
    x = rng.standard_normal((4, 7))
    check(lambda: m.relu_forward(x)[0], x, lambda d: m.relu_backward(d, m.relu_forward(x)[1]), rng)


def test_squash_forward_keeps_direction_and_bounds_length(rng):
    s = rng.standard_normal((5, 8)) * np.array([[1e-3], [0.5], [1], [3], [100]])
    v, _ = m.squash_forward(s)
    n = np.linalg.norm(s, axis=1)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), n ** 2 / (1 + n ** 2), rtol=1e-12)
    np.testing.assert_allclose(v / np.linalg.norm(v, axis=1, keepdims=True), s / n[:, None])


def test_squash_backward(rng):
    s = rng.standard_normal((3, 4, 8))
    check(lambda: m.squash_forward(s)[0], s, lambda d: m.squash_backward(d, m.squash_forward(s)[1]), rng)


def test_squash_at_zero_is_zero_with_finite_gradient(rng):
    s = np.zeros((2, 8))
    v, cache = m.squash_forward(s)
    ds = m.squash_backward(rng.standard_normal((2, 8)), cache)
    assert np.all(v == 0) and np.all(np.isfinite(ds))


def test_uhat_forward_matches_einsum(rng):
    u, w = rng.standard_normal((3, 6, 4)), rng.standard_normal((6, 5, 7, 4))
    uh, _ = m.uhat_forward(u, w)
    np.testing.assert_allclose(uh, np.einsum("nid,ijed->njie", u, w), rtol=1e-12)


def test_uhat_backward(rng):
    u, w = rng.standard_normal((3, 6, 4)), rng.standard_normal((6, 5, 7, 4))
    f = lambda: m.uhat_forward(u, w)[0]
    grads = lambda d: m.uhat_backward(d, m.uhat_forward(u, w)[1])
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
    np.testing.assert_allclose(m.routing_forward(uh, iters)[0], naive_routing(uh, iters), rtol=1e-12)


def test_routing_coupling_sums_to_one_over_digit_capsules(rng):
    _, (_, iters, _) = m.routing_forward(rng.standard_normal((2, 4, 6, 3)), 3)
    for c, _, _ in iters:
        np.testing.assert_allclose(c.sum(1), 1)


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_routing_backward_full_is_exact(rng, iters):
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.7
    check(lambda: m.routing_forward(uh, iters)[0], uh,
          lambda d: m.routing_backward(d, m.routing_forward(uh, iters)[1], full=True), rng)


def test_routing_backward_frozen_differentiates_the_frozen_c_function(rng):
    """With c frozen at its unperturbed value, v = squash(sum_i c_ij uh_ij) exactly."""
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.7
    c_final = m.routing_forward(uh, 3)[1][1][-1][0].copy()
    frozen = lambda: m.squash_forward(np.einsum("nji,njie->nje", c_final, uh))[0]
    np.testing.assert_allclose(frozen(), m.routing_forward(uh, 3)[0])
    check(frozen, uh, lambda d: m.routing_backward(d, m.routing_forward(uh, 3)[1], full=False), rng)


def test_frozen_and_full_routing_gradients_differ(rng):
    uh = rng.standard_normal((2, 4, 6, 3)) * 0.7
    v, cache = m.routing_forward(uh, 3)
    d = rng.standard_normal(v.shape)
    assert rel_error(m.routing_backward(d, cache, False), m.routing_backward(d, cache, True)) > 1e-3


def test_leaky_coupling_is_the_softmax_with_a_zero_logit_dropped(rng):
    b = rng.standard_normal((2, 4, 6)) * 3
    full = m.softmax(np.concatenate([np.zeros((2, 1, 6)), b], axis=1), axis=1)
    np.testing.assert_allclose(m.coupling(b, leaky=True), full[:, 1:], rtol=1e-12)
    assert (m.coupling(b, leaky=True).sum(1) < 1).all()
    big = np.full((1, 3, 2), 800.0)  # exp(800) overflows: the max is taken out first
    np.testing.assert_allclose(m.coupling(big, leaky=True), 1 / 3)


def routing_variant(uh, iters, bias, leaky):
    """The plain forward with the bias added to every s_j and the leaky coupling."""
    b = np.zeros(uh.shape[:3])
    for r in range(iters):
        c = m.coupling(b, leaky)
        v = m.squash_forward(np.einsum("nji,njie->nje", c, uh) + bias)[0]
        b = b + np.einsum("njie,nje->nji", uh, v)
    return v


@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_routing_with_bias_and_leak_full_backward_is_exact(rng, iters, leaky):
    """Both the votes' and the bias's gradient, through every iteration."""
    uh, bias = rng.standard_normal((2, 4, 6, 3)) * 0.7, rng.standard_normal((4, 3)) * 0.3
    f = lambda: m.routing_forward(uh, iters, bias, leaky)[0]
    np.testing.assert_allclose(f(), routing_variant(uh, iters, bias, leaky), rtol=1e-12)
    grads = lambda d: m.routing_backward(d, m.routing_forward(uh, iters, bias, leaky)[1], True)
    check(f, uh, lambda d: grads(d)[0], rng)
    check(f, bias, lambda d: grads(d)[1], rng)


def test_routing_with_bias_frozen_backward_differentiates_the_frozen_c_function(rng):
    uh, bias = rng.standard_normal((2, 4, 6, 3)) * 0.7, rng.standard_normal((4, 3)) * 0.3
    c_final = m.routing_forward(uh, 3, bias, True)[1][1][-1][0].copy()
    frozen = lambda: m.squash_forward(np.einsum("nji,njie->nje", c_final, uh) + bias)[0]
    grads = lambda d: m.routing_backward(d, m.routing_forward(uh, 3, bias, True)[1], False)
    check(frozen, uh, lambda d: grads(d)[0], rng)
    check(frozen, bias, lambda d: grads(d)[1], rng)


def test_margin_loss_value_by_hand():
    v = np.zeros((1, 10, 2))
    v[0, 3] = [0.6, 0.0]    # label, too short: (0.9 - 0.6)^2 = 0.09
    v[0, 5] = [0.0, 0.95]   # label, long enough: 0
    v[0, 7] = [0.3, 0.4]    # not a label, length 0.5: 0.5 * 0.4^2 = 0.08
    loss, _ = m.margin_forward(v, np.array([[3, 5]]))
    assert loss == pytest.approx(0.09 + 0.08)


@pytest.mark.parametrize("scale", [1.0, 1 / 20])
def test_margin_backward(rng, scale):
    v = rng.standard_normal((4, 10, 5)) * 0.4
    labels = np.array([[0, 1], [2, 9], [5, 3], [7, 8]])
    check(lambda: m.margin_forward(v, labels, scale)[0], v,
          lambda d: d * m.margin_backward(m.margin_forward(v, labels, scale)[1]), rng)


def test_tf_margin_loss_is_the_mean_over_classes_halved(rng):
    """The TF reference: 0.5 T pos^2 + 0.25 (1 - T) neg^2, averaged over batch and classes."""
    v = rng.standard_normal((4, 10, 5)) * 0.4
    labels = np.array([[0, 1], [2, 9], [5, 3], [7, 8]])
    t = np.zeros((4, 10))
    t[np.arange(4)[:, None], labels] = 1
    length = np.linalg.norm(v, axis=-1)
    tf = (0.5 * t * np.maximum(0, 0.9 - length) ** 2
          + 0.25 * (1 - t) * np.maximum(0, length - 0.1) ** 2).mean()
    assert m.margin_forward(v, labels, m.MARGIN_SCALE["tf"])[0] == pytest.approx(tf, rel=1e-12)


def decoder_params(rng, e=3, hw=16):
    shapes = dict(dec1_w=(10 * e, 6), dec1_b=(6,), dec2_w=(6, 7), dec2_b=(7,), dec3_w=(7, hw), dec3_b=(hw,))
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def test_mask_forward_keeps_only_the_chosen_capsule(rng):
    v = rng.standard_normal((3, 10, 2))
    labels = np.array([[1, 4], [0, 9], [7, 2]])
    z, _ = m.mask_forward(v, labels)
    z = z.reshape(2, 3, 10, 2)
    for k in range(2):
        for n in range(3):
            np.testing.assert_array_equal(z[k, n, labels[n, k]], v[n, labels[n, k]])
            assert np.count_nonzero(z[k, n]) == np.count_nonzero(v[n, labels[n, k]])


def test_mask_backward(rng):
    v, labels = rng.standard_normal((3, 10, 2)), np.array([[1, 4], [0, 9], [7, 2]])
    check(lambda: m.mask_forward(v, labels)[0], v,
          lambda d: m.mask_backward(d, m.mask_forward(v, labels)[1]), rng)


def test_decoder_and_reconstruction_loss_backward(rng):
    p = decoder_params(rng)
    z, target = rng.standard_normal((4, 30)), rng.uniform(size=(4, 16))

    def loss():
        return m.recon_forward(m.decoder_forward(z, p)[0], target, 2)[0]

    def grads():
        recon, cache = m.decoder_forward(z, p)
        return m.decoder_backward(m.recon_backward(m.recon_forward(recon, target, 2)[1]), cache)
    check(loss, z, lambda d: d * grads()[0], rng)
    for name in p:
        check(loss, p[name], lambda d: d * grads()[1][name], rng)


def test_recon_loss_is_sum_over_pixels_mean_over_composites():
    recon, target = np.full((4, 5), 0.5), np.zeros((4, 5))  # 2 composites x 2 passes x 5 pixels
    assert m.recon_forward(recon, target, 2)[0] == pytest.approx(4 * 5 * 0.25 / 2)


def test_adam_two_steps_by_hand():
    p, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, -1.0]), np.array([-0.1, 0.2])
    params, state = {"w": p.copy()}, m.adam_init({"w": p})
    m.adam_step(params, {"w": g1}, state, lr=0.1)
    # step 1: m = 0.1 g1, v = 0.001 g1^2; bias-corrected m_hat = g1, v_hat = g1^2 -> p - 0.1 sign(g1)
    np.testing.assert_allclose(params["w"], p - 0.1 * g1 / (np.abs(g1) + 1e-8))
    m.adam_step(params, {"w": g2}, state, lr=0.1)
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
    uh, _ = m.uhat_forward(u, w)
    np.testing.assert_allclose(uh, np.einsum("nid,ijed->njie", u, w), rtol=1e-12, atol=1e-12)


def test_adam_keeps_float32():
    params = {"w": np.ones(3, np.float32)}
    state = m.adam_init(params)
    m.adam_step(params, {"w": np.ones(3, np.float32)}, state, lr=1e-3)
    assert params["w"].dtype == np.float32 and state["v"]["w"].dtype == np.float32


def test_learning_rate_decay():
    cfg = m.Config(lr=0.01, lr_decay=0.96, lr_decay_steps=100)
    assert m.learning_rate(cfg, 0) == 0.01
    assert m.learning_rate(cfg, 200) == pytest.approx(0.01 * 0.96 ** 2)


def test_learning_rate_warm_up_and_cosine():
    cfg = m.Config(lr=0.01, lr_decay=0.96, lr_decay_steps=100, lr_warmup_steps=10)
    assert m.learning_rate(cfg, 0) == pytest.approx(0.001)
    assert m.learning_rate(cfg, 4) == pytest.approx(0.005 * 0.96 ** 0.04)  # both factors
    assert m.learning_rate(cfg, 200) == pytest.approx(0.01 * 0.96 ** 2)  # warm-up is over
    cos = m.Config(lr=0.01, lr_schedule="cosine", n_epochs=2, n_train=640, batch_size=32)  # 40 steps
    assert m.learning_rate(cos, 0) == 0.01
    assert m.learning_rate(cos, 20) == pytest.approx(0.005)
    assert m.learning_rate(cos, 40) == pytest.approx(0, abs=1e-18)


def test_truncated_normal_stays_within_two_std():
    z = m.truncated_normal(np.random.default_rng(0), (100_000,), 0.1)
    assert np.abs(z).max() <= 0.2 and abs(z.std() - 0.088) < 0.001  # 0.1 * 0.8796, TF's too


def test_ema_step_and_its_debiased_average():
    """ema after steps p1, p2 (decay d, zero start): (1-d)(d p1 + p2) / (1 - d^2)."""
    cfg = m.Config(ema=0.9)
    p1, p2 = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    run = m.Run(cfg, {"w": p1.copy()}, None, None, ema={"w": np.zeros(2)})
    assert run.eval_params["w"] is run.params["w"]  # step 0: nothing averaged yet
    m.ema_step(run)
    run.step, run.params["w"][:] = 1, p2
    m.ema_step(run)
    run.step = 2
    np.testing.assert_allclose(run.eval_params["w"], (0.9 * p1 + p2) * 0.1 / (1 - 0.81))


def test_a_broken_backward_fails_the_check(rng):
    """The check can fail: squash's backward without its radial term is caught."""
    s = rng.standard_normal((3, 4, 8))

    def broken(dv):
        _, _, _, g = m.squash_forward(s)[1]
        return g * dv  # drops g'(n) (s . dv) s / n
    with pytest.raises(AssertionError, match="relative error"):
        check(lambda: m.squash_forward(s)[0], s, broken, rng)
