"""Past one machine: MPI against threads here, the Allreduce measured, and a model of many ranks.

    python3 bench/scaling.py throughput [--rounds 6] [--steps 60] [size flags]
        2 ranks x 1 thread (mpi_train.py) against 1 process x 2 threads, in alternating runs
    python3 bench/scaling.py allreduce [--repeat 30]
        the Allreduce of one step's buffer (as mpi_train.py sends it) at the shipped and the
        paper's sizes, 2 ranks on loopback
    python3 bench/scaling.py compute [--repeat 5]
        one core's step at the paper's size for 2, 4, 8 and 16 pairs: its cost per pair
    python3 bench/scaling.py model --per-pair-ms X --fixed-ms Y [--out-figure viz/scaling.png]
        step time plus a ring Allreduce over 10 and 25 Gbit/s for 8 to 256 ranks: efficiency
        and the time to the paper's 60M pairs, as a table (stdout) and a figure

Needs the MPI extra (pip install -e ".[mpi]") for throughput and allreduce.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_model, commit, median_time  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402

SIZES = {"shipped": ["--conv1-channels", "64", "--primary-types", "16", "--digit-bias"],
         "paper": ["--preset", "paper"]}
PAIRS = 60_000_000          # the paper's MultiMNIST training: 60M pairs
RANKS = (8, 16, 32, 64, 128, 256)
GBITS = (10, 25)
LATENCY_US = 20.0           # per message of the ring, a TCP/Ethernet figure (RDMA: ~2-5 us)


def header() -> str:
    return f"# {cpu_model()}, 2 cores; commit {commit()}"


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}:"
                                         f"{__import__('os').environ.get('PATH', '')}")
    if found is None:
        raise SystemExit("scaling.py: error: no mpiexec: pip install -e \".[mpi]\"")
    return found


def size_config(flags) -> mc.Config:
    return mc.config_from_args(mc.build_parser().parse_args(list(flags)))


# ----------------------------------------------------------------------------------------------
# throughput: the same short run as 1 process x 2 threads and as 2 ranks x 1 thread, in turn

def timed_run(cmd: list[str], out: Path) -> float:
    """Steps per second of one short training run: its one epoch's steps over its seconds (the
    epoch's own clock: no start-up, no data making, an evaluation of 32 test pairs)."""
    r = subprocess.run(cmd + ["--metrics-json", str(out)], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"scaling.py: error: {' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    doc = json.loads(out.read_text())
    return doc["step"] / doc["timing"]["epoch_seconds"][0]


def throughput_main(args, extra) -> int:
    common = ["--n-epochs", "1", "--n-train", str(32 * args.steps), "--n-test", "32", "--quiet",
              *extra]
    ways = {"1 process x 2 threads": [sys.executable, "multimnist_capsnet.py", "--workers", "2"],
            "2 ranks x 1 thread": [mpiexec(), "-n", "2", sys.executable, "mpi_train.py",
                                   "--workers", "1"]}
    rates = {k: [] for k in ways}
    print(header())
    print(f"# python3 bench/scaling.py throughput --rounds {args.rounds} --steps {args.steps} "
          + " ".join(extra))
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]  # alternate who goes first
            for name in order:
                rates[name].append(timed_run(ways[name] + common, Path(tmp) / "m.json"))
            print(f"round {r + 1}: " + "  ".join(f"{k} {rates[k][-1]:.2f} steps/s" for k in ways),
                  flush=True)
    a, b = (np.array(rates[k]) for k in ways)
    print("\n| way | steps/s, median (min-max) |\n|---|---|")
    for k in ways:
        v = np.array(rates[k])
        print(f"| {k} | {np.median(v):.2f} ({v.min():.2f}-{v.max():.2f}) |")
    ratio = b / a
    print(f"\nratio 2 ranks / threads, per round: median {np.median(ratio):.3f} "
          f"(min {ratio.min():.3f}, max {ratio.max():.3f}); target: within 5%")
    return 0


