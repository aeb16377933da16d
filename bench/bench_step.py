"""How fast is a training step, against what this CPU can do?

    python3 bench/bench_step.py            # everything, including a full default run (~2.5 min)
    python3 bench/bench_step.py --no-full  # skip the full run
    python3 bench/bench_step.py --no-full --conv1-channels 64 --primary-types 16 --digit-bias
                                           # any size: the module's capacity (and other) flags
    python3 bench/bench_step.py --vs-floor 40 --conv1-channels 64 --primary-types 16 --digit-bias
                                           # only the step against its products alone

Prints one table: the machine's sgemm/dgemm rate, the median step (forward, backward, guard, Adam) at
float32/float64 and batch 32/64/128 with its fraction of the sgemm peak, the default step's matrix
products alone (nothing but the products, as the module computes them), the time of each phase of
a default step (float32, batch 32, two worker threads: each phase's time on one core; Adam's is
its wall time), and the wall time and peak memory of the default 8-epoch run. --vs-floor times
steps and passes of the products alone in alternation and prints the median of their ratios,
which stays put where the machine's speed moves both (see docs/speed.md).
"""
import argparse
import dataclasses
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import multimnist_capsnet as m  # noqa: E402


def median_time(f, repeat):
    f()  # warm up caches and BLAS buffers
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def gemm_rate(dtype, n=2048, repeat=7):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    return 2 * n ** 3 / median_time(lambda: a @ a, repeat)


def matmuls(cfg: m.Config, n: int) -> list[tuple[str, tuple, tuple]]:
    """(layer, shape of A, shape of B) of every matrix product A @ B of one training step on n
    composites, forward and backward, in the shapes the module uses (more than two axes: a batched
    product). Routing's backward outer product c ds is the product with inner size 1 (the code
    uses einsum). The routing backward counted is the default, routing_grad='frozen'."""
    k, c1, td = cfg.kernel, cfg.conv1_channels, cfg.primary_types * cfg.primary_dim
    h1, g = cfg.grid()
    i, j, e, d, r = cfg.n_primary, cfg.n_classes, cfg.digit_dim, cfg.primary_dim, cfg.routing_iters
    pix, prim = n * h1 * h1, n * g * g
    out = [("conv1", (pix, k * k), (k * k, c1)), ("conv1", (k * k, pix), (pix, c1))]  # no dx
    out += [("PrimaryCaps", (prim, k * k * c1), (k * k * c1, td)),
            ("PrimaryCaps", (k * k * c1, prim), (prim, td))]
    out += [("PrimaryCaps", (prim, td), (td, k * c1))] * k             # dx, one kernel row each
    out += [("u_hat", (i, n, d), (i, d, j * e)), ("u_hat", (i, j * e, n), (i, n, d)),
            ("u_hat", (i, n, j * e), (i, j * e, d))]
    out += [("routing", (n, j, 1, i), (n, j, i, e))] * r               # s = c u_hat
    out += [("routing", (n, j, i, e), (n, j, e, 1))] * (r - 1)         # agreements u_hat . v
    out += [("routing", (n, j, i, 1), (n, j, 1, e))]                   # backward: c ds
    widths = (j * e, cfg.decoder_h1, cfg.decoder_h2, cfg.canvas ** 2)
    for a, b in zip(widths[:-1], widths[1:]):                           # both digits at once
        out += [("decoder", (2 * n, a), (a, b)), ("decoder", (2 * n, b), (b, a)),
                ("decoder", (a, 2 * n), (2 * n, b))]
    return out


def flops(products) -> float:
    """Multiply-adds x 2 of (layer, A shape, B shape) products (batched: same batch shape)."""
    return float(sum(2 * math.prod(a) * b[-1] for _, a, b in products))


def step_flops(cfg: m.Config, n: int) -> float:
    """Multiply-adds x 2 of one training step's matrix products (forward + backward)."""
    return flops(matmuls(cfg, n))


