"""The paper's task to 90%: A/Bs of the training recipe at equal wall-clock time, the long run,
and the shipped model made from it.

    python3 bench/recipe.py ab [--minutes 25] [--arms N ...] [--seeds 0]  # two at a time, 1 core each
    python3 bench/recipe.py long [--minutes 120] [--variant V]  # alone on the machine, 2 cores
    python3 bench/recipe.py score                   # score runs whose scoring was missed
    python3 bench/recipe.py summarize               # the A/B table, and viz/recipe.png of the long run
    python3 bench/recipe.py throughput              # the step time of each capacity and batch size
    python3 bench/recipe.py init-lengths            # the capsules' lengths at step 0, by --init
    python3 bench/recipe.py ship CHECKPOINT         # models/capsnet-multimnist.npz from the long run

Every arm is one plain CLI call (printed before it starts) on top of BASE, the previous shipped
model's recipe; every run keeps an average of its weights (--ema 0.999), which changes nothing in its
training, so each run is scored twice from its checkpoint on the same 10,000 fresh test pairs of
the paper's task: its raw weights (the arm itself) and its averaged weights (the arm + EMA). A run
ends by SIGINT when its budget is spent (timeout's exit 124: it saved its checkpoint) or when its
epochs are done. Outputs in runs/recipe/: NAME_sSEED.json (training metrics), .eval.json (both
scores); checkpoints and logs stay out of git.

ship: when the checkpoint does not exist it is trained first with ship_flags(), stopped by SIGINT
after SHIP_BUDGET as `long` stops it (the paper's task, fresh pairs, Conv1 64 / 16 capsule types,
digit-capsule biases, 60,000 pairs an epoch, weights averaged; on the 2-core AMD EPYC the budget
ended at step 50,141, in epoch 27; a faster or slower CPU stops elsewhere; the command is printed,
its metrics go beside the checkpoint as .json). Its averaged parameters are then evaluated on
10,000 fresh test pairs of both tasks, once as stored in float32 and once rounded to float16;
float16 is stored when neither task's set accuracy moves by more than --tolerance, else float32.
The model file holds the parameters, the config, the per-epoch history and these metrics; no Adam
state. Metrics also go to runs/ship/model_metrics.json.
"""
import argparse
import contextlib
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BASE, LONG, PAPER_TASK, ROOT, SHIPPED, TASKS, VARIANTS,  # noqa: E402
                    difference, make_step, median_time, read_run, run_file, run_jobs,
                    score_missing, slug, test_metrics)
import mnist_fetch  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402

OUT = ROOT / "runs" / "recipe"
# Steps per minute of BASE on one core beside another run, for the schedules that must know their
# length in advance: the first A/B round's "current best" took 4,935 steps in 22 minutes on the
# AMD EPYC (190, from bench/table1.py's runs, made its cosine arm end 5 minutes early).
STEPS_PER_MINUTE_1CORE = 224
TF_RECIPE = ["--batch-size", "128", "--lr-decay-steps", "2000", "--digit-bias", "--bias-init", "0.1",
             "--margin-loss", "tf", "--recon-weight", "0.0005", "--init", "truncated",
             "--routing-grad", "full"]


