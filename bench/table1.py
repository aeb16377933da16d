"""The paper's Table 1 on this machine: does routing matter, and does CapsNet beat a CNN, at equal
CPU time on the paper's MultiMNIST task?

    python3 bench/table1.py calibrate           # one step of every row, one core: ms per step
    python3 bench/table1.py run [--minutes 15] [--seeds 0 1 2]  # every row x seeds, two at a time
    python3 bench/table1.py long                # the 60-minute rows, one seed, two at a time
    python3 bench/table1.py score               # score runs whose scoring was missed
    python3 bench/table1.py summarize           # the markdown table from runs/table1/

Every run is one plain CLI call (multimnist_capsnet.py for a CapsNet row, cnn_baseline.py for a
CNN row), printed before it starts, stopped by SIGINT when its budget is
spent (it finishes its step and saves its checkpoint; timeout then exits 124), then scored from
that checkpoint on 10,000 fresh test pairs (bench/common.test_metrics, the paper's task):
every row is scored at the very step its budget ended, whatever the epoch. Outputs:
runs/table1/NAME_sSEED.json (training metrics), .eval.json (the score); checkpoints and logs stay
out of git.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PAPER_TASK, ROOT, difference, make_step, median_time, run_jobs,  # noqa: E402
                    score_missing, slug, test_metrics, train_command, training_parser)
import mnist_fetch  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402

OUT = ROOT / "runs" / "table1"
SEEDS = (0, 1, 2)
# The paper's task with fresh pairs; small epochs (6000 pairs) so the per-epoch curve is dense.
TASK = ["--min-iou", "0", "--overlay", "clip-sum", "--resample", "--n-train", "6000",
        "--n-test", "1000", "--n-epochs", "100000"]
# Every CapsNet row: the shipped model's size and recipe (Conv1 64, 16 capsule types, decoder
# 256/512, recon weight 0.005, lr decay 0.96 per 500 steps); rows change one thing each.
CAPSNET = ["--conv1-channels", "64", "--primary-types", "16", "--recon-weight", "0.005",
           "--lr-decay", "0.96", "--lr-decay-steps", "500"]
CNN_MATCHED = ["--cnn-conv1", "56", "--cnn-conv2", "112", "--cnn-fc", "1024"]  # calibrate: 1.05x
ROWS = [  # (name, model, flags): the CNN rows train through cnn_baseline.py
    ("CNN, the paper's small widths 32/64/512", "cnn", ["--cnn-conv1", "32", "--cnn-conv2", "64",
                                                         "--cnn-fc", "512"]),
    ("CNN widened to CapsNet's step time", "cnn", CNN_MATCHED),
    ("CapsNet, 1 routing iteration", "capsnet", [*CAPSNET, "--routing-iters", "1"]),
    ("CapsNet, 3 routing iterations", "capsnet", CAPSNET),
    ("CapsNet, 3 iterations, no reconstruction", "capsnet", [*CAPSNET, "--recon-weight", "0"]),
    ("CapsNet, 3 iterations, exact routing gradient", "capsnet",
     [*CAPSNET, "--routing-grad", "full"]),
]
# CapsNet 1 and 3 iterations first, so that the routing contrast runs side by side; then the best
# CNN row of the short runs (the paper's small widths)
LONG_ROWS = (2, 3, 0)


def command(name, model, flags, seed, minutes):
    base = OUT / f"{slug(name)}{'_long' if minutes >= 60 else ''}_s{seed}"
    cmd = ["timeout", "-s", "INT", f"{minutes}m",
           *train_command(model, "--seed", str(seed), "--workers", "1", "--quiet", *TASK, *flags,
                          "--save", str(base.with_suffix(".npz").relative_to(ROOT)),
                          "--metrics-json", str(base.with_suffix(".json").relative_to(ROOT)))]
    return cmd, base


def score(base: Path) -> None:
    """The checkpoint at base.npz on 10,000 fresh test pairs of the paper's task."""
    run = mc.load_checkpoint(base.with_suffix(".npz"))
    mnist = mnist_fetch.load_data(argparse.Namespace(data_dir=None), run.cfg)
    metrics = test_metrics(run.eval_params, run.cfg, mnist, 10_000, None)[PAPER_TASK]
    n_params = sum(p.size for p in run.params.values())
    doc = dict(metrics, step=run.step, pairs=run.step * run.cfg.batch_size, n_params=n_params)
    mc.atomic_write(base.with_suffix(".eval.json"), (json.dumps(doc, indent=1) + "\n").encode())