def floor_products(cfg: m.Config, pool, rng: np.random.Generator):
    """The step's matrix products as the module computes them, for each worker's shard, on fresh
    random contiguous operands: (work, run) with work[i] the (layer, A shape, B shape) list of
    shard 0 and run(picked) one pass of the picked products on every worker at once."""
    n_shards = cfg.workers if pool is not None else 1
    shards = np.diff(np.linspace(0, cfg.batch_size, n_shards + 1).astype(int))
    work = [matmuls(cfg, int(n)) for n in shards]
    operands = [[(rng.standard_normal(a).astype(cfg.np_dtype),
                  rng.standard_normal(b).astype(cfg.np_dtype)) for _, a, b in w] for w in work]

    def products(ops):
        for a, b in ops:
            if a.shape[-1] == 1:  # an outer product: einsum, as the module does
                np.einsum("...ik,...kj->...ij", a, b)
            else:
                a @ b

    def run(picked):
        m.parallel_map(pool, products, [[ops[i] for i in picked] for ops in operands])
    return work[0], run


def matmul_floor(cfg: m.Config, repeat: int) -> dict[str, tuple[int, float, float]]:
    """The step's matrix products alone (floor_products), all workers at once.

    Returns layer -> (products, median seconds, FLOP/s of one core), and "all" for every product
    of the step in one go. "all" takes longer than the layers' sum: one layer's operands stay in
    cache from one repeat to the next, the whole step's do not (nor do they in training)."""
    out = {}
    with m.worker_pool(cfg.workers) as pool:
        work, run = floor_products(cfg, pool, np.random.default_rng(0))
        for only in [*dict.fromkeys(layer for layer, _, _ in work), "all"]:
            picked = [i for i, (layer, _, _) in enumerate(work) if only in (layer, "all")]
            t = median_time(lambda: run(picked), repeat)
            out[only] = (len(picked), t, flops([work[i] for i in picked]) / t)
    return out


def alternate(fns: dict, rounds: int) -> dict[str, float]:
    """{name: median ms} of the callables fns, each called once to warm up, then `rounds` times
    in alternation (reversed order every other round), so that the machine's drift hits them
    alike."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in ts.items()}


def primary_dx(cfg: m.Config, n: int, rng: np.random.Generator):
    """PrimaryCaps' input gradient as the module computes it, on n composites of random data:
    (x, dx) with x the layer's input (N, H, W, C1) and dx(add) the nine kernel rows' column-
    gradient GEMMs, each followed by add(dx, dcols, i, stride) unless add is None."""
    k, st, c1 = cfg.kernel, cfg.primary_stride, cfg.conv1_channels
    f, h = cfg.primary_types * cfg.primary_dim, cfg.grid()[0]
    x = rng.standard_normal((n, h, h, c1)).astype(cfg.np_dtype)
    w = (rng.standard_normal((k, k, c1, f)) * 0.02).astype(cfg.np_dtype)
    out, _ = m.conv_forward(x, w, np.zeros(f, cfg.np_dtype), st)
    d2 = rng.standard_normal(out.shape).astype(cfg.np_dtype).reshape(-1, f)  # (N*Ho*Wo, F)
    ho = out.shape[1]

    def dx(add):
        grad = np.zeros(x.shape, cfg.np_dtype)
        for i in range(k):
            dcols = (d2 @ w[i].reshape(k * c1, f).T).reshape(n, ho, ho, k, c1)
            if add is not None:
                add(grad, dcols, i, st)
        return grad
    return x, dx


def cpu_ticks() -> np.ndarray | None:
    """The machine's CPU time so far in clock ticks, all cores: user, nice, system, idle, iowait,
    irq, softirq, steal (Linux /proc/stat), or None elsewhere."""
    try:
        return np.array([int(t) for t in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]])
    except (OSError, ValueError):
        return None


def step_vs_floor(cfg: m.Config, pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Seconds of `pairs` training steps and `pairs` passes of the step's products alone ("all"),
    timed in alternation (step first in even pairs, products first in odd ones), so that the
    machine's drift, which moves both by 20-50% on a shared VM, hits the two alike: the ratio of
    a pair is steady where neither time is. Also the cores' clock ticks (cpu_ticks) spent during
    the steps alone, or None."""
    with m.worker_pool(cfg.workers) as pool:
        step = make_step(cfg, cfg.batch_size, pool)
        work, run = floor_products(cfg, pool, np.random.default_rng(0))
        floor = lambda: run(range(len(work)))  # noqa: E731
        step(), floor()  # warm up
        times = {step: [], floor: []}
        ticks = None if cpu_ticks() is None else np.zeros(8, int)
        for i in range(pairs):
            for f in (step, floor) if i % 2 == 0 else (floor, step):
                t, before = time.perf_counter(), cpu_ticks()
                f()
                times[f].append(time.perf_counter() - t)
                if f is step and ticks is not None:
                    ticks += cpu_ticks() - before
    return np.array(times[step]), np.array(times[floor]), ticks


