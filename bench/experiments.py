"""Ablations at the default budget and the best in 60 minutes on each task; where trained runs
fail, how they route, and how the two tasks differ.

    python3 bench/experiments.py run        # train every missing run (two at a time, 1 thread each)
    python3 bench/experiments.py long       # the two 60-minute runs, one after the other, 2 cores each
                                            # (into runs/long; earlier ones: runs/long/at-1327707)
    python3 bench/experiments.py long-split # the same two side by side, 1 core each
    python3 bench/experiments.py summarize  # the README's tables and viz/experiments.png
    python3 bench/experiments.py failures CKPT...           # set accuracy by digit and by overlap
    python3 bench/experiments.py routing CKPT... [--n-test N]  # routing purity, segmentation
    python3 bench/experiments.py task-stats > runs/task_stats.md  # class frequencies, IoU

The default budget is 8 epochs of a fixed pool of 6000 composites of the IoU >= 0.8 task, three
seeds each; each ablation changes one thing: the exact routing gradient, fresh pairs every epoch,
capacity, the reconstruction weight, one routing iteration, the paper's task. Every run is one
plain CLI call (printed before it starts) writing runs/exp/NAME_sSEED.json, so any row can be
reproduced alone; a finished run is never repeated, so `run` can be resumed.
"""
import argparse
import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ENV, IOU_TASK, PAPER_TASK, ROOT, read_run, run_file, run_jobs,  # noqa: E402
                    shown)
import mnist_fetch  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402

OUT = ROOT / "runs" / "exp"
SEEDS = (0, 1, 2)
# (name, flags on top of the defaults: 8 epochs x 6000 pairs, batch 32, the IoU >= 0.8 task)
EXPERIMENTS = [
    ("baseline", []),
    ("routing-grad full", ["--routing-grad", "full"]),
    ("resample", ["--resample"]),
    ("capacity 64/16", ["--conv1-channels", "64", "--primary-types", "16"]),
    ("recon weight 0.005", ["--recon-weight", "0.005"]),
    ("routing iters 1", ["--routing-iters", "1"]),
    (PAPER_TASK, ["--min-iou", "0", "--overlay", "clip-sum"]),
    ("resample + capacity 64/16", ["--resample", "--conv1-channels", "64", "--primary-types", "16"]),
]
EXTRA = [  # single runs on a smaller budget
    ("paper preset, 1 epoch", ["--preset", "paper", "--n-epochs", "1"], (0,)),
]
LONG_MINUTES = 60
# What won at the default budget (fresh pairs, recon weight 0.005), plus 4x the PrimaryCaps work:
# on a fixed pool more capacity only overfits, with fresh pairs it is the lever left. The paper's
# lr decay, compressed to the ~14k steps an hour allows at this size.
LONG_FLAGS = ["--resample", "--n-train", "30000", "--n-epochs", "1000", "--n-test", "5000",
              "--recon-weight", "0.005", "--conv1-channels", "64", "--primary-types", "16",
              "--lr-decay", "0.96", "--lr-decay-steps", "500"]
TASKS = [(IOU_TASK, []), (PAPER_TASK, ["--min-iou", "0", "--overlay", "clip-sum"])]
# The tasks' words in the names of the files already recorded under runs/, from before the tasks
# had these names: the same runs keep the same files.
FILE_WORDS = {IOU_TASK: "seed task", PAPER_TASK: "paper task"}
# Stopped by SIGINT after LONG_MINUTES: the last finished epoch's evaluation counts. "2 cores": one
# run at a time with the whole machine (two worker threads); "1 core": both at once, one core each.
LONG = {cores: [(f"{task}, 60 min, {cores}", LONG_FLAGS + flags) for task, flags in TASKS]
        for cores in ("2 cores", "1 core")}
# The 60-minute runs made with the code of commit 1327707, before the speed commits 7e6086d to
# adf31df (the very same steps, ~1.3x slower at this network size), moved here from runs/long.
EARLIER, EARLIER_LABEL = ROOT / "runs" / "long" / "at-1327707", ", code of 1327707"


