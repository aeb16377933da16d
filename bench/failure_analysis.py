"""Where a trained run fails: test set accuracy by the digits a pair contains and by how much the
two digits' bounding boxes overlap, on the run's own test composites.

    python3 bench/failure_analysis.py runs/long/seed-task--60-min--2-cores_s0.npz \
        runs/long/paper-task--60-min--2-cores_s0.npz
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimnist_capsnet as m  # noqa: E402


def analyse(path: str, args) -> None:
    run = m.load_checkpoint(path)
    cfg = run.cfg
    _, test = m.make_data(cfg, m.load_data(args, cfg))  # the checkpoint's own data source
    v = m.predict(run.eval_params, cfg, test["x"])
    right = m.top2_hits(m.class_scores(v), test["labels"]).all(1)                  # (N,)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoints saved with --save")
    p.add_argument("--data-dir", default=None,
                   help="MNIST cache directory (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    args = p.parse_args()
    for path in args.checkpoints:
        try:
            analyse(path, args)
        except m.CapsNetError as e:
            p.error(str(e))


if __name__ == "__main__":
    main()