def print_step_vs_floor(cfg: m.Config, pairs: int) -> None:
    s, f, ticks = step_vs_floor(cfg, pairs)

    def spread(a, scale=1e3, fmt=".1f"):
        lo, mid, hi = np.percentile(a, [25, 50, 75]) * scale
        return f"{mid:{fmt}} (quartiles {lo:{fmt}}-{hi:{fmt}})"
    print(f"step against its products alone, {pairs} alternating pairs, {cfg.dtype} batch "
          f"{cfg.batch_size}, {cfg.workers} workers")
    print(f"  step (fwd+bwd+guard+adam), ms     {spread(s)}")
    print(f"  products alone ('all'), ms        {spread(f)}")
    print(f"  step / products, the pairs' ratio {spread(s / f, 1, '.3f')}")
    if ticks is not None and ticks.sum():
        busy, idle, steal = ticks[[0, 1, 2, 5, 6]].sum(), ticks[[3, 4]].sum(), ticks[7]
        print(f"  the cores during the steps: busy {busy / ticks.sum():.1%}, idle "
              f"{idle / ticks.sum():.1%}, taken by the hypervisor (steal) {steal / ticks.sum():.1%}")


def training_batch(cfg: m.Config, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n composites (--task mnist: single digits) of synthetic glyphs (no MNIST needed) as one
    batch in cfg's dtype. Composites are drawn without the IoU demand: random glyphs cannot
    always reach IoU 0.8 (one failed at Conv1 8), and a step's time does not depend on the pixels."""
    mnist = m.synthetic_mnist(rng, n_train=max(n, 64), n_test=10)
    if cfg.task == "mnist":  # single shifted digits, and the CNN's dropout mask as train() draws it
        pairs = m.shift_digits(mnist["train_x"][:n], mnist["train_y"][:n], rng, cfg.max_shift)
    else:
        pairs = m.make_pairs(mnist["train_x"], mnist["train_y"], n, rng, min_iou=0.0,
                             overlay=cfg.overlay)
    batch = m.batch_arrays(pairs, np.arange(n), cfg.np_dtype)
    if m.uses_dropout(cfg):
        batch["keep"] = m.dropout_mask(rng, (n, cfg.cnn_fc2), cfg.cnn_dropout, cfg.np_dtype)
    return batch


def make_step(cfg: m.Config, n: int, workers=None):
    """One training step as train() runs it: (sharded) forward + backward, the divergence guard,
    then Adam."""
    m.keep_freed_memory()  # as train() does
    rng = np.random.default_rng(0)
    params = m.init_params(cfg, rng)
    run = m.Run(cfg, params, m.adam_init(params), rng.bit_generator.state)
    batch = training_batch(cfg, n, rng)

    def step():
        loss, grads, aux = m.sharded_loss_and_grads(run.params, batch, cfg, workers)
        m.check_finite(run, loss, aux, grads, cfg.lr)
        m.adam_step(run.params, grads, run.adam, cfg.lr, workers=workers)
    return step


def primary_gemm_rate(cfg: m.Config, n: int, repeat: int) -> float:
    """FLOP/s of one thread on the PrimaryCaps forward GEMM of n composites (one worker's share),
    the matrix work that dominates a step: cols (n*G*G, K*K*C1) @ w (K*K*C1, types*D)."""
    g = cfg.grid()[1]
    rows, depth = n * g * g, cfg.kernel ** 2 * cfg.conv1_channels
    cols_per = cfg.primary_types * cfg.primary_dim
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, depth)).astype(cfg.np_dtype)
    w = rng.standard_normal((depth, cols_per)).astype(cfg.np_dtype)
    with m.worker_pool(2):  # BLAS at one thread, as in training
        return 2 * rows * depth * cols_per / median_time(lambda: a @ w, repeat)


