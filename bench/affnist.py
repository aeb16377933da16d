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
import gzip
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (commit, compress_run, cpu_model, make_step, mc, median_time,  # noqa: E402
                    read_run, training_parser)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import affnist_like  # noqa: E402
import mnist_fetch  # noqa: E402

# (name, flags on top of --task expanded --workers 1)
CAPSNETS = [(f"CapsNet {size}, {r} routing iteration{'s' if r > 1 else ''}",
             ["--preset", size, "--routing-iters", str(r)])
            for size in ("small", "paper") for r in (3, 1)]
CNN_WIDTHS = [(32, 64, 128, 704, 192),   # --task expanded's default: the small CapsNet's 2.6M
              (64, 128, 256, 1900, 192)]  # the paper-size CapsNet's 13.5M
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
    step and time (OUT/NAME.json.gz)."""
    flags = MODELS[args.model]
    cfg = config([*flags, "--seed", str(args.seed), "--n-epochs", str(args.epochs),
                  "--n-train", str(N_TRAIN)])
    name = f"{args.model}_s{args.seed}"
    out = Path(args.out)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    mnist = mnist_fetch.load_mnist(args.data_dir)
    val = validation_set(mnist)
    run = mc.new_run(cfg)
    every = max(1, run.steps_per_epoch() // 4)
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
    mc.atomic_write(out / f"{name}.json", json.dumps(doc).encode())
    compress_run(out / f"{name}.json")  # NAME.json.gz, as runs/ keeps every run
    return 0


NAMES = {"capsnet3": "CapsNet, 3 routing iterations", "capsnet1": "CapsNet, 1 routing iteration",
         "cnn": "CNN"}
PAPER = {"capsnet3": "79% (paper, section 5.2)", "capsnet1": "93.21% without routing, for Gu & "
         "Tresp's affine CapsNet (CVPR 2020)", "cnn": "66% (paper)"}


def read_runs(folder, epochs: int) -> list[dict]:
    """Every run train wrote in folder, in MODELS order, then by seed, with its points of the
    first `epochs` epochs: a longer run's first epochs are those of a run that stops there (the
    learning rate is constant and each epoch's data comes from its own generator state)."""
    docs = [read_run(p) for p in sorted(Path(folder).glob("*_s*.json*"))]
    if not docs:
        raise mc.CapsNetError(f"no runs in {folder}: bench/affnist.py train writes them")
    for d in docs:
        c = d["config"]
        if c["n_epochs"] < epochs or c["lr_decay"] != 1.0 or c["lr_schedule"] != "exp":
            raise mc.CapsNetError(f"{d['model']}_s{d['seed']} trained {d['config']['n_epochs']} "
                                  f"epochs at a decaying rate or fewer than --epochs {epochs}")
        d["points"] = [p for p in d["points"] if p["epoch"] <= epochs]
    return sorted(docs, key=lambda d: (list(MODELS).index(d["model"]), d["seed"]))


def choose(docs: list[dict]) -> tuple[float, float, list[dict], list[dict]]:
    """The protocol, from validation alone: the shared target is the best validation accuracy
    that every run reached; each run stops at its first point at or above it. The equal-CPU-time
    budget is the longest training time any run needed to get there; within it, each run keeps
    its point of best validation accuracy (the earliest of ties)."""
    acc = lambda p: 1 - p["val_error"]
    target = min(max(acc(p) for p in d["points"]) for d in docs)
    stops = [next(p for p in d["points"] if acc(p) >= target) for d in docs]
    budget = max(p["train_cpu_seconds"] for p in stops)
    equal = [min((p for p in d["points"] if p["train_cpu_seconds"] <= budget),
                 key=lambda p: (p["val_error"], p["step"])) for d in docs]
    return target, budget, stops, equal


def labels_of(path, images: dict, workers) -> dict:
    """The digit a checkpoint names for each image of each set in images (name: (N, 40, 40)
    uint8), the checkpoint read once."""
    run = mc.load_checkpoint(path)
    return {k: mc.class_scores(mc.predict(run.eval_params, run.cfg, x, workers), run.cfg).argmax(1)
            for k, x in images.items()}


def mean_se(x) -> str:
    x = 100 * np.asarray(x, float)
    se = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return f"{x.mean():.2f} ± {se:.2f}"


