"""Make the shipped model (models/capsnet-multimnist.npz), training it first if need be.

    python3 bench/ship_model.py runs/recipe/long-120-min_s0.npz

When the checkpoint does not exist it is trained first with train_flags(), stopped by SIGINT after
BUDGET as `bench/recipe.py long` stops it (the paper's task, fresh pairs, Conv1 64 / 16 capsule
types, digit-capsule biases, 60,000 pairs an epoch, weights averaged; on the 2-core AMD EPYC the
budget ended at step 50,141, in epoch 27; a faster or slower CPU stops elsewhere; the command is
printed, its metrics go beside the checkpoint as .json). This script then evaluates its averaged
parameters on 10,000 fresh test pairs of both tasks (the paper's task and the IoU >= 0.8 task),
once as stored in float32 and once rounded to float16; it stores float16 when neither
task's set accuracy moves by more than --tolerance, else float32. The model file holds the
parameters, the config, the per-epoch history and these metrics; no Adam state.
Metrics also go to runs/ship/model_metrics.json.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASE, LONG, ROOT, SHIPPED, TASKS, VARIANTS, test_metrics  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402

BUDGET = "120m"


def train_flags() -> list[str]:
    """The flags of the `bench/recipe.py long` run that was shipped: the recipe's BASE, LONG and
    the SHIPPED variant's flags (bench/common.py, which recipe.py reads too), and the 27 epochs
    it sized on the AMD EPYC."""
    return ["--seed", "0", "--workers", "2", "--quiet", *BASE, *LONG, *VARIANTS[SHIPPED],
            "--n-epochs", "27"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a training checkpoint (multimnist_capsnet.py --save)")
    p.add_argument("--out", default=str(mc.MODEL_FILE), help="(default: %(default)s)")
    p.add_argument("--n-test", type=int, default=10_000, help="test pairs per task (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.002,
                   help="largest set-accuracy change float16 may cause (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="MNIST cache (default: the module's)")
    args = p.parse_args()
    if not Path(args.checkpoint).exists():
        cmd = ["timeout", "-s", "INT", BUDGET, sys.executable, str(ROOT / "multimnist_capsnet.py"),
               *train_flags(), "--save", args.checkpoint,
               "--metrics-json", str(Path(args.checkpoint).with_suffix(".json"))]
        print("$ " + " ".join("python3" if c == sys.executable else c for c in cmd), flush=True)
        if subprocess.run(cmd).returncode not in (0, 124):  # 124: the budget ended it, saved
            return 1
    try:
        run = mc.load_checkpoint(args.checkpoint)
        mnist = mc.load_data(args, run.cfg)
        t0 = time.perf_counter()
        with mc.worker_pool(run.cfg.workers) as workers:
            params = run.eval_params
            f32 = test_metrics(params, run.cfg, mnist, args.n_test, workers)
            half = {k: a.astype("float16").astype(a.dtype) for k, a in params.items()}
            f16 = test_metrics(half, run.cfg, mnist, args.n_test, workers)
    except mc.CapsNetError as e:
        print(f"ship_model.py: error: {e}", file=sys.stderr)
        return 1
    moved = max(abs(f16[t]["set_acc"] - f32[t]["set_acc"]) for t in TASKS)
    storage = "float16" if moved <= args.tolerance else "float32"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    metrics = dict(n_test=args.n_test, storage=storage, float32=f32, float16=f16,
                   largest_change=moved, eval_seconds=round(time.perf_counter() - t0, 1))
    info = dict(test_metrics=metrics[storage], n_test=args.n_test,
                made_by=f"python3 bench/ship_model.py {args.checkpoint}", source_commit=commit)
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


if __name__ == "__main__":
    sys.exit(main())