PHASES = [  # (module function, call index within a step, label)
    ("conv_forward", 0, "conv1 fwd"), ("relu_forward", 0, "relu fwd"),
    ("conv_forward", 1, "primary fwd"), ("squash_forward", 0, "squash fwd"),
    ("uhat_forward", 0, "u_hat fwd"), ("routing_forward", 0, "routing fwd"),
    ("margin_forward", 0, "margin loss"), ("mask_forward", 0, "mask"),
    ("decoder_forward", 0, "decoder fwd"), ("recon_forward", 0, "recon loss"),
    ("decoder_backward", 0, "decoder bwd"), ("routing_backward", 0, "routing bwd"),
    ("uhat_backward", 0, "u_hat bwd"), ("squash_backward", 0, "squash bwd"),
    ("conv_backward", 0, "primary bwd"), ("relu_backward", 0, "relu bwd"),
    ("conv_backward", 1, "conv1 bwd"), ("check_finite", 0, "divergence guard"),
    ("adam_step", 0, "adam"),
]


def phase_times(cfg: m.Config, n: int, repeat: int) -> dict[str, float]:
    """Median seconds of each top-level layer call, by wrapping the module's functions.

    With worker threads each thread times its own calls (the depth count is per thread) and a
    phase's time is the mean over the threads that ran it: the time one core spends on it."""
    names = sorted({p[0] for p in PHASES})
    originals = {k: getattr(m, k) for k in names}
    calls, local = [], threading.local()

    def timed(name, f):
        def wrapper(*args, **kw):
            depth = getattr(local, "depth", 0)
            local.depth = depth + 1
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                local.depth = depth
                if depth == 0:
                    calls.append((threading.get_ident(), name, time.perf_counter() - t))
        return wrapper
    for k in names:
        setattr(m, k, timed(k, originals[k]))
    try:
        with m.worker_pool(cfg.workers) as pool:
            step = make_step(cfg, n, pool)
            step()
            per_step = []
            for _ in range(repeat):
                calls.clear()
                step()
                per_step.append(list(calls))
    finally:
        for k, f in originals.items():
            setattr(m, k, f)
    out = {}
    for name, idx, label in PHASES:
        ts = []
        for s in per_step:
            by_thread = {}
            for tid, nm, t in s:
                if nm == name:
                    by_thread.setdefault(tid, []).append(t)
            mine = [t[idx] for t in by_thread.values() if len(t) > idx]
            if not mine:
                raise RuntimeError(f"no thread made call {idx} of {name}: PHASES is out of date")
            ts.append(np.mean(mine))
        out[label] = float(np.median(ts))
    return out


def full_run() -> tuple[float, float]:
    """Wall seconds and peak resident memory (GiB) of the default 8-epoch run.

    Run it before this process grows: a child's ru_maxrss starts at its parent's resident size at
    fork (the pages are shared until exec), so a big parent would hide the child's own peak."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "multimnist_capsnet.py"), "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20


def capsnet_args(p: argparse.ArgumentParser):
    """(args, Config) from a parser that has the module's training flags; a bad flag, or a task or
    model other than the MultiMNIST CapsNet, ends the program with the parser's one-line error."""
    args = p.parse_args()
    try:
        cfg = m.config_from_args(args)
    except m.CapsNetError as e:
        p.error(str(e))
    if cfg.task != "multimnist" or cfg.model != "capsnet":
        p.error("this times the MultiMNIST CapsNet's step (--task multimnist --model capsnet)")
    return args, cfg