# ----------------------------------------------------------------------------------------------
# allreduce: one step's buffer, timed on 2 ranks (this script again, under mpiexec)

def allreduce_rank(args) -> int:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rows = []
    for name, flags in SIZES.items():
        cfg = size_config(flags)
        p = sum(math.prod(s) for s in mc.init_shapes(cfg).values())
        grads = np.ones(p, np.float32)  # as mpi_train.py sends a step: the gradients, then
        scalars = np.ones(1 + len(mc.model_for(cfg).loss_terms) + len(mc.SIGNALS))  # float64

        def once():
            comm.Barrier()
            comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
            comm.Allreduce(MPI.IN_PLACE, scalars, op=MPI.SUM)
        rows.append((name, p, grads.nbytes, median_time(once, args.repeat)))
    if comm.rank == 0:
        print("| size | parameters | MB a step | one step's Allreduces, 2 ranks, loopback (median ms) |")
        print("|---|---|---|---|")
        for name, p, nbytes, t in rows:
            print(f"| {name} | {p:,} | {nbytes / 1e6:.1f} | {1e3 * t:.1f} |")
    return 0


def allreduce_main(args, extra) -> int:
    print(header())
    print(f"# python3 bench/scaling.py allreduce --repeat {args.repeat}", flush=True)
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, __file__, "allreduce",
                        "--repeat", str(args.repeat), "--as-rank"], cwd=ROOT)
    return r.returncode


# ----------------------------------------------------------------------------------------------
# compute: one core's step at the paper's size, against the number of pairs

def compute_main(args, extra) -> int:
    print(header())
    print(f"# python3 bench/scaling.py compute --repeat {args.repeat}  (one BLAS thread)")
    blas = mc.blas_limiter()
    cfg = size_config(SIZES["paper"])
    from common import make_step
    ns, ts = [2, 4, 8, 16], []
    with blas.limit(limits=1) if blas else open(__file__):
        for n in ns:
            ts.append(median_time(make_step(cfg, n), args.repeat))
            print(f"paper size, {n:2d} pairs: {1e3 * ts[-1]:.0f} ms a step", flush=True)
    slope, fixed = np.polyfit(ns, 1e3 * np.array(ts), 1)
    print(f"fit: {fixed:.0f} ms + {slope:.1f} ms a pair  (--fixed-ms {fixed:.0f} "
          f"--per-pair-ms {slope:.1f})")
    return 0


# ----------------------------------------------------------------------------------------------
# model: compute + a ring Allreduce, for many ranks

def ring_seconds(nbytes: float, ranks: int, gbit: float, latency_us: float) -> float:
    """A ring Allreduce of the gradients (2 (N - 1) messages of nbytes / N each, one after
    another), then the few scalars' (recursive doubling: log2 N messages)."""
    ring = 2 * (ranks - 1) * (latency_us * 1e-6 + nbytes / ranks / (gbit * 1e9 / 8))
    return ring + math.log2(ranks) * latency_us * 1e-6


def model_rows(per_pair_ms, fixed_ms, nbytes, latency_us):
    """(scenario, ranks, pairs a rank, gbit, step s, allreduce s, efficiency, days to 60M)."""
    rows = []
    for scenario, per_rank in (("the reference's batch 128, split", None),
                               ("16 pairs a rank", 16)):
        for ranks in RANKS:
            local = 128 / ranks if per_rank is None else per_rank
            if local < 1:
                continue  # fewer than one pair a rank: the batch must grow instead
            compute = (fixed_ms + per_pair_ms * local) / 1e3
            for gbit in GBITS:
                comm = ring_seconds(nbytes, ranks, gbit, latency_us)
                step = compute + comm
                days = PAIRS / (local * ranks) * step / 86400
                rows.append((scenario, ranks, local, gbit, compute, comm, compute / step, days))
    return rows


