"""How much of a step above its matrix products can NumPy not remove?

    python3 bench/floor_gap.py --conv1-channels 64 --primary-types 16 --digit-bias   # shipped size
    python3 bench/floor_gap.py                                                     # default size

Times, on one worker's shard (batch / workers composites) and one BLAS thread, alternating so that
the machine's drift hits all alike: the shard's matrix products alone (bench_step's floor), and
three passes that every NumPy version of this step makes, because NumPy has no convolution and no
fused elementwise kernel: PrimaryCaps' im2col copy, its col2im scatter-add (the kernel rows'
column gradients added into the input gradient, timed as GEMM + add minus GEMM alone), and Adam
over every parameter (both workers, wall time). Prints their medians and their sum as a fraction
of the products: a step within 1.1x of its products leaves 10% for all of these and everything
else (squash, routing's softmax, ReLU, u_hat's layout, the shards' gradient sum).
"""
import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_step  # noqa: E402

m = bench_step.m


def main():
    p = m.ArgumentParser(prog="floor_gap.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=25, help="alternating rounds (default: 25)")
    m.add_training_flags(p)
    args, cfg = bench_step.capsnet_args(p)
    m.keep_freed_memory()
    rng = np.random.default_rng(0)
    n = cfg.batch_size // cfg.workers
    one = dataclasses.replace(cfg, batch_size=n, workers=1)
    params = m.init_params(cfg, rng)
    grads = {k: rng.standard_normal(a.shape).astype(a.dtype) * 1e-3 for k, a in params.items()}
    adam = m.adam_init(params)
    blas = m.blas_limiter()
    with m.worker_pool(cfg.workers) as pool, (blas.limit(limits=1) if blas else contextlib.nullcontext()):
        work, run = bench_step.floor_products(one, None, rng)
        x, dx = bench_step.primary_dx(cfg, n, rng)
        ms = bench_step.alternate({
            "products alone": lambda: run(range(len(work))),
            "im2col": lambda: m.im2col(x, cfg.kernel, cfg.primary_stride),
            "dx GEMMs": lambda: dx(None), "dx GEMMs + col2im": lambda: dx(m.col2im_row),
            "Adam (wall, all workers)": lambda: m.adam_step(params, grads, adam, 1e-9,
                                                            workers=pool)}, args.rounds)
    gap = {"PrimaryCaps im2col": ms["im2col"],
           "PrimaryCaps col2im adds": ms["dx GEMMs + col2im"] - ms["dx GEMMs"],
           "Adam": ms["Adam (wall, all workers)"]}
    print(f"one worker's shard of {n} composites, one BLAS thread, median of {args.rounds} "
          f"alternating rounds")
    for k, t in ms.items():
        print(f"  {k:<30}{t:8.2f} ms")
    print("passes every NumPy version of the step makes (Adam: as the module runs it), against "
          "the products alone")
    for k, t in gap.items():
        print(f"  {k:<30}{t:8.2f} ms  {t / ms['products alone']:6.1%}")
    total = sum(gap.values())
    print(f"  {'together':<30}{total:8.2f} ms  {total / ms['products alone']:6.1%}")


if __name__ == "__main__":
    main()