def report(args) -> int:
    """Choose each run's points (choose), score them on both test sets, and write the tables
    (OUT/results.md), the predictions (OUT/predictions.json.gz) and the two figures."""
    folder, out = Path(args.runs), Path(args.out)
    docs = read_runs(folder, args.epochs)
    out.mkdir(parents=True, exist_ok=True)  # before the scoring, not after it
    target, budget, stops, equal = choose(docs)
    mnist = mnist_fetch.load_mnist(args.data_dir)
    mnist = dict(mnist, test_x=mnist["test_x"][:args.n], test_y=mnist["test_y"][:args.n])
    aff = affnist_like.make_set(mnist["test_x"], mnist["test_y"], 0)
    preds, seen = {}, {}
    with mc.worker_pool(args.workers) as workers:
        for d, stop, eq in zip(docs, stops, equal):
            name = f"{d['model']}_s{d['seed']}"
            cfg = dataclasses.replace(mc.Config(**d["config"]), n_test=args.n)
            test = mc.make_data(cfg, mnist)[1]
            for kind, p in (("stop", stop), ("equal", eq)):
                ckpt = folder / "ckpt" / f"{name}_step{p['step']}.npz"
                if ckpt not in seen:
                    seen[ckpt] = dict(step=p["step"], **labels_of(
                        ckpt, dict(expanded=test["x"], affnist=aff["x"]), workers))
                    print(f"scored {ckpt}", file=sys.stderr, flush=True)
                preds[f"{name}.{kind}"] = seen[ckpt]
    truth = dict(expanded=mnist["test_y"], affnist=aff["labels"])
    acc = {k: {s: float((v[s] == truth[s]).mean()) for s in truth} for k, v in preds.items()}
    doc = {k: dict(step=v["step"], **{s: "".join(map(str, v[s])) for s in truth})
           for k, v in preds.items()}
    mc.atomic_write(out / "predictions.json.gz", gzip.compress(
        json.dumps(doc, separators=(",", ":")).encode(), compresslevel=9, mtime=0))
    text = results_text(docs, target, budget, stops, equal, acc, args.n, args.epochs)
    mc.atomic_write(out / "results.md", text.encode())
    print(text)
    write_figures(docs, stops, preds, aff, folder, Path(args.viz))
    return 0


