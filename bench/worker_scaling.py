"""Do two worker threads slow each other down?

    python3 bench/worker_scaling.py

Times one worker's share of the default step (forward and backward on 16 of the 32 composites)
on a worker thread alone, then with the second worker running its own 16 at the same time, as
training does ("both" is the slower of the two). Equal times mean the cores do not contend (for
memory bandwidth, the GIL, the allocator's lock): the step is as fast as one core's share of the
work allows. Median ms of --repeat calls, alternating the two settings --rounds times.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import multimnist_capsnet as m  # noqa: E402
from bench_step import median_time, training_batch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20, help="calls timed per setting (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the settings (default: 3)")
    args = p.parse_args()
    m.keep_freed_memory()
    cfg = m.Config()
    rng = np.random.default_rng(0)
    params = m.init_params(cfg, rng)
    batch = training_batch(cfg, cfg.batch_size, rng)
    half = cfg.batch_size // 2
    shards = [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]

    def share(shard):
        return m.loss_and_grads(params, shard, cfg, 0.5)
    alone, both = [], []
    with m.worker_pool(2) as pool:
        if pool is None:
            sys.exit("worker_scaling: this process's BLAS threads cannot be set, so training runs serially")
        for _ in range(args.rounds):
            alone.append(median_time(lambda: pool.submit(share, shards[0]).result(), args.repeat))
            both.append(median_time(lambda: list(pool.map(share, shards)), args.repeat))
    ms = [" ".join(f"{t * 1e3:.1f}" for t in ts) for ts in (alone, both)]
    print(f"one worker's share ({half} composites, forward + backward), ms per round")
    print(f"  alone                        {ms[0]}")
    print(f"  both workers at once         {ms[1]}")
    print(f"  ratio of medians             x{np.median(both) / np.median(alone):.3f}")


if __name__ == "__main__":
    main()