def run_all(jobs, minutes, rows, seeds) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    todo = [command(*ROWS[i], s, minutes) for i in rows for s in seeds]  # in the order of rows
    todo = [(c, b) for c, b in todo if not b.with_suffix(".eval.json").exists()]
    # 124: timeout's status when the budget ran out (the run saved on its SIGINT, as intended);
    # 0: finished before it
    run_jobs(todo, jobs, on_done=lambda rc, base: score(base) if rc in (0, 124) else None)


def calibrate() -> None:
    """ms per training step of every row, batch 32, one worker, one BLAS thread (set the
    environment's OPENBLAS_NUM_THREADS=1), synthetic digits: the CNN row's widths are picked
    here to match CapsNet's step."""
    extra = [("CNN 128/256/1024", "cnn", ["--cnn-conv1", "128", "--cnn-conv2", "256",
                                          "--cnn-fc", "1024"]),
             ("CNN, the paper's 512/256/1024", "cnn", [])]
    for name, model, flags in ROWS + extra:
        args = training_parser(model).parse_args([*TASK, *flags, "--workers", "1"])
        cfg = mc.config_from_args(args)
        ms = 1e3 * median_time(make_step(cfg, cfg.batch_size), 10)
        n_params = sum(p.size for p in mc.init_params(cfg, np.random.default_rng(0)).values())
        print(f"| {name} | {n_params / 1e6:.2f}M | {ms:.0f} ms |", flush=True)


def scores(name: str, suffix: str = "") -> list[dict]:
    paths = sorted(OUT.glob(f"{slug(name)}{suffix}_s*.eval.json"))
    return [json.loads(p.read_text()) for p in paths]


# The questions, as differences of two rows' mean set accuracy (the short runs)
CONTRASTS = [("routing: 3 iterations - 1 iteration (uniform coupling)", 3, 2),
             ("CapsNet 3 iterations - CNN at the paper's small widths", 3, 0),
             ("CapsNet 3 iterations - CNN at CapsNet's step time", 3, 1),
             ("reconstruction: with - without", 3, 4),
             ("routing gradient: frozen - exact", 3, 5)]


def summarize() -> None:
    print("| row | seeds | test set acc (10,000 pairs), mean ± s.e. | soft | top-1 | steps | "
          "params |")
    print("|---|---|---|---|---|---|---|")
    for suffix, label in (("", ""), ("_long", ", 60 min")):
        for name, _, _ in ROWS:
            docs = scores(name, suffix)
            if not docs:
                continue
            acc = np.array([d["set_acc"] for d in docs])
            se = (f" ± {acc.std(ddof=1) / np.sqrt(len(acc)):.3f}" if len(acc) > 1
                  else " (one seed)")
            mean = lambda k: np.mean([d[k] for d in docs])
            print(f"| {name}{label} | {len(docs)} | {acc.mean():.3f}{se} | "
                  f"{mean('soft_acc'):.3f} | {mean('top1'):.3f} | {mean('step'):,.0f} | "
                  f"{docs[0]['n_params'] / 1e6:.2f}M |")
    print("\n| difference (short runs) | Δ set acc ± s.e. | seeds |")
    print("|---|---|---|")
    for what, a, b in CONTRASTS:
        x, y = (np.array([d["set_acc"] for d in scores(ROWS[k][0])]) for k in (a, b))
        if len(x) > 1 and len(y) > 1:
            print(f"| {what} | {difference(x, y)} | {len(x)} and {len(y)} |")


def main(argv=None) -> int:
    p = mc.ArgumentParser(prog="table1.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND",
                           parser_class=mc.ArgumentParser)

    def add(name, help):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:])
    add("calibrate", "ms per training step of every row, batch 32, one worker (run with "
        "OPENBLAS_NUM_THREADS=1): the CNN row's widths are picked to match CapsNet's step")
    r = add("run", "every row x --seeds, --jobs at a time, each stopped after --minutes and "
            "scored on 10,000 fresh test pairs")
    r.add_argument("--minutes", type=int, default=15, help="budget per run (default: %(default)s)")
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                   help="seeds (default: %(default)s)")
    lo = add("long", "the 60-minute rows (CapsNet 1 and 3 iterations, the small CNN), seed 0")
    for q in (r, lo):
        q.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    add("score", "score the runs in runs/table1/ whose scoring was missed")
    add("summarize", "the markdown table and the contrasts from runs/table1/")
    args = p.parse_args(argv)
    if args.cmd == "calibrate":
        calibrate()
    elif args.cmd == "run":
        run_all(args.jobs, args.minutes, range(len(ROWS)), args.seeds)
    elif args.cmd == "long":
        run_all(args.jobs, 60, LONG_ROWS, (0,))
    elif args.cmd == "score":
        score_missing(OUT, score)
    else:
        summarize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
