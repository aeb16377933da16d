"""The whole model: loss_and_grads against finite differences for every parameter array."""
import concurrent.futures
import sys

import numpy as np
import pytest

import multimnist_capsnet as m
from gradcheck import parameter_errors

TINY = dict(canvas=12, kernel=3, conv1_channels=3, primary_types=2, primary_dim=4, digit_dim=5,
            decoder_h1=8, decoder_h2=9, recon_weight=0.5, dtype="float64")


def tiny_batch(cfg, rng, n=3):
    labels = np.array([rng.choice(10, 2, replace=False) for _ in range(n)])
    a, b = rng.uniform(size=(2, n, cfg.canvas ** 2))
    return dict(x=np.maximum(a, b).reshape(n, cfg.canvas, cfg.canvas, 1), a=a, b=b, labels=labels)


def check_every_parameter(cfg, rng, loss_fn=None):
    params = m.init_params(cfg, rng)
    params["digit_w"] *= 4  # longer capsules, so both sides of the margin loss are exercised
    for name in ("conv1_b", "primary_b", "dec1_b", "dec2_b", "dec3_b"):
        params[name] += rng.standard_normal(params[name].shape) * 0.1
    batch = tiny_batch(cfg, rng)
    _, grads, _ = m.loss_and_grads(params, batch, cfg)
    loss_fn = loss_fn or (lambda: m.loss_and_grads(params, batch, cfg)[0])
    return parameter_errors(loss_fn, params, grads, rng), params, batch


def test_every_parameter_gradient_full_routing():
    cfg = m.Config(**TINY, routing_grad="full")
    errors, _, _ = check_every_parameter(cfg, np.random.default_rng(1))
    assert set(errors) == set(m.init_shapes(cfg))
    assert max(errors.values()) < 1e-6, errors


def test_every_parameter_gradient_frozen_routing(monkeypatch):
    """frozen differentiates the model whose final coupling coefficients are constants: freeze them
    at the unperturbed values and finite-difference that function."""
    cfg = m.Config(**TINY, routing_grad="frozen")
    rng = np.random.default_rng(2)
    frozen_c = {}
    original = m.routing_forward

    def routing_with_frozen_c(uh, n_iters, bias=None, leaky=False):
        v, cache = original(uh, n_iters, bias, leaky)
        if "c" not in frozen_c:
            frozen_c["c"] = cache[1][-1][0].copy()
            return v, cache
        return m.squash_forward(np.einsum("nji,njie->nje", frozen_c["c"], uh))[0], cache
    monkeypatch.setattr(m, "routing_forward", routing_with_frozen_c)
    errors, _, _ = check_every_parameter(cfg, rng)
    assert max(errors.values()) < 1e-6, errors


def test_every_parameter_gradient_with_the_tf_reference_options():
    """Digit-capsule biases, leaky routing, the TF margin loss, exact routing. (The TF init changes
    no gradient code; its 4x longer votes here would make the routing too sharp for the finite
    differences at eps 1e-5: 3e-6 error.)"""
    cfg = m.Config(**TINY, routing_grad="full", digit_bias=True, bias_init=0.1,
                   leaky_routing=True, margin_loss="tf")
    errors, params, _ = check_every_parameter(cfg, np.random.default_rng(3))
    assert "digit_b" in errors and set(errors) == set(m.init_shapes(cfg))
    assert max(errors.values()) < 1e-6, errors


def test_truncated_init_uses_the_tf_references_stds_and_bias():
    cfg = m.Config(init="truncated", bias_init=0.1, digit_bias=True)
    p = m.init_params(cfg, np.random.default_rng(0))
    z = 0.8796  # the std of a unit normal truncated at 2
    for name, std in (("conv1_w", 0.05), ("primary_w", 0.1 / cfg.primary_types),
                      ("digit_w", 0.1), ("dec3_w", 0.1)):
        assert abs(p[name].std() / (std * z) - 1) < 0.05, name
        assert np.abs(p[name]).max() <= 2 * std * (1 + 1e-6), name
    assert all((p[k] == np.float32(0.1)).all() for k in p if k.endswith("_b"))
    assert p["digit_b"].shape == (10, cfg.digit_dim)


def test_default_float32_step_stays_float32():
    cfg = m.Config(**{**TINY, "dtype": "float32"})
    rng = np.random.default_rng(0)
    params = m.init_params(cfg, rng)
    batch = {k: (v.astype(np.float32) if k != "labels" else v) for k, v in tiny_batch(cfg, rng).items()}
    _, grads, aux = m.loss_and_grads(params, batch, cfg)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert aux["out"].dtype == np.float32