def main():
    p = m.ArgumentParser(prog="bench_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15, help="steps timed per setting (default: 15)")
    p.add_argument("--no-full", action="store_true", help="skip the full default run")
    p.add_argument("--vs-floor", type=int, metavar="PAIRS", default=0,
                   help="only time the step against its products alone, in PAIRS alternating "
                        "pairs (default: 0, the full table)")
    m.add_training_flags(p)  # the size benched: --conv1-channels, --primary-types, --preset, ...
    args, base = capsnet_args(p)
    if args.vs_floor:
        print_step_vs_floor(base, args.vs_floor)
        return
    full = None if args.no_full else full_run()
    print(f"numpy {np.__version__}, {os.cpu_count()} cpus, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    peak = {"float32": gemm_rate(np.float32), "float64": gemm_rate(np.float64)}
    print(f"{'sgemm 2048^3':<28}{peak['float32'] / 1e9:8.1f} GFLOP/s")
    print(f"{'dgemm 2048^3':<28}{peak['float64'] / 1e9:8.1f} GFLOP/s")
    print(f"\n{'step (fwd+bwd+guard+adam)':<34}{'median ms':>10}{'GFLOP/s':>10}{'of sgemm':>10}")
    for workers in (base.workers, 1):
        for dtype in ("float32", "float64"):
            for n in (32, 64, 128):
                cfg = dataclasses.replace(base, dtype=dtype, batch_size=n, workers=workers)
                with m.worker_pool(workers) as pool:
                    t = median_time(make_step(cfg, n, pool), args.repeat)
                rate = step_flops(cfg, n) / t
                label = f"{dtype} batch {n} workers {workers}"
                print(f"{label:<34}{t * 1e3:10.1f}{rate / 1e9:10.1f}{rate / peak['float32']:10.0%}")
    cfg = base
    with m.worker_pool(cfg.workers) as pool:
        threads = f"{cfg.workers} workers" if pool is not None else "1 worker (BLAS threads not settable)"
        at_once = " at once" if pool is not None else ""
    print(f"\nPrimaryCaps forward GEMM of one worker's 16 composites, one thread: "
          f"{primary_gemm_rate(cfg, 16, args.repeat) / 1e9:.1f} GFLOP/s")
    floor = matmul_floor(cfg, args.repeat)
    goal = step_flops(cfg, cfg.batch_size) / (0.4 * peak["float32"])
    print(f"\nmatrix products of the step alone, {threads}{at_once} (one core's share)")
    print(f"  {'layer':<14}{'products':>9}{'median ms':>11}{'GFLOP/s':>9}")
    for layer, (count, t, rate) in floor.items():
        print(f"  {layer:<14}{count:9d}{t * 1e3:11.1f}{rate / 1e9:9.1f}")
    print(f"  a step at 40% of sgemm takes {goal * 1e3:.1f} ms")
    print(f"\nphases, float32 batch 32, {threads} (median ms of one core's share; "
          f"{step_flops(cfg, 32) / 1e9:.2f} GFLOP a step)")
    phases = phase_times(cfg, 32, args.repeat)
    for label, t in phases.items():
        print(f"  {label:<26}{t * 1e3:10.2f}")
    print(f"  {'sum of phases':<26}{sum(phases.values()) * 1e3:10.2f}")
    if full is not None:
        wall, mem = full
        print(f"\nfull default run (8 epochs x 6000 pairs, eval each epoch): {wall:.1f} s wall, "
              f"peak memory {mem:.2f} GiB")


if __name__ == "__main__":
    main()