def results_text(docs, target, budget, stops, equal, acc, n, epochs) -> str:
    lines = [f"# bench/affnist.py report --epochs {epochs}: {len(docs)} runs of bench/affnist.py train (runs/affnist/"
             f"run.sh), scored on the {n:,} expanded-MNIST test digits and their "
             f"affNIST-like versions (seed 0)\n# {cpu_model()}, code of {commit()}; runs: code of "
             f"{', '.join(sorted({d['code'] for d in docs}))}, {docs[0]['cpu']}\n",
             f"Shared target: validation accuracy {100 * target:.2f}% (the best that every run "
             f"reached; {N_VAL:,} held-out training digits). Equal-CPU-time budget: {budget:.0f} "
             f"CPU-seconds of training (the slowest run's time to the target).\n",
             "| model | seed | parameters | stop: epoch | CPU s | val | expanded test | "
             "affNIST-like | equal time: epoch | val | expanded test | affNIST-like |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d, s, e in zip(docs, stops, equal):
        k = f"{d['model']}_s{d['seed']}"
        a, b = acc[k + ".stop"], acc[k + ".equal"]
        lines.append(f"| {NAMES[d['model']]} | {d['seed']} | {d['params'] / 1e6:.2f}M | "
                     f"{s['epoch']:.2f} | {s['train_cpu_seconds']:.0f} | "
                     f"{100 - 100 * s['val_error']:.2f}% | {100 * a['expanded']:.2f}% | "
                     f"{100 * a['affnist']:.2f}% | {e['epoch']:.2f} | "
                     f"{100 - 100 * e['val_error']:.2f}% | {100 * b['expanded']:.2f}% | "
                     f"{100 * b['affnist']:.2f}% |")
    by = {m: [d for d in docs if d["model"] == m] for m in MODELS}
    get = lambda m, kind, s: [acc[f"{m}_s{d['seed']}.{kind}"][s] for d in by[m]]
    for kind, title in (("stop", "At the shared target"), ("equal", "At equal CPU time")):
        lines += [f"\n**{title}** (mean ± standard error over seeds, %):\n",
                  "| model | seeds | expanded test | affNIST-like | published affNIST |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| {NAMES[m]} | {len(by[m])} | {mean_se(get(m, kind, 'expanded'))} | "
                  f"{mean_se(get(m, kind, 'affnist'))} | {PAPER[m]} |" for m in MODELS if by[m]]
        lines += ["", "| paired difference (same seed) | pairs | expanded test | affNIST-like |",
                  "|---|---:|---:|---:|"]
        for a, b in (("capsnet3", "cnn"), ("capsnet3", "capsnet1")):
            seeds = sorted({d["seed"] for d in by[a]} & {d["seed"] for d in by[b]})
            if seeds:
                diff = {s: [acc[f"{a}_s{k}.{kind}"][s] - acc[f"{b}_s{k}.{kind}"][s]
                            for k in seeds] for s in ("expanded", "affnist")}
                lines.append(f"| {NAMES[a]} − {NAMES[b]} | {len(seeds)} | "
                             f"{mean_se(diff['expanded'])} | {mean_se(diff['affnist'])} |")
    return "\n".join(lines) + "\n"


BINS = 8


def bin_accuracy(right: np.ndarray, value: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The accuracy of right (N,) bool in each of the BINS bins of value between edges."""
    idx = np.clip(np.digitize(value, edges) - 1, 0, BINS - 1)
    hits = [right[idx == b] for b in range(BINS)]
    return np.array([h.mean() if len(h) else np.nan for h in hits])


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_figures(docs, stops, preds, aff, folder: Path, viz: Path) -> None:
    """viz/affnist_robustness.png: affNIST-like accuracy against rotation, shear and scale
    (sqrt(scale_x scale_y)), each model's mean over seeds with its standard error, at the shared
    target; viz/affnist_reconstructions.png: a few affNIST-like digits and what the true digit's
    capsule of each seed-0 CapsNet draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    params = dict(angle=(aff["angle"], -20, 20, "rotation, degrees"),
                  shear=(aff["shear"], -0.2, 0.2, "shear"),
                  scale=(np.sqrt(aff["scale_x"] * aff["scale_y"]), 0.8, 1.2,
                         "scale, sqrt(scale_x · scale_y)"))
    fig = Figure(figsize=(11, 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (value, lo, hi, label) in zip(axes, params.values()):
        edges = np.linspace(lo, hi, BINS + 1)
        centres = (edges[1:] + edges[:-1]) / 2
        for m in MODELS:
            runs = [d for d in docs if d["model"] == m]
            if not runs:
                continue
            curves = np.array([bin_accuracy(
                preds[f"{m}_s{d['seed']}.stop"]["affnist"] == aff["labels"], value, edges)
                for d in runs])
            se = curves.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else 0 * centres
            ax.errorbar(centres, 100 * curves.mean(0), yerr=100 * se, marker="o", ms=3,
                        capsize=2, label=f"{NAMES[m]} ({len(runs)} seeds)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("affNIST-like accuracy, %")
    axes[0].legend(fontsize=8)
    fig.suptitle("Trained on expanded MNIST, stopped at the same validation accuracy; tested on "
                 "affNIST-like digits (bench/affnist.py report)", fontsize=9)
    viz.mkdir(parents=True, exist_ok=True)
    mc.atomic_write(viz / "affnist_robustness.png", png(fig))
    recon = [(d, s) for d, s in zip(docs, stops) if d["model"] != "cnn" and d["seed"] == 0]
    if recon:
        mc.atomic_write(viz / "affnist_reconstructions.png",
                        png(reconstructions(recon, aff, folder)))


def reconstructions(runs, aff, folder: Path, n: int = 10):
    """The first n affNIST-like digits above what each run's capsule of the true digit draws,
    with the digit the run names and that capsule's length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(1.2 * n, 1.35 * (1 + len(runs))), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + len(runs), n, squeeze=False)
    x, labels = aff["x"][:n], aff["labels"][:n]
    rows = [("affNIST-like", x, [f"{a:+.0f}° sh {s:+.2f}" for a, s in
                                 zip(aff["angle"][:n], aff["shear"][:n])])]
    for d, stop in runs:
        run = mc.load_checkpoint(folder / "ckpt" / f"{d['model']}_s{d['seed']}_step{stop['step']}.npz")
        v = mc.predict(run.eval_params, run.cfg, x)                              # (n, J, E)
        lengths = np.linalg.norm(v, axis=2)                                      # (n, J)
        img = mc.reconstruct(run.eval_params, v.astype(run.cfg.np_dtype), labels)  # (n, H*W)
        rows.append((f"{NAMES[d['model']].replace('CapsNet, ', '')}", 255 * img.reshape(x.shape),
                     [f"says {lengths[i].argmax()}, |v_{labels[i]}| {lengths[i, labels[i]]:.2f}"
                      for i in range(n)]))
    for r, (name, imgs, titles) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(imgs[i], cmap="gray_r", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(titles[i], fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("Does the true digit's capsule keep the transformed pose? (seed 0, at the shared "
                 "target)", fontsize=9)
    return fig


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
    r = sub.add_parser("report", help="the protocol's points of every run, scored: tables, "
                       "predictions and figures")
    r.add_argument("--runs", default="runs/affnist/runs", help="train's folder (default: "
                   "%(default)s)")
    r.add_argument("--out", default="runs/affnist", help="for results.md and predictions.json.gz "
                   "(default: %(default)s)")
    r.add_argument("--viz", default="viz", help="for the figures (default: %(default)s)")
    r.add_argument("--epochs", type=int, default=4, help="the budget: each run's points up to "
                   "this epoch (default: %(default)s)")
    r.add_argument("--n", type=int, default=10000, help="test digits (default: %(default)s)")
    r.add_argument("--workers", type=int, default=2, help="threads (default: %(default)s)")
    r.add_argument("--data-dir", default=None, help="MNIST cache (default: the usual one)")
    r.set_defaults(fn=report)
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