def model_main(args, extra) -> int:
    cfg = size_config(SIZES["paper"])
    p = sum(math.prod(s) for s in mc.init_shapes(cfg).values())
    nbytes = 4 * p  # float32 gradients
    rows = model_rows(args.per_pair_ms, args.fixed_ms, nbytes, args.latency_us)
    print(f"# python3 bench/scaling.py model --per-pair-ms {args.per_pair_ms} --fixed-ms "
          f"{args.fixed_ms} --latency-us {args.latency_us}")
    print(f"# the paper's size: {p:,} parameters, {nbytes / 1e6:.1f} MB a step (float32); a "
          f"rank = one core of the CPU measured by `compute`; ring Allreduce, {args.latency_us:g} "
          "us a message; no overlap of compute and communication")
    print("\n| batch | ranks | pairs a rank | Gbit/s | compute (ms) | Allreduce (ms) | efficiency "
          "| days to 60M pairs |\n|---|---|---|---|---|---|---|---|")
    for scenario, ranks, local, gbit, compute, comm, eff, days in rows:
        print(f"| {scenario} | {ranks} | {local:g} | {gbit} | {1e3 * compute:.0f} | "
              f"{1e3 * comm:.0f} | {100 * eff:.0f}% | {days:.1f} |")
    for scenario in dict.fromkeys(r[0] for r in rows):
        for gbit in GBITS:
            mine = [r for r in rows if r[0] == scenario and r[3] == gbit]
            low = [r[1] for r in mine if r[6] < 0.8]
            print(f"{scenario}, {gbit} Gbit/s: " + (f"efficiency below 80% from {low[0]} ranks"
                  if low else f"80% or more up to {mine[-1][1]} ranks, the most it can use"))
    if args.out_figure:
        figure(rows, Path(args.out_figure))
        print(f"wrote {args.out_figure}")
    return 0


def figure(rows, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    scenarios = list(dict.fromkeys(r[0] for r in rows))
    for i, scenario in enumerate(scenarios):
        ax = fig.add_subplot(1, len(scenarios), i + 1)
        for gbit, style in zip(GBITS, ("o-", "s--")):
            pts = [(r[1], r[6]) for r in rows if r[0] == scenario and r[3] == gbit]
            ax.plot(*zip(*pts), style, label=f"{gbit} Gbit/s")
        ax.axhline(0.8, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS, [str(n) for n in RANKS])
        ax.set_ylim(0, 1.02)
        ax.set_title(scenario, fontsize=10)
        ax.set_xlabel("ranks (one core each)")
        if i == 0:
            ax.set_ylabel("efficiency: compute / step")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png")
    mc.atomic_write(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="scaling.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="2 ranks x 1 thread against 1 process x 2 threads")
    t.add_argument("--rounds", type=int, default=6,
                   help="alternating rounds (default: %(default)s)")
    t.add_argument("--steps", type=int, default=60, help="steps a run (default: %(default)s)")
    a = sub.add_parser("allreduce", help="one step's Allreduce, 2 ranks on loopback")
    a.add_argument("--repeat", type=int, default=30, help="timed calls (default: %(default)s)")
    a.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)
    c = sub.add_parser("compute", help="one core's step at the paper's size, per pair")
    c.add_argument("--repeat", type=int, default=5,
                   help="timed steps a size (default: %(default)s)")
    m = sub.add_parser("model", help="efficiency and time to 60M pairs for 8-256 ranks")
    m.add_argument("--per-pair-ms", type=float, required=True, help="from `compute`")
    m.add_argument("--fixed-ms", type=float, required=True, help="from `compute`")
    m.add_argument("--latency-us", type=float, default=LATENCY_US,
                   help="microseconds a message (default: %(default)s)")
    m.add_argument("--out-figure", default=None, help="write the figure here (default: none)")
    return p


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "throughput":
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "allreduce" and args.as_rank:
        return allreduce_rank(args)
    return dict(throughput=throughput_main, allreduce=allreduce_main, compute=compute_main,
                model=model_main)[args.command](args, extra)


if __name__ == "__main__":
    sys.exit(main())