def test_default_architecture_shapes():
    cfg = m.Config()
    shapes = m.init_shapes(cfg)
    assert cfg.grid() == (28, 10) and cfg.n_primary == 800
    assert shapes["conv1_w"] == (9, 9, 1, 32)
    assert shapes["primary_w"] == (9, 9, 32, 64)
    assert shapes["digit_w"] == (800, 10, 16, 8)
    assert shapes["dec1_w"] == (160, 256) and shapes["dec2_w"] == (256, 512)
    assert shapes["dec3_w"] == (512, 1296)


def test_paper_preset_shapes():
    cfg = m.Config(**m.PRESETS["paper"])
    shapes = m.init_shapes(cfg)
    assert cfg.n_primary == 3200 and shapes["digit_w"] == (3200, 10, 16, 8)
    assert shapes["dec1_w"] == (160, 512) and shapes["dec3_w"] == (1024, 1296)


def test_training_on_synthetic_digits_learns():
    cfg = m.Config(n_train=256, n_test=100, n_epochs=3, conv1_channels=8, primary_types=4,
                   decoder_h1=32, decoder_h2=32)
    mnist = m.synthetic_mnist(np.random.default_rng(0))
    run = m.new_run(cfg)
    pool, test = m.make_data(cfg, mnist)
    assert m.train(run, mnist, pool, test, progress=False)
    first, last = run.history["epochs"][0], run.history["epochs"][-1]
    assert np.mean(run.history["margin"][-8:]) < np.mean(run.history["margin"][:8])
    assert last["set_acc"] > 1 / 45 * 5 and last["recon_mse"] < first["recon_mse"]


def test_evaluate_counts_hits():
    cfg = m.Config(canvas=12, kernel=3, conv1_channels=2, primary_types=1, primary_dim=2, digit_dim=2,
                   decoder_h1=3, decoder_h2=3)
    pairs = dict(x=np.zeros((2, 12, 12), np.uint8), a=np.zeros((2, 12, 12), np.uint8),
                 b=np.zeros((2, 12, 12), np.uint8), labels=np.array([[1, 2], [3, 4]]))
    v = np.zeros((2, 10, 2), np.float32)
    v[0, 1, 0], v[0, 2, 0] = 0.9, 0.8   # both right
    v[1, 3, 0], v[1, 7, 0] = 0.9, 0.8   # top-1 right, second wrong
    m_predict = m.predict
    try:
        m.predict = lambda *a: v
        out = m.evaluate(m.init_params(cfg, np.random.default_rng(0)), cfg, pairs)
    finally:
        m.predict = m_predict
    assert out["set_acc"] == 0.5 and out["soft_acc"] == 1.0 and out["top1"] == 1.0


def test_sharded_step_equals_one_batch():
    """Two worker threads, each on half the batch, give the full batch's loss and gradients."""
    cfg = m.Config(**TINY)
    rng = np.random.default_rng(3)
    params = m.init_params(cfg, rng)
    batch = tiny_batch(cfg, rng, n=5)  # odd: shards of 2 and 3, weighted by size
    loss, grads, aux = m.loss_and_grads(params, batch, cfg)
    assert cfg.workers == 2
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the sharding, whatever the BLAS
        loss2, grads2, aux2 = m.sharded_loss_and_grads(params, batch, cfg, pool)
    assert loss2 == pytest.approx(loss, rel=1e-12) and aux2["recon"] == pytest.approx(aux["recon"])
    for k in params:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(aux2["out"], aux["out"])


def test_adam_in_worker_threads_equals_serial():
    rng = np.random.default_rng(4)
    params = {"a": rng.standard_normal((7, 3)), "b": rng.standard_normal(5), "c": rng.standard_normal(1)}
    grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    serial, threaded = ({k: p.copy() for k, p in params.items()} for _ in range(2))
    s1, s2 = m.adam_init(params), m.adam_init(params)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            m.adam_step(serial, grads, s1, 0.01)
            m.adam_step(threaded, grads, s2, 0.01, workers=pool)
    for k in params:
        np.testing.assert_array_equal(serial[k], threaded[k])


