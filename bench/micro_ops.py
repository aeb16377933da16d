"""Single operations timed alone (one thread, one worker's 16 composites): the measurements behind
the README's Speed notes on what each rewrite saves by itself.

    python3 bench/micro_ops.py                        # the operations
    python3 bench/micro_ops.py --checkpoint run.npz   # also: Adam with the run's subnormal moments

Each line is the median of --repeat calls, in ms, old way first. Alone is not in context: in a real
step the two threads share memory bandwidth, so `bench/ab_step.py` decides what is kept.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import multimnist_capsnet as m  # noqa: E402
from bench_step import median_time  # noqa: E402


def ms(f, repeat):
    return median_time(f, repeat) * 1e3


def col2im_per_tap(d2, w, n, h, ho, stride):
    """The plain tap loop: each add moves C-long pieces."""
    k, c, f = w.shape[0], w.shape[2], w.shape[3]
    dx = np.zeros((n, h, h, c), d2.dtype)
    for i in range(k):
        dcols = (d2 @ w[i].reshape(k * c, f).T).reshape(n, ho, ho, k, c)
        for j in range(k):
            dx[:, i:i + stride * ho:stride, j:j + stride * ho:stride] += dcols[:, :, :, j]
    return dx


def uhat_jide(u, wj):
    """u_hat written straight into (N, J, I, E) by one matmul per digit capsule; wj (J, I, D, E)."""
    n, i_, _ = u.shape
    j, _, _, e = wj.shape
    ut = np.ascontiguousarray(u.transpose(1, 0, 2))
    uh = np.empty((n, j, i_, e), u.dtype)
    for jj in range(j):
        np.matmul(ut, wj[jj], out=uh[:, jj].transpose(1, 0, 2))
    return uh, ut


def uhat_jide_backward(duh, ut, wj):
    """Its input gradient: one matmul per digit capsule, summed."""
    g = duh.transpose(2, 0, 1, 3)                                    # (I, N, J, E)
    return sum(np.matmul(g[:, :, jj], wj[jj].transpose(0, 2, 1)) for jj in range(len(wj)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=40, help="calls timed per line (default: 40)")
    p.add_argument("--checkpoint", help="a saved default run: time Adam on its moments (default: skip)")
    args = p.parse_args()
    r = args.repeat
    m.keep_freed_memory()
    cfg = m.Config()
    rng = np.random.default_rng(0)
    f32 = np.float32
    n, i_, j, e, d = 16, cfg.n_primary, cfg.n_classes, cfg.digit_dim, cfg.primary_dim
    h1, g = cfg.grid()
    rows = []
    with m.worker_pool(2):  # BLAS at one thread, as in training
        out = np.maximum(rng.standard_normal((n, h1, h1, cfg.conv1_channels)), 0).astype(f32)
        dout = rng.standard_normal(out.shape).astype(f32)
        rows.append(("ReLU backward", "np.where(out > 0, dout, 0)", ms(lambda: np.where(out > 0, dout, 0), r),
                     "dout * (out > 0)", ms(lambda: m.relu_backward(dout, out), r)))
        c = rng.random((n, j, i_)).astype(f32)
        ds = rng.standard_normal((n, j, e)).astype(f32)
        rows.append(("routing outer product c*ds", "broadcast multiply",
                     ms(lambda: np.multiply(c.transpose(2, 0, 1)[..., None], ds, order="C"), r),
                     "einsum", ms(lambda: np.einsum("nji,nje->inje", c, ds, order="C"), r)))
        x = rng.standard_normal((n, h1, h1, cfg.conv1_channels)).astype(f32)
        w = (rng.standard_normal((cfg.kernel, cfg.kernel, cfg.conv1_channels,
                                  cfg.primary_types * d)) * 0.02).astype(f32)
        s, cache = m.conv_forward(x, w, np.zeros(w.shape[3], f32), cfg.primary_stride)
        d2 = rng.standard_normal(s.shape).astype(f32).reshape(-1, w.shape[3])
        full = ms(lambda: m.conv_backward(d2.reshape(s.shape), cache), r)
        no_dx = ms(lambda: m.conv_backward(d2.reshape(s.shape), cache, need_dx=False), r)
        rows.append(("PrimaryCaps image gradient", "per tap", ms(lambda: col2im_per_tap(
            d2, w, n, h1, g, cfg.primary_stride), r), "per output column (module)", full - no_dx))
        u = m.squash_forward(rng.standard_normal((n, i_, d)).astype(f32))[0]
        wd = (rng.standard_normal((i_, j, e, d)) * 0.05).astype(f32)
        wj = np.ascontiguousarray(wd.transpose(1, 0, 3, 2))
        uh, c_uh = m.uhat_forward(u, wd)
        duh = m.routing_backward(rng.standard_normal((n, j, e)).astype(f32),
                                 m.routing_forward(uh, cfg.routing_iters)[1])
        rows.append(("u_hat forward", "matmul + transpose (module)", ms(lambda: m.uhat_forward(u, wd), r),
                     "weights (J, I, D, E), no transpose", ms(lambda: uhat_jide(u, wj), r)))
        ut = uhat_jide(u, wj)[1]
        rows.append(("u_hat input gradient", "one batched matmul (module, with dW)",
                     ms(lambda: m.uhat_backward(duh, c_uh), r),
                     "weights (J, I, D, E), no dW", ms(lambda: uhat_jide_backward(duh, ut, wj), r)))
    mnist = m.synthetic_mnist(rng, n_train=64, n_test=1000)
    test = m.make_pairs(mnist["test_x"], mnist["test_y"], 1000, rng)
    params = m.init_params(cfg, rng)
    times = {}
    with m.worker_pool(cfg.workers) as pool:
        for eb in (64, 8):
            ecfg = m.Config(eval_batch=eb)
            times[eb] = ms(lambda: m.evaluate(params, ecfg, test, pool), max(3, r // 8))
    rows.append(("evaluate 1000 pairs, 2 workers", "batches of 64", times[64], "batches of 8", times[8]))
    if args.checkpoint:
        run = m.load_checkpoint(args.checkpoint)
        tiny = np.finfo(run.cfg.np_dtype).tiny
        grads = {k: (rng.standard_normal(a.shape) * 1e-3).astype(a.dtype) for k, a in run.params.items()}
        for k, mom in run.adam["m"].items():  # dead units get no gradient: keep them dead
            grads[k][np.abs(mom) < tiny] = 0

        def adam_with(moments):
            def step():
                state = dict(t=run.adam["t"], m={k: a.copy() for k, a in moments.items()},
                             v={k: a.copy() for k, a in run.adam["v"].items()})
                params_copy = {k: a.copy() for k, a in run.params.items()}
                t = time.perf_counter()
                m.adam_step(params_copy, grads, state, run.cfg.lr, workers=pool)
                return time.perf_counter() - t
            return float(np.median([step() for _ in range(r)])) * 1e3
        n_sub = sum(int(np.count_nonzero((a != 0) & (np.abs(a) < tiny))) for a in run.adam["m"].values())
        flushed = {k: np.where(np.abs(a) < tiny, 0, a).astype(a.dtype) for k, a in run.adam["m"].items()}
        with m.worker_pool(run.cfg.workers) as pool:
            rows.append((f"Adam, {n_sub} subnormal first moments", "as saved", adam_with(run.adam["m"]),
                         "flushed to zero", adam_with(flushed)))
    for what, a, ta, b, tb in rows:
        print(f"{what:<38}{a:<38}{ta:7.2f} ms   {b:<36}{tb:7.2f} ms   x{tb / ta:.2f}")


if __name__ == "__main__":
    main()