def slug(name: str) -> str:
    """A run's name as its file name under runs/exp and runs/long."""
    for task, words in FILE_WORDS.items():
        name = name.replace(task, words)
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def command(name, flags, seed, out_dir=OUT, workers=1):
    out = out_dir / f"{slug(name)}_s{seed}.json"
    return [sys.executable, "multimnist_capsnet.py", "--seed", str(seed), "--workers", str(workers),
            "--quiet", *flags, "--metrics-json", str(out.relative_to(ROOT))], out


def all_runs():
    for name, flags in EXPERIMENTS:
        for seed in SEEDS:
            yield name, flags, seed
    for name, flags, seeds in EXTRA:
        for seed in seeds:
            yield name, flags, seed


def run(jobs: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    todo = [command(n, f, s) for n, f, s in all_runs()]
    run_jobs([(cmd, out) for cmd, out in todo if not run_file(out)], jobs)


def long_runs(cores: str) -> None:
    """The two 60-minute runs, each ended by SIGINT: it finishes its step, saves its checkpoint and
    metrics, and exits 130. "2 cores": one after the other; "1 core": both at once."""
    (ROOT / "runs" / "long").mkdir(parents=True, exist_ok=True)
    split = cores == "1 core"
    procs = []
    for name, flags in LONG[cores]:
        cmd, out = command(name, flags, 0, ROOT / "runs" / "long", workers=1 if split else 2)
        cmd = ["timeout", "-s", "INT", f"{LONG_MINUTES}m", *cmd,
               "--save", str(out.with_suffix(".npz").relative_to(ROOT))]
        print("$ " + shown(cmd, one_thread=split), flush=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV if split else None,
                                      stderr=subprocess.STDOUT,
                                      stdout=open(out.with_suffix(".log"), "w")))
        if not split:
            print(f"  exit {procs.pop().wait()}", flush=True)
    for p in procs:
        print(f"  exit {p.wait()}", flush=True)


def load(name, seeds, out_dir=OUT):
    docs = []
    for seed in seeds:
        path = out_dir / f"{slug(name)}_s{seed}.json"
        if run_file(path):
            docs.append(read_run(path))
    return docs


def summarize() -> None:
    rows = [(n, f, SEEDS) for n, f in EXPERIMENTS] + list(EXTRA)
    print("| variant | flags | seeds | test set acc (mean ± sd) | Δ vs baseline (± s.e.) "
          "| recon MSE | wall, 1 thread |")
    print("|---|---|---|---|---|---|---|")
    curves = {}
    base = np.array([d["final"]["set_acc"] for d in load(*EXPERIMENTS[0][:1], SEEDS)])
    for name, flags, seeds in rows:
        docs = load(name, seeds)
        if not docs:
            continue
        acc = np.array([d["final"]["set_acc"] for d in docs])
        mse = np.array([d["final"]["recon_mse"] for d in docs])
        wall = np.mean([d["timing"]["total_seconds"] for d in docs])
        spread = lambda a, f: f"{a.mean():{f}} ± {a.std(ddof=1):{f}}" if len(a) > 1 else f"{a[0]:{f}}"
        delta = "–"
        if name != EXPERIMENTS[0][0] and len(acc) > 1 and len(base) > 1:
            se = np.sqrt(acc.var(ddof=1) / len(acc) + base.var(ddof=1) / len(base))
            delta = f"{acc.mean() - base.mean():+.3f} ± {se:.3f}"
        print(f"| {name} | `{' '.join(flags) or '(defaults)'}` | {len(docs)} | {spread(acc, '.3f')} "
              f"| {delta} | {spread(mse, '.4f')} | {wall:.0f} s |")
        curves[name] = np.array([[e["set_acc"] for e in d["history"]["epochs"]] for d in docs])
    long = {}
    for where, suffix in ((ROOT / "runs" / "long", ""), (EARLIER, EARLIER_LABEL)):
        for name, _ in LONG["2 cores"] + LONG["1 core"]:
            docs = load(name, (0,), where)
            if docs:
                long[name + suffix] = docs[0]
    if long:
        print("\n| 60-minute run | epochs done | pairs seen | test set acc (5000 pairs) | soft | "
              "top-1 | recon MSE |")
        print("|---|---|---|---|---|---|---|")
        for name, d in long.items():
            f = d["final"]
            print(f"| {name} | {f['epoch']} | {f['step'] * d['config']['batch_size']:,} | "
                  f"{f['set_acc']:.3f} | {f['soft_acc']:.3f} | {f['top1']:.3f} | "
                  f"{f['recon_mse']:.4f} |")
    plot(curves, long)