def test_worker_pool_only_where_blas_threads_can_be_set():
    """Two threads each calling a multi-threaded BLAS are slower than one: the pool exists only
    where threadpoolctl can set this process's BLAS to one thread, and BLAS gets its thread count
    back afterwards."""
    blas = m.blas_limiter()
    threads = lambda: [c.num_threads for c in m.blas_limiter().lib_controllers]
    before = threads() if blas is not None else None
    with m.worker_pool(1) as pool:
        assert pool is None
    with m.worker_pool(2) as pool:
        assert (pool is None) == (blas is None)
        if blas is not None:
            assert threads() == [1] * len(before)
    if blas is not None:
        assert threads() == before


def test_worker_pool_runs_serially_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import now raises ImportError
    assert m.blas_limiter() is None
    with m.worker_pool(2) as pool:
        assert pool is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])
def test_divergence_guard_names_a_non_finite_gradient(bad):
    """NaN and inf anywhere, and a float32 norm that overflows (3e19 squared > 3.4e38)."""
    cfg = m.Config(**dict(TINY, dtype="float32"))
    run = m.new_run(cfg)
    grads = {k: np.ones_like(p) for k, p in run.params.items()}
    m.check_finite(run, 1.0, dict(margin=1.0, recon=0.0), grads, 1e-3)  # all finite: passes
    grads["primary_w"].reshape(-1)[7] = bad
    with pytest.raises(m.Diverged, match="gradient norm of primary_w is not finite"):
        m.check_finite(run, 1.0, dict(margin=1.0, recon=0.0), grads, 1e-3)


CNN = dict(model="cnn", canvas=12, cnn_conv1=3, cnn_conv2=4, cnn_fc=6, dtype="float64")


def test_cnn_model_gradient_through_loss_and_grads_for_every_parameter():
    """The dispatch path: --model cnn reaches the CNN's forward, loss and backward, every array."""
    cfg = m.Config(**CNN)
    rng = np.random.default_rng(12)  # no pre-ReLU value within 2e-3 of the kink (seed 5 has 7e-6)
    params = m.init_params(cfg, rng)
    assert set(params) == set(m.init_shapes(cfg)) and all(k.startswith("cnn_") for k in params)
    for k in params:
        if k.endswith("_b"):
            params[k] += 0.1 * rng.standard_normal(params[k].shape)
    batch = tiny_batch(cfg, rng)
    loss, grads, aux = m.loss_and_grads(params, batch, cfg)
    assert set(aux) == {"xent", "out"} and aux["out"].shape == (3, 10) and loss == aux["xent"]
    errors = parameter_errors(lambda: m.loss_and_grads(params, batch, cfg)[0], params, grads, rng)
    assert max(errors.values()) < 1e-7, errors


def test_cnn_sharded_step_equals_one_batch():
    cfg = m.Config(**CNN)
    rng = np.random.default_rng(6)
    params = m.init_params(cfg, rng)
    batch = tiny_batch(cfg, rng, n=5)
    loss, grads, _ = m.loss_and_grads(params, batch, cfg)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        loss2, grads2, aux2 = m.sharded_loss_and_grads(params, batch, cfg, pool)
    assert loss2 == pytest.approx(loss, rel=1e-12) and aux2["out"].shape == (5, 10)
    for k in params:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-13)


def test_cnn_trains_on_synthetic_digits_with_the_same_loop_and_metrics():
    cfg = m.Config(model="cnn", n_train=256, n_test=100, n_epochs=3, cnn_conv1=8, cnn_conv2=8,
                   cnn_fc=32)
    mnist = m.synthetic_mnist(np.random.default_rng(0))
    run = m.new_run(cfg)
    pool, test = m.make_data(cfg, mnist)
    assert m.train(run, mnist, pool, test, progress=False)
    assert set(run.history) == {"xent", "epochs"}
    last = run.history["epochs"][-1]
    assert np.mean(run.history["xent"][-8:]) < np.mean(run.history["xent"][:8])
    assert last["set_acc"] > 1 / 45 * 5 and "recon_mse" not in last and "train_xent" in last


def test_cnn_paper_widths_give_the_papers_24_56m_parameters():
    cfg = m.Config(model="cnn")
    shapes = m.init_shapes(m.Config(model="cnn", cnn_conv1=5, cnn_conv2=6, cnn_fc=7))
    assert shapes["cnn_fc_w"] == (9 * 9 * 6, 7)  # 'same' convolutions: 36 -> 18 -> 9
    assert m.cnn_param_count(cfg.cnn_arch) == 24_563_978
