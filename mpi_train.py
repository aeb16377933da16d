"""Data-parallel training over MPI: N processes train one model, each on its slice of every batch.

    mpiexec -n N python3 mpi_train.py [the training flags]    # or: srun python3 mpi_train.py ...

The global batch is --batch-size, cut into N x --workers shards exactly as one process cuts it
into --workers thread shards; rank r computes shards r*W .. r*W+W-1. Each step sums the ranks'
gradients with one Allreduce on one flat buffer in their own dtype, and a second one of a few
float64 numbers sums the loss terms (in float64, as the threads' sum) and counts stop signals.
Every rank then takes the same Adam step, evaluates the same test set and holds the same run;
only rank 0 prints and writes files. With --workers 1, N = 2 ranks give bit for bit the metrics of
one process with --workers 2 (a + b is b + a in float32); with more ranks the gradients are summed
as a tree rather than in a line, so the last bits may differ.

A rank that fails alone stops the others: an error on one rank, or a rank that waits more than
--mpi-timeout seconds for the rest, aborts the job (MPI_Abort) after one line on stderr. Needs
the optional extra: pip install -e ".[mpi]" (mpi4py and the mpich wheel).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import threading
import time

import numpy as np

import cnn_baseline  # noqa: F401  (registers the CNN: --model cnn trains it over MPI too)
import multimnist_capsnet as mc

STOP_SIGNALS = tuple(int(s) for s in mc.SIGNALS)  # a counter each in the Allreduce buffer
LEAVE_S = 20.0  # how long a rank that failed waits for the others to fail with it


ABORT_GRACE_S = 0.5  # how long a rank's last line has to reach mpiexec before the job is killed


def abort(comm) -> None:
    """MPI_Abort, ABORT_GRACE_S after this rank's last line: mpiexec passes a rank's stderr on
    when it gets to it, and an abort that comes first kills the line with the job (seen under
    load: the whole test suite, not one test alone)."""
    time.sleep(ABORT_GRACE_S)
    comm.Abort(1)


class Watchdog(threading.Thread):
    """Aborts the job once this rank has waited for the others past its deadline: a rank stuck,
    or gone without MPI noticing, must not leave the rest waiting for ever."""

    def __init__(self, comm, say):
        super().__init__(daemon=True)
        self.comm, self.say, self.deadline, self.what = comm, say, None, ""

    def waiting(self, what: str | None, seconds: float = 0.0) -> None:
        """Start a wait of at most `seconds` (what: the wait, in words), or end it (None)."""
        self.what, self.deadline = what, None if what is None else time.monotonic() + seconds

    def run(self):
        while True:
            time.sleep(0.2)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self.say(f"rank {self.comm.rank}: no answer from the other ranks {self.what}; "
                         "aborting the job")
                abort(self.comm)


class Team:
    """This process's part of a data-parallel run (multimnist_capsnet.main's `team`): the slice of
    each batch it computes, and the one Allreduce per step that gives every rank the same step."""

    def __init__(self, comm, timeout: float, say):
        from mpi4py import MPI
        self.in_place, self.sum = MPI.IN_PLACE, MPI.SUM
        self.comm, self.rank, self.size, self.timeout = comm, comm.rank, comm.size, timeout
        self.launcher = ("mpiexec", "-n", str(comm.size))
        self.leaving = comm.Dup()       # the exit barrier's own communicator: no step matches it
        self.signum = 0                 # the stop signal agreed on in the last step (0: none)
        self._flat = np.empty(0)        # the gradients' Allreduce buffer (flat())
        self.steps = 0
        self.watchdog = Watchdog(comm, say)
        self.watchdog.start()

    def rows(self, n: int, workers: int) -> slice:
        """This rank's rows of a batch of n: the `workers` shards, of the N x workers that one
        process with N x workers threads would cut (sharded_loss_and_grads), that are its own."""
        cuts = np.linspace(0, n, self.size * workers + 1).astype(int).tolist()  # Python ints
        return slice(cuts[self.rank * workers], cuts[(self.rank + 1) * workers])

    def step(self, params, batch, cfg: mc.Config, workers, signum: int):
        """(loss, grads, aux) of the whole batch, the same on every rank: this rank's rows
        computed here, weighted by their share of the batch, then summed over the ranks."""
        n = len(batch["labels"])
        rows = self.rows(n, cfg.workers)
        share = (rows.stop - rows.start) / n  # a Python float: NumPy keeps float32 float32
        loss, grads, aux = mc.sharded_loss_and_grads(
            params, {k: v[rows] for k, v in batch.items()}, cfg, workers, grad_scale=share)
        terms = mc.model_for(cfg).loss_terms
        flat = self.flat(grads)
        at = 0
        for g in grads.values():
            flat[at:at + g.size] = g.ravel()
            at += g.size
        scalars = np.array([share * loss, *(share * aux[t] for t in terms),
                            *(float(signum == s) for s in STOP_SIGNALS)])  # (1 + T + S,) float64
        self.watchdog.waiting(f"in step {self.steps + 1} for {self.timeout:g} s", self.timeout)
        self.comm.Allreduce(self.in_place, flat, op=self.sum)
        self.comm.Allreduce(self.in_place, scalars, op=self.sum)
        self.watchdog.waiting(None)
        self.steps += 1
        at = 0
        for g in grads.values():
            g[...] = flat[at:at + g.size].reshape(g.shape)
            at += g.size
        sums, counts = scalars[1:1 + len(terms)], scalars[1 + len(terms):]
        self.signum = next((s for s, c in zip(STOP_SIGNALS, counts) if c > 0), 0)
        return float(scalars[0]), grads, {**dict(zip(terms, map(float, sums))), "out": aux["out"]}

    def flat(self, grads) -> np.ndarray:
        """One buffer for every gradient, in their dtype, made once: (P,)."""
        size = sum(g.size for g in grads.values())
        dtype = next(iter(grads.values())).dtype
        if self._flat.shape != (size,) or self._flat.dtype != dtype:
            self._flat = np.empty(size, dtype)
        return self._flat

    def leave(self, rc: int) -> None:
        """Wait until every rank is leaving too. After a success they all are, once rank 0 has
        written its files; after a failure they are within LEAVE_S when they failed together (a
        bad flag, a divergence), and otherwise one failed alone and the job is aborted."""
        request = self.leaving.Ibarrier()
        wait = self.timeout if rc == 0 else LEAVE_S
        self.watchdog.waiting(f"at the exit for {wait:g} s (exit status {rc})", wait)
        while not request.Test():
            time.sleep(0.01)
        self.watchdog.waiting(None)


def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="mpi_train.py", description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--mpi-timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others in one step (or at the exit) before "
                        "it aborts the job (default: %(default)s)")
    p.add_argument("--model", default="capsnet",
                   help="capsnet, or cnn: the paper's CNN baseline, with its --cnn-* flags "
                        "(default: %(default)s)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = build_parser().parse_known_args(argv)
    if ours.model not in mc.MODELS:
        print(f"mpi_train.py: error: --model must be one of {', '.join(mc.MODELS)}, got "
              f"{ours.model!r}", file=sys.stderr)
        return 2
    model = mc.MODELS[ours.model]
    if "-h" in rest or "--help" in rest:  # its own flags, then the training CLI's
        build_parser().print_help()
        print()
        return mc.main(rest, model, __file__)
    try:
        from mpi4py import MPI
    except ImportError as e:
        print(f"mpi_train.py: error: cannot import mpi4py ({e}); install the extra: "
              "pip install -e \".[mpi]\"", file=sys.stderr)
        return 1
    if not ours.mpi_timeout > 0:
        print(f"mpi_train.py: error: --mpi-timeout must be positive, got {ours.mpi_timeout}",
              file=sys.stderr)
        return 2
    stderr = os.fdopen(os.dup(2), "w", buffering=1)  # the real stderr, for this rank's last word
    say = lambda line: print(line, file=stderr, flush=True)
    team = Team(MPI.COMM_WORLD, ours.mpi_timeout, say)
    captured = io.StringIO()
    quiet = contextlib.ExitStack()
    if team.rank != 0:  # one voice: the others' output is kept, said only if they fail alone
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(captured))
    blas = mc.blas_limiter()  # one BLAS thread a rank: the ranks are the cores' users
    if blas is not None:
        quiet.enter_context(blas.limit(limits=1))
    rc = 1
    try:
        with quiet:
            rc = mc.main(rest, model, __file__, team)
    except SystemExit as e:  # argparse, on every rank alike
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # a bug or a second Ctrl-C on this rank only: stop the job
        say(f"rank {team.rank}: {type(e).__name__}: {e}; aborting the job")
        abort(team.comm)
    if rc != 0 and team.rank != 0 and captured.getvalue().strip():
        team.watchdog.say = lambda line: say(f"{line} (rank {team.rank} said: "
                                             f"{captured.getvalue().strip().splitlines()[-1]})")
    team.leave(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