def plot(curves, long) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 4.8), dpi=100)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1.25, 1)))
    lo, hi = 0.25, 0.7  # the variants differ by a few points: zoom in, name what falls outside
    for name, c in curves.items():
        epochs = np.arange(1, c.shape[1] + 1)
        mean = c.mean(0)
        label = f"{name} (n={len(c)})" + (f": {mean[-1]:.3f}, off scale" if mean[-1] < lo else "")
        line, = ax.plot(epochs, mean, marker="o", ms=3, label=label)
        if len(c) > 1:
            ax.fill_between(epochs, c.min(0), c.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch (6000 composites each)", ylabel="test two-digit set accuracy",
           title="Ablations at the default budget\n(mean over seeds; band = min..max)",
           ylim=(lo, hi))
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    goals = {IOU_TASK: 0.8, PAPER_TASK: 0.9}
    colors = {IOU_TASK: "C0", PAPER_TASK: "C3"}
    for name, d in long.items():
        task = name.split(",")[0]
        minutes = np.cumsum(d["timing"]["epoch_seconds"]) / 60
        acc = [e["set_acc"] for e in d["history"]["epochs"]]
        earlier = name.endswith(EARLIER_LABEL)
        ax2.plot(minutes, acc, marker="o", ms=2 if earlier else 3, color=colors[task],
                 alpha=0.45 if earlier else 1, ls="-" if "2 cores" in name else ":",
                 label=f"{name}: {acc[-1]:.3f}")
    for task, goal in goals.items():
        ax2.axhline(goal, color=colors[task], ls="--", lw=1, label=f"goal {goal:.0%} ({task})")
    ax2.set(xlabel="wall-clock minutes (2 cores: alone on the machine; 1 core: side by side)",
            ylabel="test two-digit set accuracy", ylim=(0.55, 0.95), xlim=(0, LONG_MINUTES),
            title=f"The best in {LONG_MINUTES} minutes (5000 test pairs)")
    ax2.legend(fontsize=7, loc="lower right")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    mc.atomic_write(ROOT / "viz" / "experiments.png", buf.getvalue())
    print("wrote viz/experiments.png")


# ----------------------------------------------------------------------------------------------
# failures: where a trained run fails (was failure_analysis.py)

def failures(path: str, args) -> None:
    run = mc.load_checkpoint(path)
    cfg = run.cfg
    _, test = mc.make_data(cfg, mnist_fetch.load_data(args, cfg))  # the checkpoint's own data
    v = mc.predict(run.eval_params, cfg, test["x"])
    right = mc.top2_hits(mc.class_scores(v), test["labels"]).all(1)                # (N,)
    iou = test["iou"]                                                               # (N,)
    last = run.history["epochs"][-1]  # an interrupted run saved params a part-epoch past this
    print(f"\n{path}: parameters at step {run.step}: set accuracy {right.mean():.3f} on "
          f"{len(right)} test composites (last logged: {last['set_acc']:.3f} at step "
          f"{last['step']}, end of epoch {last['epoch']})")
    print("| pairs containing digit | " + " | ".join(map(str, range(10))) + " |")
    print("|---|" + "---|" * 10)
    has = [(test["labels"] == k).any(1) for k in range(10)]
    print("| set accuracy | " + " | ".join(f"{right[h].mean():.3f}" for h in has) + " |")
    print("| share of pairs | " + " | ".join(f"{h.mean():.1%}" for h in has) + " |")
    edges = np.quantile(iou, np.linspace(0, 1, 6))
    print("\n| bounding-box IoU (quintile) | pairs | set accuracy |")
    print("|---|---|---|")
    bins = np.clip(np.searchsorted(edges, iou, side="right") - 1, 0, 4)  # ties go to one bin
    for q, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = bins == q
        print(f"| {lo:.2f} – {hi:.2f} | {sel.sum()} | {right[sel].mean():.3f} |")


