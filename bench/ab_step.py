"""A/B of the default training step between two versions of the model module.

    python3 bench/ab_step.py 6a93d8b           # that commit against the working tree
    python3 bench/ab_step.py 6a93d8b HEAD~2    # two commits
    python3 bench/ab_step.py HEAD --conv1-channels 64 --primary-types 16 --digit-bias
                                               # any size: the module's capacity (and other) flags
    python3 bench/ab_step.py 6a93d8b --pairs 60  # single steps in alternation instead of rounds

Both versions are loaded into one process and timed in alternating rounds (each round: a fresh
step, one warm-up, then the median of --steps steps), so machine noise hits both alike. Prints the
median of the round medians of each side and their ratio, and whether the two versions give
bit-identical gradients and parameters after three steps on the same batch.
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_step  # noqa: E402


def load(rev: str | None, name: str, tmp: Path):
    """The module at git revision rev (None: the working tree), imported under name."""
    path = ROOT / "multimnist_capsnet.py"
    if rev is not None:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:multimnist_capsnet.py"],
                             check=True, capture_output=True, text=True).stdout
        path = tmp / f"{name}.py"
        path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def round_median(mod, cfg, steps: int) -> float:
    bench_step.m = mod  # make_step builds the step from this module
    with mod.worker_pool(cfg.workers) as pool:
        return bench_step.median_time(bench_step.make_step(cfg, cfg.batch_size, pool), steps)


def pair_times(mods, cfgs, pairs: int) -> list[list[float]]:
    """Seconds of single steps of both sides, `pairs` of them each, in alternation."""
    times = [[], []]
    with mods[0].worker_pool(cfgs[0].workers) as pa, mods[1].worker_pool(cfgs[1].workers) as pb:
        steps = []
        for mod, cfg, pool in zip(mods, cfgs, (pa, pb)):
            bench_step.m = mod
            steps.append(bench_step.make_step(cfg, cfg.batch_size, pool))
            steps[-1]()  # warm up
        for i in range(pairs):
            for side in (0, 1) if i % 2 == 0 else (1, 0):
                t = time.perf_counter()
                steps[side]()
                times[side].append(time.perf_counter() - t)
    return times


def three_steps(mod, cfg):
    bench_step.m = mod  # training_batch draws the batch with this module
    rng = np.random.default_rng(0)
    params = mod.init_params(cfg, rng)
    adam = mod.adam_init(params)
    batch = bench_step.training_batch(cfg, cfg.batch_size, rng)
    with mod.worker_pool(cfg.workers) as pool:
        for _ in range(3):
            _, grads, _ = mod.sharded_loss_and_grads(params, batch, cfg, pool)
            mod.adam_step(params, grads, adam, cfg.lr, workers=pool)
    return grads, params


def main():
    p = bench_step.m.ArgumentParser(prog="ab_step.py", description=__doc__.splitlines()[0])
    p.add_argument("old", help="git revision of side A")
    p.add_argument("new", nargs="?", help="git revision of side B (default: the working tree)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default: 6)")
    p.add_argument("--steps", type=int, default=15, help="timed steps per round (default: 15)")
    p.add_argument("--pairs", type=int, default=0,
                   help="time PAIRS single steps of each side in alternation instead of rounds "
                        "(default: 0, rounds)")
    bench_step.m.add_training_flags(p)  # the size compared: --conv1-channels, --preset, ...
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mods = [load(args.old, "side_a", Path(tmp)), load(args.new, "side_b", Path(tmp))]
    try:
        cfgs = [mod.config_from_args(args) for mod in mods]
    except (mods[0].CapsNetError, mods[1].CapsNetError) as e:
        p.error(str(e))
    mods[0].keep_freed_memory()
    labels = [args.old, args.new or "working tree"]
    if args.pairs:
        times = pair_times(mods, cfgs, args.pairs)
        for label, ts in zip(labels, times):
            lo, hi = np.percentile(ts, [25, 75]) * 1e3
            print(f"{label:<16} median step {np.median(ts) * 1e3:6.1f} ms   quartiles {lo:.1f}-{hi:.1f}")
        r = np.array(times[1]) / np.array(times[0])
        lo, mid, hi = np.percentile(r, [25, 50, 75])
        print(f"ratio B/A {np.median(times[1]) / np.median(times[0]):.3f}   "
              f"median of the {args.pairs} pairs' ratios {mid:.3f} (quartiles {lo:.3f}-{hi:.3f})")
    else:
        times = [[], []]
        for _ in range(args.rounds):
            for side, (mod, cfg) in enumerate(zip(mods, cfgs)):
                times[side].append(round_median(mod, cfg, args.steps))
        for label, ts in zip(labels, times):
            print(f"{label:<16} median step {np.median(ts) * 1e3:6.1f} ms   rounds: "
                  + " ".join(f"{t * 1e3:.1f}" for t in ts))
        print(f"ratio B/A {np.median(times[1]) / np.median(times[0]):.3f}")
    (ga, pa), (gb, pb) = (three_steps(mod, cfg) for mod, cfg in zip(mods, cfgs))
    same = all(np.array_equal(ga[k], gb[k]) for k in ga) and all(np.array_equal(pa[k], pb[k]) for k in pa)
    print(f"bit-identical gradients and parameters after 3 steps: {same}")


if __name__ == "__main__":
    main()
