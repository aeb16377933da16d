"""The seed's open questions, measured: each variant at the seed's budget, three seeds each.

    python3 bench/experiments.py run        # train every missing run (two at a time, 1 thread each)
    python3 bench/experiments.py summarize  # the README's table and viz/experiments.png

Every run is one plain CLI call (printed before it starts) writing runs/exp/NAME_sSEED.json, so
any row can be reproduced alone; a finished run is never repeated, so `run` can be resumed.
"""
import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "exp"
SEEDS = (0, 1, 2)
# (name, flags on top of the defaults: 8 epochs x 6000 pairs, batch 32, seed task)
EXPERIMENTS = [
    ("baseline", []),
    ("routing-grad full", ["--routing-grad", "full"]),
    ("resample", ["--resample"]),
    ("capacity 64/16", ["--conv1-channels", "64", "--primary-types", "16"]),
    ("recon weight 0.005", ["--recon-weight", "0.005"]),
    ("routing iters 1", ["--routing-iters", "1"]),
    ("paper task", ["--min-iou", "0", "--overlay", "clip-sum"]),
]
EXTRA = [  # single runs on a smaller budget
    ("paper preset, 1 epoch", ["--preset", "paper", "--n-epochs", "1"], (0,)),
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def command(name, flags, seed):
    out = OUT / f"{slug(name)}_s{seed}.json"
    return [sys.executable, "multimnist_capsnet.py", "--seed", str(seed), "--workers", "1",
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
    todo = [(cmd, out) for cmd, out in todo if not out.exists()]
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            cmd, out = todo.pop(0)
            print("$ " + " ".join(cmd[1:]).replace("multimnist_capsnet.py", "python3 multimnist_capsnet.py"),
                  flush=True)
            log = open(out.with_suffix(".log"), "w")
            running.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), out))
        time.sleep(2)
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                print(f"  {'done' if proc.returncode == 0 else 'FAILED'}: {out.name}", flush=True)


def load(name, seeds):
    docs = []
    for seed in seeds:
        path = OUT / f"{slug(name)}_s{seed}.json"
        if path.exists():
            docs.append(json.loads(path.read_text()))
    return docs


def summarize() -> None:
    rows = [(n, f, SEEDS) for n, f in EXPERIMENTS] + list(EXTRA)
    print("| variant | flags | seeds | test set acc | recon MSE | wall (1 thread) |")
    print("|---|---|---|---|---|---|")
    curves = {}
    for name, flags, seeds in rows:
        docs = load(name, seeds)
        if not docs:
            continue
        acc = np.array([d["final"]["set_acc"] for d in docs])
        mse = np.array([d["final"]["recon_mse"] for d in docs])
        wall = np.mean([d["timing"]["total_seconds"] for d in docs])
        spread = lambda a, f: f"{a.mean():{f}} ± {a.std(ddof=1):{f}}" if len(a) > 1 else f"{a[0]:{f}}"
        print(f"| {name} | `{' '.join(flags) or '(defaults)'}` | {len(docs)} | {spread(acc, '.3f')} "
              f"| {spread(mse, '.4f')} | {wall:.0f} s |")
        curves[name] = np.array([[e["set_acc"] for e in d["history"]["epochs"]] for d in docs])
    plot(curves)


def plot(curves) -> None:
    from matplotlib.figure import Figure
    sys.path.insert(0, str(ROOT))
    from multimnist_capsnet import atomic_write
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, c in curves.items():
        epochs = np.arange(1, c.shape[1] + 1)
        line, = ax.plot(epochs, c.mean(0), marker="o", ms=3, label=f"{name} (n={len(c)})")
        if len(c) > 1:
            ax.fill_between(epochs, c.min(0), c.max(0), color=line.get_color(), alpha=0.15)
    ax.axhline(1 / 45, color="gray", ls=":", label="chance 1/45")
    ax.set(xlabel="epoch (6000 pairs)", ylabel="test two-digit set accuracy",
           title="Open questions at the seed's budget: mean over seeds, band = min..max")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write(ROOT / "viz" / "experiments.png", buf.getvalue())
    print("wrote viz/experiments.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("run", "summarize"))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default: 2)")
    args = p.parse_args()
    run(args.jobs) if args.what == "run" else summarize()


if __name__ == "__main__":
    main()