def cosine(minutes: float, batch: int = 32, n_train: int = 30000) -> list[str]:
    """--n-epochs for a cosine schedule that reaches 0 about when the budget ends."""
    epochs = max(1, round(minutes * STEPS_PER_MINUTE_1CORE * 32 / batch / (n_train // batch)))
    return ["--lr-schedule", "cosine", "--n-epochs", str(epochs)]


def arms(minutes: float) -> list[tuple[str, list[str]]]:
    return [
        ("current best", []),
        # the TF reference all at once (its batch, decay, biases, margin loss, recon balance,
        # init and exact routing gradient: research/capsules in tensorflow/models)
        ("TF reference recipe", TF_RECIPE),
        ("warm-up 500, cosine", ["--lr-warmup-steps", "500", *cosine(minutes)]),
        ("batch 64", ["--batch-size", "64", "--lr-decay-steps", "250"]),
        # the TF reference's batch and its decay step, each alone (same decay per pair for batch)
        ("batch 128", ["--batch-size", "128", "--lr-decay-steps", "125"]),
        ("decay per 2000 steps", ["--lr-decay-steps", "2000"]),
        ("digit-capsule biases 0.1", ["--digit-bias", "--bias-init", "0.1"]),
        ("leaky routing", ["--leaky-routing"]),
        ("TF margin loss and recon balance", ["--margin-loss", "tf", "--recon-weight", "0.0005"]),
        ("capacity 128/16", ["--conv1-channels", "128"]),
        # the TF reference's truncated normals (std 0.05 for conv1, 0.1 / T for PrimaryCaps, 0.1
        # elsewhere) on their own: the TF recipe arm measured them only beside six other changes
        ("truncated-normal init", ["--init", "truncated"]),
        # the two 22-minute winners together (the long run's recipe with the TF init)
        ("digit biases and truncated init", ["--digit-bias", "--bias-init", "0.1",
                                             "--init", "truncated"]),
    ]


def command(name, flags, seed, minutes, workers, base=BASE):
    stem = OUT / f"{slug(name)}_s{seed}"
    cmd = ["timeout", "-s", "INT", f"{minutes}m", sys.executable, "multimnist_capsnet.py",
           "--seed", str(seed), "--workers", str(workers), "--quiet", *base, *flags,
           "--save", str(stem.with_suffix(".npz").relative_to(ROOT)),
           "--metrics-json", str(stem.with_suffix(".json").relative_to(ROOT))]
    return cmd, stem


def score(stem: Path, n_test: int = 10_000) -> dict:
    """The checkpoint stem.npz, raw and averaged weights, on n_test fresh pairs of the paper's
    task -> stem.eval.json."""
    run = mc.load_checkpoint(stem.with_suffix(".npz"))
    mnist = mnist_fetch.load_data(argparse.Namespace(data_dir=None), run.cfg)
    with mc.worker_pool(run.cfg.workers) as workers:
        doc = {which: test_metrics(params, run.cfg, mnist, n_test, workers)[PAPER_TASK]
               for which, params in (("raw", run.params), ("averaged", run.eval_params))}
    doc.update(step=run.step, epoch=run.epoch, pairs=run.step * run.cfg.batch_size,
               n_params=sum(p.size for p in run.params.values()), n_test=n_test)
    mc.atomic_write(stem.with_suffix(".eval.json"), (json.dumps(doc, indent=1) + "\n").encode())
    return doc


def ab(minutes: int, names, seeds, jobs: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    todo = [command(n, f, s, minutes, 1) for n, f in arms(minutes) if not names or n in names
            for s in seeds]
    todo = [(c, b) for c, b in todo if not b.with_suffix(".eval.json").exists()]
    run_jobs(todo, jobs, on_done=lambda rc, stem: score(stem) if rc in (0, 124) else None)


# The capacity and batch arms, and two sizes beyond them, for their step time alone.
SIZES = [("current best", []), ("batch 64", ["--batch-size", "64"]),
         ("batch 128", ["--batch-size", "128"]), ("capacity 128/16", ["--conv1-channels", "128"]),
         ("capacity 128/32", ["--conv1-channels", "128", "--primary-types", "32"]),
         ("the paper's 256/32", ["--conv1-channels", "256", "--primary-types", "32"])]


def throughput(repeat: int = 10, sizes=None) -> None:
    """The median training step of each of SIZES on BASE, on one core (BLAS at one thread, as
    an A/B arm runs) and on two (two worker threads, as the long run): what each costs in steps
    and pairs per minute, before any accuracy is measured."""
    print("| arm | batch | params | ms/step, 1 core | pairs/min, 1 core | steps in 22 min, 1 core "
          "| ms/step, 2 cores | pairs/min, 2 cores |")
    print("|---|---|---|---|---|---|---|---|")
    blas = mc.blas_limiter()
    for name, flags in sizes or SIZES:
        cfg = mc.config_from_args(mc.build_parser().parse_args([*BASE, *flags, "--workers", "2"]))
        n = cfg.batch_size
        with blas.limit(limits=1) if blas else contextlib.nullcontext():
            one = median_time(make_step(cfg, n), repeat)
        with mc.worker_pool(2) as pool:
            two = median_time(make_step(cfg, n, pool), repeat)
        size = sum(p.size for p in mc.init_params(cfg, np.random.default_rng(0)).values())
        print(f"| {name} | {n} | {size / 1e6:.2f}M | {one * 1e3:.0f} | {60 * n / one:,.0f} | "
              f"{22 * 60 / one:,.0f} | {two * 1e3:.0f} | {60 * n / two:,.0f} |", flush=True)


def init_lengths(n: int = 256) -> None:
    """The mean length of the primary and the digit capsules at step 0 (n test pairs of the
    paper's task, seed 0) under each --init, without and with the long run's digit biases: where
    each starts against the margin loss's m- = 0.1 and m+ = 0.9."""
    print("| init | digit biases, every bias 0.1 | primary capsules, mean length | digit capsules |")
    print("|---|---|---|---|")
    config = lambda *flags: mc.config_from_args(mc.build_parser().parse_args([*BASE, *flags]))
    cfg = config("--n-test", str(n))  # the pairs depend on the task and the seed, not the init
    _, test = mc.make_data(cfg, mnist_fetch.load_data(argparse.Namespace(data_dir=None), cfg))
    x = mc.batch_arrays(test, np.arange(n), cfg.dtype)["x"]
    for init in ("fan-in", "truncated"):
        for bias in ([], ["--digit-bias", "--bias-init", "0.1"]):
            cfg = config("--init", init, *bias)
            v, cache = mc.encode(mc.init_params(cfg, np.random.default_rng(0)), x, cfg)
            norm2 = cache.squash.norm2  # the primary capsules' |s|^2 (N, I, 1)
            print(f"| {init} | {'yes' if bias else 'no'} | {(norm2 / (1 + norm2)).mean():.3f} | "
                  f"{np.linalg.norm(v, axis=-1).mean():.3f} |")


def long_name(minutes: int, variant: str = "") -> str:
    return f"long {minutes} min" + (f", {variant}" if variant else "")


def long(minutes: int, variant: str = "", epochs: int | None = None) -> None:
    """The final run, alone on the machine: LONG's recipe (and a VARIANTS entry's flags on top),
    its epochs counted from a measured step time so that the last one ends within the budget (a
    cosine schedule in LONG would end with it too), unless given (a variant takes the plain run's
    27, so that the budget, not a different estimate, ends both), evaluated on 10,000 test pairs
    every epoch."""
    OUT.mkdir(parents=True, exist_ok=True)
    flags = [*BASE, *LONG, *VARIANTS[variant]]
    cfg = mc.config_from_args(mc.build_parser().parse_args([*flags, "--workers", "2"]))
    with mc.worker_pool(cfg.workers) as pool:
        sec = median_time(make_step(cfg, cfg.batch_size, pool), 10)
    spe = cfg.n_train // cfg.batch_size
    eval_sec = 10_000 * sec / cfg.batch_size / 3  # a forward pass is about a third of a step
    epochs = epochs or max(1, math.floor(0.97 * minutes * 60 / (spe * sec + eval_sec)))
    print(f"{sec * 1e3:.0f} ms per step: {epochs} epochs of {spe} steps in {minutes} min", flush=True)
    cmd, stem = command(long_name(minutes, variant),
                        [*LONG, *VARIANTS[variant], "--n-epochs", str(epochs)], 0, minutes, 2)
    run_jobs([(cmd, stem)], 1, env=None,
             on_done=lambda rc, s: score(s) if rc in (0, 124) else None)


LONG_RUNS = [long_name(m, v) for m in (60, 120) for v in VARIANTS]


def summarize() -> None:
    docs = {}
    for path in sorted(OUT.glob("*.eval.json")):
        docs.setdefault(path.name.rsplit("_s", 1)[0], []).append(json.loads(path.read_text()))
    print("| arm | seeds | steps | pairs | set acc, raw weights | averaged (EMA 0.999) | "
          "Δ raw vs current best | soft (avg) | top-1 (avg) |")
    print("|---|---|---|---|---|---|---|---|---|")
    acc = lambda ds, w: np.array([d[w]["set_acc"] for d in ds])
    best = docs.get(slug("current best"))
    for name, _ in arms(25) + [(name, []) for name in LONG_RUNS]:
        ds = docs.get(slug(name))
        if not ds:
            continue
        ab_arm = best and ds is not best and not name.startswith("long")  # equal time only
        delta = difference(acc(ds, "raw"), acc(best, "raw")) if ab_arm else "–"
        print(f"| {name} | {len(ds)} | {np.mean([d['step'] for d in ds]):,.0f} | "
              f"{np.mean([d['pairs'] for d in ds]):,.0f} | {ms(acc(ds, 'raw'))} | "
              f"{ms(acc(ds, 'averaged'))} | {delta} | "
              f"{np.mean([d['averaged']['soft_acc'] for d in ds]):.3f} | "
              f"{np.mean([d['averaged']['top1'] for d in ds]):.3f} |")
    stems = {name: OUT / f"{slug(name)}_s0" for name in LONG_RUNS}
    stems = {name: stem for name, stem in stems.items() if run_file(stem.with_suffix(".json"))}
    for name, stem in stems.items():
        o = outlook(read_run(stem.with_suffix(".json")))
        print(f"\n{name} ({o['minutes']:.1f} min of training and evaluation): "
              f"{o['at_60']:.3f} after {o['minutes_at_60']:.1f} min (goal 0.85 at 60), "
              f"{o['last']:.3f} at the end (goal 0.90 at 120); its curve from "
              f"{o['fit_from']:.0f} min on gains {100 * o['per_doubling']:.1f} points per "
              f"doubling of time: 0.90 at ~{o['minutes_to_90']:.0f} min and the paper's "
              f"{PAPER} at ~{o['minutes_to_paper']:.0f} min, if that line held")
    plain = [name for name in stems if "," not in name][-1:]  # the longest run without a variant
    for name, stem in stems.items():
        if plain and "," in name:
            print(f"\n{name} against {plain[0]}: " + equal_steps(stem, stems[plain[0]]))
    if stems:
        plot(stems)


def equal_steps(stem: Path, plain: Path) -> str:
    """A long variant's averaged set accuracy after each of its epochs against the plain long
    run's after the same epoch: the comparison at equal steps, which a machine running at another
    speed than the plain run's does not move (the equal-time one, at the stop, it does)."""
    ys = [[e["set_acc"] for e in read_run(s.with_suffix(".json"))["history"]["epochs"]]
          for s in (stem, plain)]
    k = min(map(len, ys))
    d = np.array(ys[0][:k]) - np.array(ys[1][:k])
    return (f"after epoch {k} {ys[0][k - 1]:.3f} against {ys[1][k - 1]:.3f} ({d[-1]:+.3f}); "
            f"by epoch {', '.join(f'{x:+.3f}' for x in d)}")


GOALS = ((60, 0.85), (120, 0.90))  # (minutes, set accuracy) the issue asks for
PAPER = 0.948  # the paper's Table 1: 5.2% error, 3 routing iterations


def curve(doc: dict) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative wall-clock minutes (each epoch's training and evaluation, not its pair drawing)
    and the set accuracy after each epoch, of one metrics JSON."""
    minutes = np.cumsum(doc["timing"]["epoch_seconds"]) / 60
    return minutes, np.array([e["set_acc"] for e in doc["history"]["epochs"]])


def outlook(doc: dict) -> dict:
    """Where one run's curve stood at 60 minutes, and a straight line through the set accuracy of
    its second half against log2(minutes): the points each doubling of the time bought there, and
    the minutes at which that line would cross 0.90 and the paper's 0.948. The line knows nothing
    of the run's learning-rate schedule, which it takes as it was, nor of any ceiling."""
    t, y = curve(doc)
    half = t >= t[-1] / 2
    slope, icpt = np.polyfit(np.log2(t[half]), y[half], 1)  # set accuracy per doubling
    reach = lambda acc: float(2 ** ((acc - icpt) / slope)) if slope > 0 else math.inf
    return dict(minutes_at_60=float(t[t <= 60][-1]), at_60=float(y[t <= 60][-1]),
                minutes=float(t[-1]), last=float(y[-1]), fit_from=float(t[half][0]),
                per_doubling=float(slope), intercept=float(icpt),
                minutes_to_90=reach(0.90), minutes_to_paper=reach(PAPER))


def plot(stems: dict) -> None:
    """viz/recipe.png: the long runs' accuracy (stems: a LONG_RUNS name -> the run's output stem)
    against wall-clock minutes, the shipped model's run for reference, the goal lines and the
    paper's number."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    ax = fig.subplots()
    ship = read_run(ROOT / "runs" / "ship" / "paper-task-36-epochs_s0.json")
    ax.plot(*curve(ship), color="0.6", marker="o", ms=2,
            label=f"the previous shipped model's run, 2 cores (5,000 test pairs): "
                  f"{ship['final']['set_acc']:.3f}")
    cnn = ROOT / "runs" / "table1" / "CNN-the-paper-s-small-widths-32-64-512_long_s0.json"
    if run_file(cnn):  # for scale: bench/table1.py's 60-minute CNN, one core beside another run
        ax.plot(*curve(read_run(cnn)), color="C1", lw=1, alpha=0.7,
                label="CNN 32/64/512, one core (Table 1; 1,000 test pairs)")
    variants = iter(("C4", "C5", "C6"))
    for name, stem in sorted(stems.items(), key=lambda kv: "," in kv[0]):  # plain runs first
        doc = read_run(stem.with_suffix(".json"))
        x, y = curve(doc)
        color = next(variants) if "," in name else "C0"
        weights = "averaged weights" if doc["config"]["ema"] else "raw weights"
        ax.plot(x, y, marker="o", ms=3, color=color, label=f"{name}, 2 cores, {weights} "
                f"({doc['config']['n_test']:,} test pairs): {y[-1]:.3f}")
        if "," not in name:  # the outlook of the recipe itself; a variant's would crowd it
            o = outlook(doc)
            fx = np.linspace(o["fit_from"], 125, 50)
            ax.plot(fx, o["intercept"] + o["per_doubling"] * np.log2(fx), color=color, ls=":",
                    lw=1.2, label=f"line through its second half: {100 * o['per_doubling']:+.1f} "
                                    f"points per doubling of time")
            if stem.with_suffix(".eval.json").exists():
                raw = json.loads(stem.with_suffix(".eval.json").read_text())["raw"]["set_acc"]
                end = doc["timing"]["total_seconds"] / 60  # where the budget stopped it
                ax.plot(end, raw, marker="*", ms=11, ls="none", color="C3",
                        label=f"its raw weights at the {name[5:]} stop (10,000 fresh pairs): "
                              f"{raw:.3f}")
    for m, goal in GOALS:
        ax.plot([0, m], [goal, goal], color="C2", ls="--", lw=1)
        ax.plot(m, goal, marker="|", ms=12, color="C2")
    ax.plot([], [], color="C2", ls="--", lw=1, label="goals: 0.85 by 60 min, 0.90 by 120 min")
    ax.axhline(PAPER, color="k", ls=":", lw=1, label=f"the paper (GPU, 60M pairs): {PAPER}")
    ax.set(xlabel="wall-clock minutes (training + per-epoch evaluation)",
           ylabel="test two-digit set accuracy, the paper's task", ylim=(0.5, 1.0), xlim=(0, 125),
           title="The paper's task to 90%: accuracy per CPU-minute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    mc.atomic_write(ROOT / "viz" / "recipe.png", buf.getvalue())
    print("wrote viz/recipe.png", file=sys.stderr)


def ms(a: np.ndarray) -> str:
    if len(a) == 1:
        return f"{a[0]:.3f}"
    return f"{a.mean():.3f} ± {a.std(ddof=1) / np.sqrt(len(a)):.3f}"


# ----------------------------------------------------------------------------------------------
# ship: the shipped model, made from the long run (was ship_model.py)

SHIP_BUDGET = "120m"


def ship_flags() -> list[str]:
    """The flags of the `long` run that was shipped: the recipe's BASE, LONG and the SHIPPED
    variant's flags (bench/common.py), and the 27 epochs it sized on the AMD EPYC."""
    return ["--seed", "0", "--workers", "2", "--quiet", *BASE, *LONG, *VARIANTS[SHIPPED],
            "--n-epochs", "27"]


def ship(args) -> int:
    if not Path(args.checkpoint).exists():
        cmd = ["timeout", "-s", "INT", SHIP_BUDGET, sys.executable,
               str(ROOT / "multimnist_capsnet.py"), *ship_flags(), "--save", args.checkpoint,
               "--metrics-json", str(Path(args.checkpoint).with_suffix(".json"))]
        print("$ " + " ".join("python3" if c == sys.executable else c for c in cmd), flush=True)
        if subprocess.run(cmd).returncode not in (0, 124):  # 124: the budget ended it, saved
            return 1
    run = mc.load_checkpoint(args.checkpoint)
    mnist = mnist_fetch.load_data(args, run.cfg)
    t0 = time.perf_counter()
    with mc.worker_pool(run.cfg.workers) as workers:
        params = run.eval_params
        f32 = test_metrics(params, run.cfg, mnist, args.n_test, workers)
        half = {k: a.astype("float16").astype(a.dtype) for k, a in params.items()}
        f16 = test_metrics(half, run.cfg, mnist, args.n_test, workers)
    moved = max(abs(f16[t]["set_acc"] - f32[t]["set_acc"]) for t in TASKS)
    storage = "float16" if moved <= args.tolerance else "float32"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    metrics = dict(n_test=args.n_test, storage=storage, float32=f32, float16=f16,
                   largest_change=moved, eval_seconds=round(time.perf_counter() - t0, 1))
    info = dict(test_metrics=metrics[storage], n_test=args.n_test,
                made_by=f"python3 bench/recipe.py ship {args.checkpoint}", source_commit=commit)
    mc.save_model(args.out, run, storage=storage, **info)
    out = Path(args.out).resolve()
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    doc = dict(checkpoint=args.checkpoint, model=str(shown), **metrics)
    mc.atomic_write(ROOT / "runs" / "ship" / "model_metrics.json",
                    (json.dumps(doc, indent=1) + "\n").encode())
    for t in TASKS:
        print(f"{t}: set acc float32 {f32[t]['set_acc']:.4f}, float16 {f16[t]['set_acc']:.4f}, "
              f"soft {f32[t]['soft_acc']:.4f}, top-1 {f32[t]['top1']:.4f}")
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({storage}, {size / 2 ** 20:.2f} MiB); largest change {moved:.4f}")
    return 0


# ----------------------------------------------------------------------------------------------
# The command line

def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="recipe.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND",
                           parser_class=mc.ArgumentParser)

    def add(name, work, help):
        q = sub.add_parser(name, help=help, description=help[0].upper() + help[1:])
        q.set_defaults(work=work, prog=q.prog)
        return q
    a = add("ab", lambda a: ab(a.minutes, a.arms, a.seeds, a.jobs),
            "A/B arms on top of BASE at equal wall time, two at a time, one core each, each "
            "scored on 10,000 fresh test pairs")
    a.add_argument("--minutes", type=int, default=25, help="budget per run (default: %(default)s)")
    a.add_argument("--arms", nargs="+", default=None, help="arm names (default: all)")
    a.add_argument("--seeds", type=int, nargs="+", default=[0], help="(default: %(default)s)")
    a.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    lo = add("long", lambda a: long(a.minutes, a.variant, a.epochs),
             "the long run, alone on the machine (2 cores), scored as an arm")
    lo.add_argument("--minutes", type=int, default=120, help="budget (default: %(default)s)")
    lo.add_argument("--variant", choices=list(VARIANTS), default="",
                    help="a change to LONG's recipe (default: none)")
    lo.add_argument("--epochs", type=int, default=None,
                    help="epochs (default: sized from a measured step time)")
    add("score", lambda a: score_missing(OUT, score),
        "score the runs in runs/recipe/ whose scoring was missed")
    add("summarize", lambda a: summarize(),
        "the A/B table, the long runs' outlook, and viz/recipe.png")
    th = add("throughput", lambda a: throughput(a.repeat),
             "the step time of each capacity and batch size, on one core and on two")
    th.add_argument("--repeat", type=int, default=10, help="steps timed (default: %(default)s)")
    il = add("init-lengths", lambda a: init_lengths(a.n),
             "the primary and digit capsules' mean length at step 0, by --init, with and "
             "without digit biases")
    il.add_argument("--n", type=int, default=256, help="test pairs (default: %(default)s)")
    sh = add("ship", ship, "make the shipped model (models/capsnet-multimnist.npz) from the long "
             "run's checkpoint, training it first if need be (was ship_model.py)")
    sh.description += (": its averaged weights on fresh test pairs of both tasks, in float32 and "
                       "rounded to float16; float16 is stored when neither set accuracy moves by "
                       "more than --tolerance")
    sh.add_argument("checkpoint", help="a training checkpoint (multimnist_capsnet.py --save), "
                    "e.g. runs/recipe/long-120-min_s0.npz")
    sh.add_argument("--out", default=str(mc.MODEL_FILE), help="(default: %(default)s)")
    sh.add_argument("--n-test", type=int, default=10_000,
                    help="test pairs per task (default: %(default)s)")
    sh.add_argument("--tolerance", type=float, default=0.002,
                    help="largest set-accuracy change float16 may cause (default: %(default)s)")
    sh.add_argument("--data-dir", default=None, help="MNIST cache (default: the module's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.work(args) or 0
    except mc.CapsNetError as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
