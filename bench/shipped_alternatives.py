"""The alternatives tried for the shipped-size step, each timed against the module's own way.

    python3 bench/shipped_alternatives.py            # the shipped size (Conv1 64, 16 types)
    python3 bench/shipped_alternatives.py --rounds 40

One worker's shard (16 composites), one BLAS thread; Adam on every parameter with both workers,
as in training. Each group's variants are timed in alternation, --rounds times, so that the
machine's drift hits them alike; each line is a median in ms and its ratio to the module's way
(first in its group). docs/speed.md says which were kept.
"""
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import multimnist_capsnet as m  # noqa: E402
import bench_step  # noqa: E402

SHIPPED = dict(conv1_channels=64, primary_types=16, digit_bias=True)


def adam_blocked(block):
    """adam_step's update, one block of `block` numbers at a time (one scratch block a thread)."""
    def step(params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8, workers=None):
        state["t"] += 1
        size = lr / (1 - beta1 ** state["t"])
        vscale = 1 / math.sqrt(1 - beta2 ** state["t"])

        def update(piece):
            k, rows = piece
            p, g, mm, v = (np.reshape(a[k][rows], -1, copy=False)
                           for a in (params, grads, state["m"], state["v"]))
            scratch = np.empty(min(block, p.size), p.dtype)
            for s in range(0, p.size, block):
                pb, gb, mb, vb = (a[s:s + block] for a in (p, g, mm, v))
                tmp = scratch[:len(pb)]
                mb *= beta1
                mb += np.multiply(gb, 1 - beta1, out=tmp)
                vb *= beta2
                vb += np.multiply(np.square(gb, out=tmp), 1 - beta2, out=tmp)
                denom = np.sqrt(vb, out=tmp)
                denom *= vscale
                denom += eps
                np.divide(mb, denom, out=denom)
                denom *= size
                pb -= denom
        m.parallel_map(workers, update, m.row_pieces(params, 1 if workers is None else 2))
    return step


def uhat_blocks(u, w, block):
    """uhat_forward's loop with another block of capsules."""
    n, i_, d = u.shape
    _, j, e, _ = w.shape
    ut, wt = u.transpose(1, 0, 2), w.reshape(i_, j * e, d).transpose(0, 2, 1)
    uh = np.empty((n, j, i_, e), u.dtype)
    for a in range(0, i_, block):
        out = np.matmul(ut[a:a + block], wt[a:a + block])                    # (B, N, J*E)
        uh[:, :, a:a + block] = out.reshape(-1, n, j, e).transpose(1, 2, 0, 3)
    return uh


def col2im_pairs(dx, dcols, i, stride):
    """col2im_row with output columns x and x + Wo/2 in one add (their pixels do not overlap when
    stride * Wo / 2 >= K): half the calls, another order of the sums."""
    n, ho, wo, k, c = dcols.shape
    half = wo // 2
    rows = dx[:, i:i + stride * ho:stride]                                    # (N, Ho, W, C)
    for x in reversed(range(half)):
        st = rows[:, :, stride * x:].strides
        view = np.lib.stride_tricks.as_strided(rows[:, :, stride * x:], (n, ho, 2, k * c),
                                               (st[0], st[1], stride * half * st[2], st[3]))
        view += dcols.reshape(n, ho, 2, half, k * c)[:, :, :, x]


def main():
    p = m.ArgumentParser(prog="shipped_alternatives.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="alternating rounds (default: 30)")
    args = p.parse_args()
    m.keep_freed_memory()
    cfg = m.Config(**SHIPPED)
    rng = np.random.default_rng(0)
    f32 = np.float32
    n, i_, j, e, d = 16, cfg.n_primary, cfg.n_classes, cfg.digit_dim, cfg.primary_dim
    params = m.init_params(cfg, rng)
    grads = {name: (rng.standard_normal(a.shape) * 1e-3).astype(f32) for name, a in params.items()}
    u = m.squash_forward(rng.standard_normal((n, i_, d)).astype(f32))[0]
    uh, _ = m.uhat_forward(u, params["digit_w"])
    uhi = np.ascontiguousarray(uh.transpose(2, 0, 1, 3))                      # (I, N, J, E)
    cc = m.softmax(rng.standard_normal((n, j, i_)).astype(f32), 1)            # (N, J, I)
    ci = np.ascontiguousarray(cc.transpose(2, 0, 1))                          # (I, N, J)
    v = rng.standard_normal((n, j, e)).astype(f32)
    ut = np.ascontiguousarray(u.transpose(1, 0, 2))                           # (I, N, D)
    wt = np.ascontiguousarray(params["digit_w"].reshape(i_, j * e, d).transpose(0, 2, 1))
    _, dx = bench_step.primary_dx(cfg, n, rng)

    adam = {name: m.adam_init(params) for name in ("module", 14, 16, 18)}
    with m.worker_pool(2) as pool:  # BLAS at one thread; Adam on both workers
        groups = {
            "Adam, every parameter, 2 workers (wall)": {
                "whole arrays (module)": lambda: m.adam_step(params, grads, adam["module"], 1e-9,
                                                             workers=pool),
                **{f"blocks of 2^{b}": (lambda b=b: adam_blocked(1 << b)(
                    params, grads, adam[b], 1e-9, workers=pool)) for b in (14, 16, 18)}},
            "routing s = sum_i c u_hat, one call": {
                "(N, J, I, E) matmul (module)": lambda: np.matmul(cc[:, :, None, :], uh),
                "(I, N, J, E) einsum": lambda: np.einsum("inj,inje->nje", ci, uhi)},
            "routing agreement u_hat . v, one call": {
                "(N, J, I, E) matmul (module)": lambda: np.matmul(uh, v[..., None]),
                "(I, N, J, E) einsum": lambda: np.einsum("inje,nje->inj", uhi, v)},
            "u_hat forward": {
                "blocks of 102 capsules (module)": lambda: m.uhat_forward(u, params["digit_w"]),
                **{f"blocks of {b}": (lambda b=b: uhat_blocks(u, params["digit_w"], b))
                   for b in (25, 50, 200, 400)},
                "einsum into (N, J, I, E)": lambda: np.einsum("nid,ijed->njie", u,
                                                              params["digit_w"]),
                "its product alone, (I, N, J*E)": lambda: np.matmul(ut, wt)},
            "PrimaryCaps input gradient (9 GEMMs + col2im)": {
                "one output column an add (module)": lambda: dx(m.col2im_row),
                "two columns an add": lambda: dx(col2im_pairs)},
        }
        assert np.allclose(dx(m.col2im_row), dx(col2im_pairs), atol=1e-4)
        times = {name: bench_step.alternate(fns, args.rounds) for name, fns in groups.items()}
    print(f"shipped size, one worker's {n} composites, one BLAS thread, median of {args.rounds} "
          f"alternating rounds")
    for name, row in times.items():
        print(name)
        first = next(iter(row.values()))
        for variant, t in row.items():
            print(f"  {variant:<36}{t:8.2f} ms   x{t / first:.2f}")


if __name__ == "__main__":
    main()
