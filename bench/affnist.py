"""The affNIST-like experiment (docs/affnist.md): models trained on expanded MNIST (--task
expanded, 40x40), tested on affNIST-like digits (affnist_like.py).

    OPENBLAS_NUM_THREADS=1 python3 bench/affnist.py steps [--repeat 10]  # one-core step times
    python3 bench/affnist.py score CKPT... [--n 10000] [--seed 0]  # expanded and affNIST-like

steps times one training step (forward, backward, Adam; float32, batch 32, --workers 1, synthetic
glyphs: a step's time does not depend on the pixels) of CapsNet at 3 and 1 routing iterations and
of the CNN baseline at a few widths, with each one's parameter count, to choose the widths and the
budget of the runs. score reads checkpoints trained on --task expanded and gives each one's error
on the expanded-MNIST test digits (as its own evaluation places them) and on the affNIST-like set
(affnist_like.make_set of the same MNIST test digits, --seed).
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (commit, cpu_model, make_step, mc, median_time,  # noqa: E402
                    training_parser)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import affnist_like  # noqa: E402
import mnist_fetch  # noqa: E402

# (name, flags on top of --task expanded --workers 1)
CAPSNETS = [(f"CapsNet {size}, {r} routing iteration{'s' if r > 1 else ''}",
             ["--preset", size, "--routing-iters", str(r)])
            for size in ("small", "paper") for r in (3, 1)]
CNN_WIDTHS = [(32, 32, 16, 96, 64), (64, 64, 32, 64, 64), (128, 128, 64, 128, 128),
              (256, 256, 128, 328, 192)]  # the last: the paper's MNIST CNN
CNNS = [(f"CNN {'/'.join(map(str, w[:3]))} fc {w[3]}/{w[4]}",
         ["cnn", *(x for k, v in zip(("--cnn-conv1", "--cnn-conv2", "--cnn-conv3",
                                                 "--cnn-fc", "--cnn-fc2"), w) for x in (k, str(v)))])
        for w in CNN_WIDTHS]


def config(flags) -> "mc.Config":
    """The Config of flags (a first word 'cnn': the CNN's, as cnn_baseline.py parses them)."""
    model = flags[0] if flags[0] == "cnn" else "capsnet"
    return mc.config_from_args(training_parser(model).parse_args(
        ["--task", "expanded", "--workers", "1", *flags[model == "cnn":]]))


def steps(args) -> int:
    print(f"# bench/affnist.py steps --repeat {args.repeat}: one training step at 40x40 "
          f"(--task expanded), batch 32, float32, --workers 1\n# {cpu_model()}, code of "
          f"{commit()}; median of {args.repeat} steps after one untimed\n")
    print("| model | parameters | step, ms | steps per CPU-hour |\n|---|---:|---:|---:|")
    for name, flags in CAPSNETS + CNNS:
        cfg = config(flags)
        n = sum(p.size for p in mc.init_params(cfg, np.random.default_rng(0)).values())
        t = median_time(make_step(cfg, cfg.batch_size), args.repeat)
        print(f"| {name} | {n / 1e6:.2f}M | {1e3 * t:.0f} | {3600 / t:,.0f} |", flush=True)
    return 0


def score(args) -> int:
    runs = [mc.load_checkpoint(path) for path in args.checkpoints]  # a bad one: before any work
    for path, run in zip(args.checkpoints, runs):
        if run.cfg.task != "expanded":
            raise mc.CapsNetError(f"{path} was trained on --task {run.cfg.task}, not expanded")
    mnist = mnist_fetch.load_mnist(args.data_dir)
    test_x, test_y = mnist["test_x"][:args.n], mnist["test_y"][:args.n]
    aff = affnist_like.make_set(test_x, test_y, args.seed)
    aff_pairs = dict(x=aff["x"], a=aff["x"], labels=aff["labels"][:, None])
    print(f"# bench/affnist.py score --n {args.n} --seed {args.seed}: test error on {args.n:,} "
          f"MNIST test digits placed on 40x40, and on their affNIST-like versions\n# {cpu_model()}, "
          f"code of {commit()}\n")
    print("| checkpoint | model | steps | expanded MNIST error | affNIST-like error |\n"
          "|---|---|---:|---:|---:|")
    for path, run in zip(args.checkpoints, runs):
        cfg = dataclasses.replace(run.cfg, n_test=args.n)
        _, test = mc.make_data(cfg, mnist)
        with mc.worker_pool(cfg.workers) as workers:
            own = mc.evaluate(run.eval_params, cfg, test, workers)
            other = mc.evaluate(run.eval_params, cfg, aff_pairs, workers)
        print(f"| {path} | {cfg.model} | {run.step:,} | {100 * own['test_error']:.2f}% | "
              f"{100 * other['test_error']:.2f}% |", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="affnist.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("steps", help="one-core step time and parameters of each model at 40x40")
    s.add_argument("--repeat", type=int, default=10, help="steps timed (default: %(default)s)")
    s.set_defaults(fn=steps)
    c = sub.add_parser("score", help="error on expanded MNIST and on the affNIST-like set")
    c.add_argument("checkpoints", nargs="+", metavar="CKPT", help="trained on --task expanded")
    c.add_argument("--n", type=int, default=10000, help="test digits (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0,
                   help="the affNIST-like set's seed (default: %(default)s)")
    c.add_argument("--data-dir", default=None, help="MNIST cache (default: the usual one)")
    c.set_defaults(fn=score)
    args = p.parse_args(argv)
    if getattr(args, "n", 1) < 1 or getattr(args, "n", 1) > 10000:
        p.error("--n must be in 1..10000")
    if getattr(args, "repeat", 1) < 1:
        p.error("--repeat must be at least 1")
    t0 = time.perf_counter()
    try:
        rc = args.fn(args)
    except mc.CapsNetError as e:
        print(f"affnist.py: error: {e}", file=sys.stderr)
        return 1
    print(f"\n# {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