# ----------------------------------------------------------------------------------------------
# routing: routing purity and segmentation by reconstruction of trained runs (was
# routing_metrics.py)

ROUTING_ABOUT = """Purity (visualize_multimnist_capsnet.routing_purity): of the primary capsules
whose receptive-field centre pixel is on digit a's ink only (a > 0.5, b == 0 there), the
|u|-weighted share of their votes (couplings c) routed to capsule a, per routing iteration; b
likewise; 'cross' is the share those capsules route to the other true digit. Iteration 1 is 1/10
by construction. Segmentation (segmentation_accuracy): composite ink pixels (> 0.5) on exactly one
source, each given to the larger of the two single-capsule reconstructions; the share given to the
right one.

The test composites are the checkpoint's own (its seed and task); with --n-test they are drawn
afresh from the same seed, so they are not a prefix of the run's own test set."""


def task_name(cfg: mc.Config) -> str:
    if cfg.min_iou == 0 and cfg.overlay == "clip-sum":
        return "paper's"
    if cfg.min_iou == 0.8 and cfg.overlay == "max":
        return "IoU >= 0.8"
    return f"IoU >= {cfg.min_iou:g}, {cfg.overlay}"


def checkpoint_test_pairs(cfg: mc.Config, args) -> tuple[mc.Config, dict]:
    """The checkpoint's test composites, args.n_test of them when given. The test pairs are drawn
    before the training pool, so resample=True (no pool) leaves them as they are."""
    cfg = dataclasses.replace(cfg, resample=True,
                              n_test=args.n_test if args.n_test else cfg.n_test)
    return cfg, mc.make_data(cfg, mnist_fetch.load_data(args, cfg))[1]


def routing_measures(run: mc.Run, args) -> dict:
    import visualize_multimnist_capsnet as viz
    cfg, test = checkpoint_test_pairs(run.cfg, args)
    params = run.eval_params
    v = mc.predict(params, cfg, test["x"])
    set_acc = float(mc.top2_hits(mc.class_scores(v), test["labels"]).all(1).mean())
    return dict(cfg=cfg, n=len(test["x"]), set_acc=set_acc,
                purity=viz.routing_purity(params, cfg, test),
                seg=viz.segmentation_accuracy(params, cfg, test, v=v))


def fmt(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.4f}"


