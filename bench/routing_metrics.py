"""Routing purity and segmentation by reconstruction of trained runs, on their own test composites.

    python3 bench/routing_metrics.py runs/ship/paper-task-36-epochs_s0.npz --n-test 1000

Purity (visualize_multimnist_capsnet.routing_purity): of the primary capsules whose receptive-
field centre pixel is on digit a's ink only (a > 0.5, b == 0 there), the |u|-weighted share of
their votes (couplings c) routed to capsule a, per routing iteration; b likewise; 'cross' is the
share those capsules route to the other true digit. Iteration 1 is 1/10 by construction.
Segmentation (segmentation_accuracy): composite ink pixels (> 0.5) on exactly one source, each
given to the larger of the two single-capsule reconstructions; the share given to the right one.

The test composites are the checkpoint's own (its seed and task); with --n-test they are drawn
afresh from the same seed, so they are not a prefix of the run's own test set.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimnist_capsnet as mc  # noqa: E402
import visualize_multimnist_capsnet as viz  # noqa: E402

PROG = "routing_metrics.py"


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
    return cfg, mc.make_data(cfg, mc.load_data(args, cfg))[1]


def measure(run: mc.Run, args) -> dict:
    cfg, test = checkpoint_test_pairs(run.cfg, args)
    params = run.eval_params
    v = mc.predict(params, cfg, test["x"])
    set_acc = float(mc.top2_hits(mc.class_scores(v), test["labels"]).all(1).mean())
    return dict(cfg=cfg, n=len(test["x"]), set_acc=set_acc,
                purity=viz.routing_purity(params, cfg, test),
                seg=viz.segmentation_accuracy(params, cfg, test, v=v))


def fmt(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.4f}"


def table(rows: list[tuple[str, mc.Run, dict]]) -> str:
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


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoints saved with --save, or model files")
    p.add_argument("--n-test", type=positive_int, default=None,
                   help="test composites per checkpoint (default: the run's own n_test)")
    p.add_argument("--data-dir", default=None,
                   help="MNIST cache (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        runs = [(path, mc.load_checkpoint(path)) for path in args.checkpoints]  # all, before work
        rows = [(path, run, measure(run, args)) for path, run in runs]
        print(table(rows))
        print(f"\npurity over primary capsules centred on one digit's ink only (> {viz.INK:g}, "
              f"the other 0); segmentation over composite ink (> {viz.INK:g}) on one source only")
        for path, _, m in rows:
            p, s = m["purity"], m["seg"]
            print(f"{Path(path).name}: {p['n_a']} a-only and {p['n_b']} b-only capsules, "
                  f"{s['n_pixels']} pixels scored")
    return viz.run_reporting_errors(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
