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
import json
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


# The experiment (docs/affnist.md): each model trains on the first N_TRAIN training digits and is
# judged, every quarter epoch, on the last N_VAL placed once on 40x40: the test sets choose nothing.
MODELS = {"capsnet3": ["--routing-iters", "3"], "capsnet1": ["--routing-iters", "1"],
          "cnn": ["cnn"]}
N_TRAIN, N_VAL, VAL_SEED = 55000, 5000, 2017


def validation_set(mnist: dict) -> dict:
    """The last N_VAL training digits, each at a random place on 40x40 drawn once (VAL_SEED)."""
    x, y = mnist["train_x"][N_TRAIN:N_TRAIN + N_VAL], mnist["train_y"][N_TRAIN:N_TRAIN + N_VAL]
    return mc.shift_digits(x, y, np.random.default_rng(VAL_SEED), 6, 40)


def train(args) -> int:
    """Train one model of MODELS for --epochs on expanded MNIST with the training loop of
    multimnist_capsnet.py, scoring the validation digits every quarter epoch and keeping the
    weights of each of those points (OUT/ckpt/NAME_stepS.npz) and the points' validation error,
    step and time (OUT/NAME.json)."""
    flags = MODELS[args.model]
    cfg = config([*flags, "--seed", str(args.seed), "--n-epochs", str(args.epochs),
                  "--n-train", str(N_TRAIN)])
    name = f"{args.model}_s{args.seed}"
    out = Path(args.out)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    mnist = mnist_fetch.load_mnist(args.data_dir)
    val = validation_set(mnist)
    run = mc.new_run(cfg)
    every = run.steps_per_epoch() // 4
    points, clock = [], dict(wall=0.0, cpu=0.0, t=time.perf_counter(), c=time.process_time())

    def tick():  # training time since the last point, evaluation excluded
        clock["wall"] += time.perf_counter() - clock["t"]
        clock["cpu"] += time.process_time() - clock["c"]

    def point(metrics):
        path = out / "ckpt" / f"{name}_step{run.step}.npz"
        mc.save_model(path, run)
        points.append(dict(step=run.step, epoch=round(run.step / run.steps_per_epoch(), 4),
                           val_error=metrics["test_error"], train_seconds=round(clock["wall"], 2),
                           train_cpu_seconds=round(clock["cpu"], 2)))
        print(f"{name} step {run.step} val error {100 * metrics['test_error']:.2f}% "
              f"train {clock['wall']:.0f} s", flush=True)
        clock["t"], clock["c"] = time.perf_counter(), time.process_time()

    def on_step(run, aux):
        if run.step % every == 0 or run.step % run.steps_per_epoch() == 0:
            tick()  # the clock stops here and restarts at the end of point()
            if run.step % run.steps_per_epoch() != 0:
                point(mc.evaluate(run.eval_params, cfg, val))

    def on_epoch(run):  # the loop has just scored val, the "test" it was given
        point(run.history["epochs"][-1])

    mc.train(run, mnist, None, val, on_step=on_step, on_epoch=on_epoch, progress=False)
    n_params = sum(p.size for p in run.params.values())
    doc = dict(model=args.model, seed=args.seed, params=n_params, config=dataclasses.asdict(cfg),
               command=f"OPENBLAS_NUM_THREADS=1 python3 bench/affnist.py train {args.model} "
                       f"--seed {args.seed} --epochs {args.epochs} --out {args.out}",
               cpu=cpu_model(), code=commit(), points=points,
               **{t: [float(f"{x:.5g}") for x in run.history[t]] for t in mc.model_for(cfg).loss_terms})
    mc.atomic_write(out / f"{name}.json", (json.dumps(doc, separators=(",", ":")) + "\n").encode())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="affnist.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("steps", help="one-core step time and parameters of each model at 40x40")
    s.add_argument("--repeat", type=int, default=10, help="steps timed (default: %(default)s)")
    s.set_defaults(fn=steps)
    t = sub.add_parser("train", help="one run of the experiment: validation every quarter epoch")
    t.add_argument("model", choices=sorted(MODELS), help="capsnet3, capsnet1 (routing iterations) "
                   "or cnn")
    t.add_argument("--seed", type=int, default=0, help="the run's --seed (default: %(default)s)")
    t.add_argument("--epochs", type=int, default=4, help="passes over the %(N)s training digits "
                   "(default: %(default)s)".replace("%(N)s", f"{N_TRAIN:,}"))
    t.add_argument("--out", default="runs/affnist/runs", help="folder (default: %(default)s)")
    t.add_argument("--data-dir", default=None, help="MNIST cache (default: the usual one)")
    t.set_defaults(fn=train)
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
