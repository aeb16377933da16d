"""How fast is a training step, against what this CPU can do, and what makes it so?

    python3 bench/speed.py step [--no-full] [--vs-floor PAIRS] [size flags]  # step table
    python3 bench/speed.py ab OLD [NEW] [--pairs N] [size flags]    # two commits, one process
    python3 bench/speed.py floor [--rounds 25] [size flags]         # passes above the products
    python3 bench/speed.py alternatives [--rounds 30]               # rewrites tried, shipped size
    python3 bench/speed.py micro [--checkpoint run.npz] [size flags]  # single operations alone
    python3 bench/speed.py workers [--rounds 3] [size flags]        # do two workers contend?
    python3 bench/speed.py data [--cached]                          # MNIST and pairs, timed
    python3 bench/speed.py torch --mode eager|compile [--check]     # the step in PyTorch

The size flags are the training flags of multimnist_capsnet.py (--conv1-channels 64
--primary-types 16 --digit-bias: the shipped size; default: the default run's). Everything that
compares two ways alternates them, so that the machine's drift (20-50% on a shared VM) hits both
alike. `speed.py SUBCOMMAND --help` says what each prints; docs/speed.md reads the outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import math
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, make_step, median_time, training_batch  # noqa: E402
import cnn_baseline as cb  # noqa: E402
import mnist_fetch  # noqa: E402
import multimnist_capsnet as m  # noqa: E402

torch = F = None  # the torch subcommand imports them (load_torch): no dependency of the project


# ----------------------------------------------------------------------------------------------
# What the subcommands share: the size flags, alternation, spreads

def capsnet_config(p: argparse.ArgumentParser, args) -> m.Config:
    """The Config of the size flags; a bad flag, or a task or model other than the MultiMNIST
    CapsNet, ends the program with the parser's one-line error."""
    try:
        cfg = m.config_from_args(args)
    except m.CapsNetError as e:
        p.error(str(e))
    if cfg.task != "multimnist" or cfg.model != "capsnet":
        p.error("this times the MultiMNIST CapsNet's step (--task multimnist --model capsnet)")
    return cfg


def in_turn(fns: dict, rounds: int, warmup: bool = True) -> dict[str, list]:
    """{name: what each call returned} of the callables fns, each called once first (warmup),
    then `rounds` times in alternation, the order reversed every other round (A B, B A, A B, ...),
    so that the machine's drift hits them alike."""
    if warmup:
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            out[k].append(fns[k]())
    return out


def alternate_times(fns: dict, rounds: int, warmup: bool = True) -> dict[str, np.ndarray]:
    """{name: seconds of each call} of the callables fns, called as in_turn calls them."""
    def timed(f):
        def call():
            t = time.perf_counter()
            f()
            return time.perf_counter() - t
        return call
    return {k: np.array(v) for k, v in in_turn({k: timed(f) for k, f in fns.items()}, rounds,
                                              warmup).items()}


def alternate(fns: dict, rounds: int) -> dict[str, float]:
    """{name: median ms} of alternate_times."""
    return {k: 1e3 * float(np.median(v)) for k, v in alternate_times(fns, rounds).items()}


def spread(a, scale: float = 1e3, fmt: str = ".1f") -> str:
    """'median (quartiles lo-hi)' of a, times scale."""
    lo, mid, hi = np.percentile(a, [25, 50, 75]) * scale
    return f"{mid:{fmt}} (quartiles {lo:{fmt}}-{hi:{fmt}})"


def cpu_ticks() -> np.ndarray | None:
    """The machine's CPU time so far in clock ticks, all cores: user, nice, system, idle, iowait,
    irq, softirq, steal (Linux /proc/stat), or None elsewhere."""
    try:
        return np.array([int(t) for t in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]])
    except (OSError, ValueError):
        return None


def one_blas_thread():
    """A context in which BLAS runs one thread (a no-op where it cannot be set)."""
    blas = m.blas_limiter()
    return blas.limit(limits=1) if blas else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The step's matrix products: what the step cannot go below in NumPy

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


# ----------------------------------------------------------------------------------------------
# step: the step table (was bench_step.py)