def routing_table(rows: list[tuple[str, mc.Run, dict]]) -> str:
    n_it = max(m["cfg"].routing_iters for _, _, m in rows)
    head = (["checkpoint", "task", "step", "test pairs", "set acc"]
            + [f"purity iter {r + 1} (a / b)" for r in range(n_it)]
            + ["cross, last iter (a→b / b→a)", "segmentation (a / b)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path, run, m in rows:
        p, s = m["purity"], m["seg"]
        pur = [f"{fmt(p['a'][r])} / {fmt(p['b'][r])}" if r < len(p["a"]) else ""
               for r in range(n_it)]
        cells = ([Path(path).name, task_name(m["cfg"]), str(run.step), str(m["n"]),
                  f"{m['set_acc']:.3f}"] + pur
                 + [f"{fmt(p['cross_a'][-1])} / {fmt(p['cross_b'][-1])}",
                    f"**{fmt(s['accuracy'])}** ({fmt(s['acc_a'])} / {fmt(s['acc_b'])})"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing(args) -> None:
    import visualize_multimnist_capsnet as viz
    runs = [(path, mc.load_checkpoint(path)) for path in args.checkpoints]  # all, before work
    rows = [(path, run, routing_measures(run, args)) for path, run in runs]
    print(routing_table(rows))
    print(f"\npurity over primary capsules centred on one digit's ink only (> {viz.INK:g}, "
          f"the other 0); segmentation over composite ink (> {viz.INK:g}) on one source only")
    for path, _, m in rows:
        p, s = m["purity"], m["seg"]
        print(f"{Path(path).name}: {p['n_a']} a-only and {p['n_b']} b-only capsules, "
              f"{s['n_pixels']} pixels scored")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


# ----------------------------------------------------------------------------------------------
# task-stats: how the two MultiMNIST tasks differ (was task_stats.py)

TASK_STATS_ABOUT = """The IoU >= 0.8 task (the default) demands IoU >= 0.8 for every pair and
merges by max; the paper's task shifts each digit independently by up to 4 px (IoU unconstrained)
and adds then clips the two images. Class frequencies and bounding-box IoU of 60,000 training
pairs of each task, seed 0, as markdown tables."""


def pair_stats(mnist, min_iou, n=60_000, seed=0):
    pairs = mc.make_pairs(mnist["train_x"], mnist["train_y"], n, np.random.default_rng(seed),
                          min_iou=min_iou)
    freq = np.bincount(pairs["labels"].ravel(), minlength=10) / n  # share of pairs with digit k
    a, b = mc.bounding_boxes(pairs["a"]), mc.bounding_boxes(pairs["b"])
    return freq, pairs["iou"], mc.box_intersection(a, b) / mc.box_area(a)


def task_stats(args) -> None:
    mnist = mnist_fetch.load_mnist(args.data_dir)
    tasks = ((IOU_TASK, pair_stats(mnist, 0.8, args.n)),
             (PAPER_TASK, pair_stats(mnist, 0.0, args.n)))
    print("| digit | " + " | ".join(str(k) for k in range(10)) + " |")
    print("|---|" + "---|" * 10)
    for name, (freq, _, _) in tasks:
        print(f"| {name} | " + " | ".join(f"{100 * f:.1f}%" for f in freq) + " |")
    print("\n| task | mean IoU | 5% | 25% | median | 75% | 95% | IoU >= 0.8 | mean overlap of a's box |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, iou, overlap) in tasks:
        q = np.quantile(iou, [0.05, 0.25, 0.5, 0.75, 0.95])
        print(f"| {name} | {iou.mean():.3f} | " + " | ".join(f"{x:.3f}" for x in q)
              + f" | {100 * (iou >= 0.8).mean():.1f}% | {100 * overlap.mean():.1f}% |")


# ----------------------------------------------------------------------------------------------
# The command line

def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="experiments.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND",
                           parser_class=mc.ArgumentParser)

    def add(name, work, help, description=None):
        q = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:])
        q.set_defaults(work=work, prog=q.prog)
        return q
    r = add("run", lambda a: run(a.jobs), "train every missing ablation run, three seeds each")
    r.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    add("long", lambda a: long_runs("2 cores"),
        "the two 60-minute runs, one after the other, 2 cores each")
    add("long-split", lambda a: long_runs("1 core"),
        "the two 60-minute runs side by side, 1 core each")
    add("summarize", lambda a: summarize(), "the README's tables and viz/experiments.png")
    data_dir = dict(default=None,
                    help="MNIST cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    f = add("failures", lambda a: [failures(path, a) for path in a.checkpoints],
            "set accuracy by the digits a pair contains and by how much the two digits' "
            "bounding boxes overlap, on each run's own test composites (was failure_analysis.py)")
    f.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints saved with --save")
    f.add_argument("--data-dir", **data_dir)
    o = add("routing", routing, "routing purity and segmentation by reconstruction of trained "
            "runs, on their own test composites (was routing_metrics.py)")
    o.description += "\n\n" + ROUTING_ABOUT
    o.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoints saved with --save, or model files")
    o.add_argument("--n-test", type=positive_int, default=None,
                   help="test composites per checkpoint (default: the run's own n_test)")
    o.add_argument("--data-dir", **data_dir)
    t = add("task-stats", task_stats, "how the two MultiMNIST tasks differ: class frequencies "
            "and bounding-box IoU (was task_stats.py)", TASK_STATS_ABOUT)
    t.add_argument("--n", type=int, default=60_000,
                   help="training pairs of each task (default: %(default)s)")
    t.add_argument("--data-dir", **data_dir)
    return p


def main(argv=None) -> int:
    """Run the subcommand argv names; the exit status: a CapsNetError (a bad checkpoint, no
    MNIST) is one line on stderr and status 1."""
    args = build_parser().parse_args(argv)
    try:
        args.work(args)
    except mc.CapsNetError as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted; nothing half-written (every write is atomic)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