def step_vs_floor(cfg: m.Config, pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Seconds of `pairs` training steps and `pairs` passes of the step's products alone ("all"),
    timed in alternation (step first in even pairs, products first in odd ones), so that the
    machine's drift, which moves both by 20-50% on a shared VM, hits the two alike: the ratio of
    a pair is steady where neither time is. Also the cores' clock ticks (cpu_ticks) spent during
    the steps alone, or None."""
    with m.worker_pool(cfg.workers) as pool:
        step = make_step(cfg, cfg.batch_size, pool)
        work, run = floor_products(cfg, pool, np.random.default_rng(0))
        ticks = None if cpu_ticks() is None else np.zeros(8, int)
        warm = [False]

        def counted_step():
            before = cpu_ticks()
            step()
            if ticks is not None and warm[0]:
                ticks[:] += cpu_ticks() - before

        def floor():
            run(range(len(work)))
            warm[0] = True  # the first call of each is the warm-up: step, then floor
        t = alternate_times({"step": counted_step, "floor": floor}, pairs)
    return t["step"], t["floor"], ticks


def print_step_vs_floor(cfg: m.Config, pairs: int) -> None:
    s, f, ticks = step_vs_floor(cfg, pairs)
    print(f"step against its products alone, {pairs} alternating pairs, {cfg.dtype} batch "
          f"{cfg.batch_size}, {cfg.workers} workers")
    print(f"  step (fwd+bwd+guard+adam), ms     {spread(s)}")
    print(f"  products alone ('all'), ms        {spread(f)}")
    print(f"  step / products, the pairs' ratio {spread(s / f, 1, '.3f')}")
    if ticks is not None and ticks.sum():
        busy, idle, steal = ticks[[0, 1, 2, 5, 6]].sum(), ticks[[3, 4]].sum(), ticks[7]
        print(f"  the cores during the steps: busy {busy / ticks.sum():.1%}, idle "
              f"{idle / ticks.sum():.1%}, taken by the hypervisor (steal) {steal / ticks.sum():.1%}")


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


def step_main(p, args) -> int:
    base = capsnet_config(p, args)
    if args.vs_floor:
        print_step_vs_floor(base, args.vs_floor)
        return 0
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
    return 0


# ----------------------------------------------------------------------------------------------
# ab: two versions of the model module in one process (was ab_step.py)

@dataclasses.dataclass
class Side:
    """One version of the model module, m, and of its CNN module, cnn: None where the model
    module still held the CNN (commits before the split into cnn_baseline.py)."""
    label: str
    m: object
    cnn: object = None


def import_file(path: Path, name: str):
    """The module at path, imported under name (dataclasses look their module up by it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def git(*words) -> bytes:
    """git's output of `git -C ROOT words...`; a failure is a CapsNetError with git's message."""
    r = subprocess.run(["git", "-C", str(ROOT), *words], capture_output=True)
    if r.returncode:
        raise m.CapsNetError(f"git {words[0]}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def checkout(rev: str, tmp: Path) -> Path:
    """The top-level Python files of git revision rev (the model module and the modules beside it)
    written into a fresh folder under tmp by git archive: the work tree, index and branches are
    left alone."""
    names = [n for n in git("ls-tree", "--name-only", rev).decode().split() if n.endswith(".py")]
    if "multimnist_capsnet.py" not in names:
        raise m.CapsNetError(f"{rev} has no multimnist_capsnet.py")
    out = Path(tempfile.mkdtemp(dir=tmp))
    with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", rev, *names))) as tar:
        tar.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return out


def load_tree(src: Path, label: str, tag: str) -> Side:
    """The model module of the source folder src (and its CNN module, where src has one) imported
    under names of their own (tag_...), so that two versions live in one process."""
    mod = import_file(src / "multimnist_capsnet.py", f"{tag}_multimnist_capsnet")
    cnn = None
    if (src / "cnn_baseline.py").exists():  # its `import multimnist_capsnet` must find this side's
        saved = sys.modules.get("multimnist_capsnet")
        sys.modules["multimnist_capsnet"] = mod
        try:
            cnn = import_file(src / "cnn_baseline.py", f"{tag}_cnn_baseline")
        finally:
            if saved is None:
                del sys.modules["multimnist_capsnet"]
            else:
                sys.modules["multimnist_capsnet"] = saved
    return Side(label, mod, cnn)


def load_side(rev: str | None, tag: str, tmp: Path) -> Side:
    """Side of git revision rev (load_tree of its checkout); rev None: the working tree's
    modules, as this process imported them."""
    if rev is None:
        return Side("working tree", m, cb)
    return load_tree(checkout(rev, tmp), rev, tag)


def side_step(side: Side, cfg, pool):
    return make_step(cfg, cfg.batch_size, pool, side.m, side.cnn)


def three_steps(side: Side, cfg):
    """Gradients and parameters after three steps on one batch: equal across bit-identical
    versions."""
    mod = side.m
    rng = np.random.default_rng(0)
    params = mod.init_params(cfg, rng)
    adam = mod.adam_init(params)
    batch = training_batch(cfg, cfg.batch_size, rng, mod, side.cnn)
    with mod.worker_pool(cfg.workers) as pool:
        for _ in range(3):
            _, grads, _ = mod.sharded_loss_and_grads(params, batch, cfg, pool)
            mod.adam_step(params, grads, adam, cfg.lr, workers=pool)
    return grads, params


def ab_main(p, args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sides = [load_side(args.old, "side_a", Path(tmp)),
                     load_side(args.new, "side_b", Path(tmp))]
        except m.CapsNetError as e:
            p.error(str(e))
    try:
        cfgs = [side.m.config_from_args(args) for side in sides]
    except (sides[0].m.CapsNetError, sides[1].m.CapsNetError) as e:
        p.error(str(e))
    sides[0].m.keep_freed_memory()
    label = dict(zip("AB", (side.label for side in sides)))  # A and B: one revision may be both
    if args.pairs:
        with sides[0].m.worker_pool(cfgs[0].workers) as pa, \
                sides[1].m.worker_pool(cfgs[1].workers) as pb:
            times = alternate_times({"A": side_step(sides[0], cfgs[0], pa),
                                     "B": side_step(sides[1], cfgs[1], pb)}, args.pairs)
        for k, ts in times.items():
            lo, hi = np.percentile(ts, [25, 75]) * 1e3
            print(f"{label[k]:<16} median step {np.median(ts) * 1e3:6.1f} ms   quartiles "
                  f"{lo:.1f}-{hi:.1f}")
        ratios = spread(times["B"] / times["A"], 1, ".3f")
        print(f"ratio B/A {np.median(times['B']) / np.median(times['A']):.3f}   "
              f"median of the {args.pairs} pairs' ratios {ratios}")
    else:
        def round_median(side, cfg):
            with side.m.worker_pool(cfg.workers) as pool:
                return median_time(side_step(side, cfg, pool), args.steps)
        # each round: a fresh step per side, warmed up, then the median of --steps steps
        times = in_turn({k: (lambda side=side, cfg=cfg: round_median(side, cfg))
                         for k, side, cfg in zip("AB", sides, cfgs)}, args.rounds, warmup=False)
        for k, ts in times.items():
            print(f"{label[k]:<16} median step {np.median(ts) * 1e3:6.1f} ms   rounds: "
                  + " ".join(f"{t * 1e3:.1f}" for t in ts))
        print(f"ratio B/A {np.median(times['B']) / np.median(times['A']):.3f}")
    (ga, pa), (gb, pb) = (three_steps(side, cfg) for side, cfg in zip(sides, cfgs))
    same = (ga.keys() == gb.keys() and all(np.array_equal(ga[k], gb[k]) for k in ga)
            and all(np.array_equal(pa[k], pb[k]) for k in pa))
    print(f"bit-identical gradients and parameters after 3 steps: {same}")
    return 0


# ----------------------------------------------------------------------------------------------
# floor: the passes above the products that NumPy cannot remove (was floor_gap.py)

def floor_main(p, args) -> int:
    cfg = capsnet_config(p, args)
    m.keep_freed_memory()
    rng = np.random.default_rng(0)
    n = cfg.batch_size // cfg.workers
    one = dataclasses.replace(cfg, batch_size=n, workers=1)
    params = m.init_params(cfg, rng)
    grads = {k: rng.standard_normal(a.shape).astype(a.dtype) * 1e-3 for k, a in params.items()}
    adam = m.adam_init(params)
    with m.worker_pool(cfg.workers) as pool, one_blas_thread():
        work, run = floor_products(one, None, rng)
        x, dx = primary_dx(cfg, n, rng)
        ms = alternate({
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
    return 0


# ----------------------------------------------------------------------------------------------
# alternatives: the rewrites tried at the shipped size (was shipped_alternatives.py)

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


def alternatives_main(p, args) -> int:
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
    _, dx = primary_dx(cfg, n, rng)

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
        times = {name: alternate(fns, args.rounds) for name, fns in groups.items()}
    print(f"shipped size, one worker's {n} composites, one BLAS thread, median of {args.rounds} "
          f"alternating rounds")
    for name, row in times.items():
        print(name)
        first = next(iter(row.values()))
        for variant, t in row.items():
            print(f"  {variant:<36}{t:8.2f} ms   x{t / first:.2f}")
    return 0


# ----------------------------------------------------------------------------------------------
# micro: single operations alone, old way against new (was micro_ops.py)

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


def micro_main(p, args) -> int:
    cfg = capsnet_config(p, args)
    r = args.repeat

    def ms(f, repeat):
        return median_time(f, repeat) * 1e3
    m.keep_freed_memory()
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
            ecfg = dataclasses.replace(cfg, eval_batch=eb)
            times[eb] = ms(lambda: m.evaluate(params, ecfg, test, pool), max(3, r // 8))
    rows.append((f"evaluate 1000 pairs, {cfg.workers} workers", "batches of 64", times[64],
                 "batches of 8", times[8]))
    if args.checkpoint:
        try:
            run = m.load_checkpoint(args.checkpoint)
        except m.CapsNetError as e:
            p.error(str(e))
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
    return 0


# ----------------------------------------------------------------------------------------------
# workers: do two worker threads slow each other down? (was worker_scaling.py)

def workers_main(p, args) -> int:
    cfg = capsnet_config(p, args)
    m.keep_freed_memory()
    rng = np.random.default_rng(0)
    params = m.init_params(cfg, rng)
    batch = training_batch(cfg, cfg.batch_size, rng)
    half = cfg.batch_size // 2
    shards = [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]

    def share(shard):
        return m.loss_and_grads(params, shard, cfg, 0.5)
    with m.worker_pool(2) as pool:
        if pool is None:
            print(f"{p.prog}: error: this process's BLAS threads cannot be set, so training runs "
                  "serially", file=sys.stderr)
            return 1
        # median_time warms each setting up itself, every round
        one = lambda: pool.submit(share, shards[0]).result()  # noqa: E731
        two = lambda: list(pool.map(share, shards))  # noqa: E731
        t = in_turn({"alone": lambda: median_time(one, args.repeat),
                     "both": lambda: median_time(two, args.repeat)}, args.rounds, warmup=False)
    alone, both = t["alone"], t["both"]
    ms = [" ".join(f"{x * 1e3:.1f}" for x in ts) for ts in (alone, both)]
    print(f"one worker's share ({half} composites, forward + backward), ms per round")
    print(f"  alone                        {ms[0]}")
    print(f"  both workers at once         {ms[1]}")
    print(f"  ratio of medians             x{np.median(both) / np.median(alone):.3f}")
    return 0


# ----------------------------------------------------------------------------------------------
# data: the data path, timed (was data_timing.py)

def data_main(p, args) -> int:
    def timed(f):
        t = time.perf_counter()
        out = f()
        return time.perf_counter() - t, out
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = None if args.cached else tmp
            if not args.cached:
                t, _ = timed(lambda: mnist_fetch.load_mnist(cache))
                print(f"load_mnist, empty cache (fetch, verify, convert, store) {t:7.2f} s")
            t, mnist = timed(lambda: mnist_fetch.load_mnist(cache))
            print(f"load_mnist, from the cache                            {t:7.2f} s")
    except m.CapsNetError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    for name, kw in (("the IoU >= 0.8 task", dict(min_iou=0.8)),
                     ("the paper's task", dict(min_iou=0.0, overlay="clip-sum"))):
        ts = [timed(lambda: m.make_pairs(mnist["train_x"], mnist["train_y"], args.pairs,
                                         np.random.default_rng(seed), **kw))[0]
              for seed in range(args.repeat)]
        print(f"make_pairs {args.pairs:,}, {name:<35}{statistics.median(ts):7.2f} s "
              f"(median of {args.repeat})")
    return 0


# ----------------------------------------------------------------------------------------------
# torch: the same step in PyTorch, eager and compiled (was torch_step.py)

TORCH_ABOUT = """Times one training step (zero_grad, forward, loss, backward, Adam) of a PyTorch
re-implementation of multimnist_capsnet.py's CapsNet at the shipped size (--conv1-channels 64
--primary-types 16 --digit-bias on top of the defaults; 3,554,736 parameters) on CPU, float32, on
a random batch: x uniform in [0, 1), two different random labels and two random source images per
composite. It prints the median ms of --steps timed steps per round, then the median over rounds.
With --mode compile the loss (forward, and through AOTAutograd the backward) and Adam's step are
compiled; the first step compiles and its seconds are reported apart (inductor keeps what it
compiled on disk, /tmp/torchinductor_$USER: a second run compiles in a fraction of the time).

The network follows the module, whose Config (sizes, loss weights, learning rate) and initial
weights it takes: Conv1 9x9 stride 1 + ReLU, PrimaryCaps 9x9 stride 2, squashed 8-D capsules,
u_hat from W (I, 10, 16, 8), 3 routing iterations with the module's default routing_grad='frozen'
backward (routing runs on u_hat detached; only the last s = sum_i c u_hat + bias carries
gradient), margin loss, both digits reconstructed by the decoder (160 -> 256 -> 512 -> 1296)
against the two sources, Adam. The convolutions run channels-last (NHWC in memory: a little
faster than NCHW here in eager mode, and the module's layout, so the primary capsules come out in
the module's order without a copy). --check compares the loss and every gradient with the
module's loss_and_grads on the same batch.

torch is an optional comparison tool for docs/speed.md, not a dependency of the project: nothing
else in the project or its tests imports it, and this subcommand imports it only after its flags
are parsed. Install it into a separate venv, CPU build (PyPI's default Linux wheel pulls in the
CUDA libraries, a 5.5 GB venv; a +cpu wheel makes it 1 GB and needs only a few small pure-Python
packages), then run this script with that venv's python:

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install --no-deps torch-*+cpu-*.whl   # or: --index-url .../whl/cpu torch
    /tmp/torchenv/bin/pip install numpy filelock typing-extensions sympy mpmath networkx jinja2 \\
        MarkupSafe fsspec "setuptools>=77"
    /tmp/torchenv/bin/python bench/speed.py torch --mode eager

torch.compile on CPU needs a C++ compiler (gcc)."""
TORCH_SHIPPED_FLAGS = ["--conv1-channels", "64", "--primary-types", "16", "--digit-bias"]


def load_torch(prog: str) -> None:
    """Import torch (and torch.nn.functional as F) into this module, or exit saying how to get
    it: it is no dependency of the project."""
    global torch, F
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit(f"{prog}: error: cannot import torch ({e}); install it into a separate venv, "
                 f"as `{prog} --help` says, and run this script with that venv's python")


def to_torch(params: dict[str, np.ndarray]) -> dict[str, torch.nn.Parameter]:
    """The module's arrays as torch parameters: conv weights (K, K, C, F) -> (F, C, K, K) stored
    channels-last; every other array keeps its layout."""
    out = {}
    for name, a in params.items():
        t = torch.from_numpy(np.ascontiguousarray(a))
        if name in ("conv1_w", "primary_w"):
            t = t.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        out[name] = torch.nn.Parameter(t.clone())
    return out


def make_torch_batch(cfg, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch in the module's layout: x (N, H, W, 1) uniform in [0, 1), sources a, b (N, H*W),
    labels (N, 2) two different digits each."""
    px = cfg.canvas ** 2
    first = rng.integers(0, cfg.n_classes, n)
    second = (first + rng.integers(1, cfg.n_classes, n)) % cfg.n_classes
    f32 = lambda shape: rng.random(shape, dtype=np.float32)  # noqa: E731
    return dict(x=f32((n, cfg.canvas, cfg.canvas, 1)), a=f32((n, px)), b=f32((n, px)),
                labels=np.stack([first, second], 1))


def batch_to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """x (N, H, W, 1) -> an NCHW tensor that is channels-last in memory (the same bytes);
    the two sources stacked as the decoder's targets (2N, H*W); labels (N, 2) int64."""
    x = torch.from_numpy(batch["x"]).permute(0, 3, 1, 2)
    return dict(x=x.contiguous(memory_format=torch.channels_last),
                target=torch.from_numpy(np.concatenate([batch["a"], batch["b"]])),
                labels=torch.from_numpy(batch["labels"]).long())


def torch_squash(s: torch.Tensor) -> torch.Tensor:
    """s * |s| / (1 + |s|^2) along the last axis."""
    n = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return s * (n / (1 + n * n))


def torch_route(uh: torch.Tensor, bias: torch.Tensor, iters: int) -> torch.Tensor:
    """Routing by agreement with the frozen backward. uh (I, N, J, E), bias (J, E) -> v (N, J, E).

    The iterations run on uh detached to find the final coupling coefficients c (I, N, J),
    softmax over J; only the last s = sum_i c uh + bias carries gradient."""
    d, bd = uh.detach(), bias.detach()
    b = torch.zeros(uh.shape[:3], dtype=uh.dtype)
    for _ in range(iters - 1):
        v = torch_squash((b.softmax(-1).unsqueeze(-1) * d).sum(0) + bd)   # (N, J, E)
        b = b + (d * v).sum(-1)                                           # agreement (I, N, J)
    c = b.softmax(-1)
    return torch_squash((c.unsqueeze(-1) * uh).sum(0) + bias)


def torch_encode(p: dict, x: torch.Tensor, cfg) -> torch.Tensor:
    """x (N, 1, H, W) channels-last -> digit capsules v (N, J, E)."""
    h = F.relu(F.conv2d(x, p["conv1_w"], p["conv1_b"]))                        # (N, 64, 28, 28)
    s = F.conv2d(h, p["primary_w"], p["primary_b"], stride=cfg.primary_stride)  # (N, 128, 10, 10)
    n = len(x)
    # NHWC order, as the module reshapes it: capsule i = (y * G + x) * T + type
    u = torch_squash(s.permute(0, 2, 3, 1).reshape(n, cfg.n_primary, cfg.primary_dim))  # (N, I, D)
    w = p["digit_w"]                                                            # (I, J, E, D)
    i_, j, e, d = w.shape
    uh = torch.matmul(u.transpose(0, 1), w.reshape(i_, j * e, d).transpose(1, 2))  # (I, N, J*E)
    return torch_route(uh.view(i_, n, j, e), p["digit_b"], cfg.routing_iters)


def torch_loss(p: dict, batch: dict, cfg, margin_scale: float) -> torch.Tensor:
    """Margin loss + recon_weight * the decoder's squared error for both digits, batch means."""
    x, labels = batch["x"], batch["labels"]
    n, k = labels.shape
    v = torch_encode(p, x, cfg)                                                  # (N, J, E)
    t = torch.zeros(n, cfg.n_classes).scatter_(1, labels, 1.0)                   # (N, J)
    length = torch.linalg.vector_norm(v, dim=-1)
    margin = (t * F.relu(0.9 - length) ** 2
              + 0.5 * (1 - t) * F.relu(length - 0.1) ** 2).sum() / n * margin_scale
    mask = F.one_hot(labels.T.reshape(-1), cfg.n_classes).to(v.dtype)           # (K*N, J)
    z = (v.repeat(k, 1, 1) * mask.unsqueeze(-1)).reshape(k * n, -1)              # (K*N, J*E)
    a1 = F.relu(torch.addmm(p["dec1_b"], z, p["dec1_w"]))
    a2 = F.relu(torch.addmm(p["dec2_b"], a1, p["dec2_w"]))
    recon = torch.sigmoid(torch.addmm(p["dec3_b"], a2, p["dec3_w"]))            # (K*N, H*W)
    rec = ((recon - batch["target"]) ** 2).sum() / n
    return margin + cfg.recon_weight * rec


def make_torch_step(params: dict, batch: dict, cfg, margin_scale: float, mode: str):
    """One training step, (zero_grad, forward, loss, backward, Adam), as a function."""
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    loss_fn, opt_step = torch_loss, opt.step
    if mode == "compile":
        loss_fn, opt_step = torch.compile(torch_loss), torch.compile(opt.step)

    def step():
        opt.zero_grad()
        loss = loss_fn(params, batch, cfg, margin_scale)
        loss.backward()
        opt_step()
        return loss
    return step


def shipped_config() -> m.Config:
    """The module's Config at the shipped size, float32."""
    p = m.ArgumentParser()
    m.add_training_flags(p)
    return dataclasses.replace(m.config_from_args(p.parse_args(TORCH_SHIPPED_FLAGS)),
                               dtype="float32")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_check(cfg, n: int, mode: str) -> bool:
    """Same weights (the module's init_params), same batch: the loss (1e-5 relative) and every
    gradient (1e-4 relative, in norm) against the module's loss_and_grads. Prints; True if all
    agree."""
    params = m.init_params(cfg, np.random.default_rng(0))
    batch = make_torch_batch(cfg, n, np.random.default_rng(1))
    loss_np, grads_np, _ = m.loss_and_grads(params, batch, cfg)
    tp = to_torch(params)
    loss_fn = torch.compile(torch_loss) if mode == "compile" else torch_loss
    loss = loss_fn(tp, batch_to_torch(batch), cfg, m.MARGIN_SCALE[cfg.margin_loss])
    loss.backward()
    err = abs(loss.item() - loss_np) / abs(loss_np)
    print(f"loss: torch {loss.item():.7f}, module {loss_np:.7f}, relative error {err:.1e}")
    ok = err < 1e-5
    for name, g in grads_np.items():
        gt = tp[name].grad
        if name in ("conv1_w", "primary_w"):
            gt = gt.permute(2, 3, 1, 0)                                  # back to (K, K, C, F)
        e = rel_err(gt.numpy(), g)
        print(f"  grad {name:<10} relative error {e:.1e}{'' if e < 1e-4 else '  FAIL'}")
        ok &= e < 1e-4
    print("check passed" if ok else "check FAILED")
    return ok


def torch_main(p, args) -> int:
    if min(args.steps, args.rounds, args.threads, args.batch) < 1:
        p.error("--steps, --rounds, --threads and --batch must be positive")
    load_torch(p.prog)
    torch.set_num_threads(args.threads)
    cfg = shipped_config()
    print(f"torch {torch.__version__}, {args.threads} threads, float32, batch {args.batch}, "
          f"mode {args.mode}, channels-last")
    if args.check:
        return 0 if torch_check(cfg, args.batch, args.mode) else 1
    params = to_torch(m.init_params(cfg, np.random.default_rng(0)))
    print(f"parameters {sum(t.numel() for t in params.values()):,}")
    batch = batch_to_torch(make_torch_batch(cfg, args.batch, np.random.default_rng(1)))
    step = make_torch_step(params, batch, cfg, m.MARGIN_SCALE[cfg.margin_loss], args.mode)
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    if args.mode == "compile":
        t = time.perf_counter()
        step()  # Adam's second step may compile again
        print(f"compile: first step {first:.1f} s, second {time.perf_counter() - t:.1f} s")
    step()  # warm
    rounds = []
    for r in range(args.rounds):
        rounds.append(median_time(step, args.steps, warmup=False))
        print(f"round {r + 1}: median of {args.steps} steps {rounds[-1] * 1e3:.1f} ms")
    print(f"median step {statistics.median(rounds) * 1e3:.1f} ms")
    return 0


# ----------------------------------------------------------------------------------------------
# The command line

def build_parser() -> argparse.ArgumentParser:
    p = m.ArgumentParser(prog="speed.py", description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="The size flags: the training flags of multimnist_capsnet.py, "
                                "listed by each subcommand's --help after its own.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND",
                           parser_class=m.ArgumentParser)

    def add(name, fn, help, description, **kw):
        q = sub.add_parser(name, help=help, description=description, **kw)
        q.set_defaults(run=lambda args: fn(q, args))
        return q

    s = add("step", step_main, "the step against sgemm, its products and its phases (was "
            "bench_step.py)",
            "The machine's sgemm/dgemm rate, the median step (forward, backward, guard, Adam) at "
            "float32/float64 and batch 32/64/128 with its fraction of the sgemm peak, the step's "
            "matrix products alone (as the module computes them), the time of each phase of a "
            "float32 batch-32 step (each phase's time on one core; Adam's is its wall time), and "
            "the wall time and peak memory of the default 8-epoch run. --vs-floor times steps "
            "and passes of the products alone in alternation and prints the median of their "
            "ratios, which stays put where the machine's speed moves both.")
    s.add_argument("--repeat", type=int, default=15, help="steps timed per setting (default: 15)")
    s.add_argument("--no-full", action="store_true",
                   help="skip the full default run (~2.5 min)")
    s.add_argument("--vs-floor", type=int, metavar="PAIRS", default=0,
                   help="only time the step against its products alone, in PAIRS alternating "
                        "pairs (default: 0, the full table)")
    a = add("ab", ab_main, "one step of two versions of the model module, in one process (was "
            "ab_step.py)",
            "Both versions of the model module (and of cnn_baseline.py, where a version has it: "
            "commits before the split held the CNN in the model module) are loaded into one "
            "process from their commits' files and timed in alternating rounds (each round: a "
            "fresh step per side, one warm-up, then the median of --steps steps; the order "
            "reversed every other round), or with --pairs in single steps, so that machine "
            "noise hits both alike. Prints the median of each side and their ratio, and whether "
            "the two versions give bit-identical gradients and parameters after three steps on "
            "the same batch.")
    a.add_argument("old", help="git revision of side A")
    a.add_argument("new", nargs="?", help="git revision of side B (default: the working tree)")
    a.add_argument("--rounds", type=int, default=6, help="alternating rounds (default: 6)")
    a.add_argument("--steps", type=int, default=15, help="timed steps per round (default: 15)")
    a.add_argument("--pairs", type=int, default=0,
                   help="time PAIRS single steps of each side in alternation instead of rounds "
                        "(default: 0, rounds)")
    f = add("floor", floor_main, "the passes above the step's products that NumPy cannot remove "
            "(was floor_gap.py)",
            "Times, on one worker's shard (batch / workers composites) and one BLAS thread, "
            "alternating: the shard's matrix products alone, and three passes that every NumPy "
            "version of this step makes (NumPy has no convolution and no fused elementwise "
            "kernel): PrimaryCaps' im2col copy, its col2im scatter-add (GEMM + add minus GEMM "
            "alone), and Adam over every parameter (both workers, wall time). Prints their "
            "medians and their sum as a fraction of the products.")
    f.add_argument("--rounds", type=int, default=25, help="alternating rounds (default: 25)")
    t = add("alternatives", alternatives_main, "the rewrites tried for the shipped-size step, "
            "against the module's (was shipped_alternatives.py)",
            "One worker's shard (16 composites) at the shipped size (Conv1 64, 16 types, digit "
            "biases), one BLAS thread; Adam on every parameter with both workers, as in "
            "training. Each group's variants are timed in alternation, --rounds times; each "
            "line is a median in ms and its ratio to the module's way (first in its group). "
            "docs/speed.md says which were kept.")
    t.add_argument("--rounds", type=int, default=30, help="alternating rounds (default: 30)")
    mi = add("micro", micro_main, "single operations timed alone, old way against new (was "
             "micro_ops.py)",
             "Single operations timed alone (one thread, one worker's 16 composites): what each "
             "rewrite saves by itself. Each line is the median of --repeat calls, in ms, old way "
             "first. Alone is not in context: in a real step the two threads share memory "
             "bandwidth, so `speed.py ab` decides what is kept.")
    mi.add_argument("--repeat", type=int, default=40, help="calls timed per line (default: 40)")
    mi.add_argument("--checkpoint", help="a saved default run: also time Adam on its moments, "
                    "with its subnormal ones as saved and flushed (default: skip)")
    w = add("workers", workers_main, "do two worker threads slow each other down? (was "
            "worker_scaling.py)",
            "Times one worker's share of the step (forward and backward on half the batch) on a "
            "worker thread alone, then with the second worker running its own half at the same "
            "time, as training does. Equal times mean the cores do not contend (for memory "
            "bandwidth, the GIL, the allocator's lock). Median ms of --repeat calls, the two "
            "settings alternating --rounds times.")
    w.add_argument("--repeat", type=int, default=20, help="calls timed per setting (default: 20)")
    w.add_argument("--rounds", type=int, default=3,
                   help="alternations of the settings (default: 3)")
    d = add("data", data_main, "MNIST into an empty cache and from it, and the training pairs "
            "of both tasks (was data_timing.py)",
            "Times MNIST into an empty temporary cache (needs the network), from the cache, and "
            "--pairs MultiMNIST training pairs on both task definitions.")
    d.add_argument("--cached", action="store_true",
                   help="skip the fetch into an empty cache: only the cached load (the default "
                        "cache) and the pairs")
    d.add_argument("--pairs", type=int, default=60_000,
                   help="training pairs drawn per task (default: %(default)s)")
    d.add_argument("--repeat", type=int, default=3,
                   help="draws per task, seeds 0.. (default: %(default)s)")
    to = add("torch", torch_main, "the same step in PyTorch, eager or compiled (was "
             "torch_step.py; needs torch)", TORCH_ABOUT,
             formatter_class=argparse.RawDescriptionHelpFormatter)
    to.add_argument("--mode", choices=("eager", "compile"), default="eager",
                    help="PyTorch eager, or torch.compile of the loss and of Adam's step "
                         "(default: %(default)s)")
    to.add_argument("--steps", type=int, default=15, help="steps timed per round (default: 15)")
    to.add_argument("--rounds", type=int, default=1, help="rounds of --steps timed steps "
                    "(default: 1)")
    to.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    to.add_argument("--batch", type=int, default=32, help="composites per step (default: 32)")
    to.add_argument("--check", action="store_true",
                    help="compare loss and gradients with the module's (same weights and batch) "
                         "instead of timing")
    for q in (s, a, f, mi, w):  # the size flags, after each subcommand's own
        m.add_training_flags(q)
    cb.add_cnn_flags(a)  # ab compares CNN steps too: --model cnn --cnn-conv1 ...
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
