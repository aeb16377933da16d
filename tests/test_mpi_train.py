"""mpi_train.py: N ranks train one model. Equal to the threaded run (bit for bit at N = 2, within
float32 rounding at N = 4), checkpoints and resume, a stop signal to mpiexec or to one rank, and a
rank that fails, dies, diverges or stalls: the job ends with one line, never hangs.

Each test starts real processes with mpiexec; without mpi4py and an mpiexec they are skipped."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import multimnist_capsnet as mc
import mpi_train

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
if importlib.util.find_spec("mpi4py") is None:
    WHY = "mpi4py is not installed; pip install -e \".[mpi]\" brings it and mpich"
else:
    WHY = None if MPIEXEC else "no mpiexec on PATH (pip install -e \".[mpi]\" brings one)"
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

TINY = ["--data", "synthetic", "--n-train", "64", "--n-test", "32", "--batch-size", "16",
        "--conv1-channels", "4", "--primary-types", "2", "--decoder-h1", "16", "--decoder-h2", "16",
        "--quiet"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# A driver that changes one rank before it trains: RANK_PATCH is Python run on that rank
DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
from mpi4py import MPI
import multimnist_capsnet as mc
import mpi_train
if MPI.COMM_WORLD.rank == int(os.environ["PATCH_RANK"]):
    exec(os.environ["RANK_PATCH"])
sys.exit(mpi_train.main(sys.argv[1:]))
"""


def terminal_sigint():
    """A background job starts with SIGINT ignored, and its children inherit that; mpiexec must
    see Ctrl-C as a terminal would send it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mpiexec(n, argv, cwd, script=None, timeout=120, **env):
    script = script or str(ROOT / "mpi_train.py")
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, script, *map(str, argv)],
                          cwd=cwd, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=terminal_sigint)


def single(argv, cwd):
    return subprocess.run([sys.executable, str(ROOT / "multimnist_capsnet.py"), *map(str, argv)],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def driver(tmp_path, patch_rank, patch):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT)))
    return str(path), dict(PATCH_RANK=str(patch_rank), RANK_PATCH=patch)


def metrics(path) -> dict:
    doc = json.loads(Path(path).read_text())
    doc.pop("timing")
    doc["config"].pop("workers")
    return doc


def params(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def one_line(stderr: str) -> str:
    """The job's own error line (mpiexec's abort banner around it is allowed); no traceback."""
    assert "Traceback" not in stderr, stderr
    ours = [ln for ln in stderr.splitlines() if ln.startswith(("mpi_train.py", "rank "))]
    assert len(ours) == 1, stderr
    return ours[0]


def test_two_ranks_equal_one_process_with_two_threads_bit_for_bit(tmp_path):
    r = mpiexec(2, TINY + ["--n-epochs", 2, "--workers", 1, "--save", "m.npz", "--metrics-json",
                           "m.json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done in") == 1 and r.stdout.count("epoch 2/2") == 1  # rank 0 alone
    s = single(TINY + ["--n-epochs", 2, "--workers", 2, "--save", "s.npz", "--metrics-json",
                       "s.json"], tmp_path)
    assert s.returncode == 0, s.stderr
    assert metrics(tmp_path / "m.json") == metrics(tmp_path / "s.json")
    a, b = params(tmp_path / "m.npz"), params(tmp_path / "s.npz")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # Adam state too


def test_four_ranks_equal_four_threads_within_float32_rounding(tmp_path):
    """Four gradients summed as a tree instead of a line: the last bits may move, no more."""
    r = mpiexec(4, TINY + ["--n-epochs", 1, "--workers", 1, "--save", "m.npz"], tmp_path)
    assert r.returncode == 0, r.stderr
    s = single(TINY + ["--n-epochs", 1, "--workers", 4, "--save", "s.npz"], tmp_path)
    assert s.returncode == 0, s.stderr
    a, b = params(tmp_path / "m.npz"), params(tmp_path / "s.npz")
    for k in (k for k in a if k.startswith("param.")):
        scale = np.abs(b[k]).max()
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * scale, k  # 4 steps of Adam from 1-ulp sums


def test_cnn_trains_over_mpi_too(tmp_path):
    cnn = ["--model", "cnn", "--cnn-conv1", 4, "--cnn-conv2", 4, "--cnn-fc", 8]
    r = mpiexec(2, TINY + cnn + ["--n-epochs", 1, "--workers", 1, "--metrics-json", "m.json"],
                tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m.json").read_text())["config"]["model"] == "cnn"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    """5 epochs on 2 ranks without a break: what every stopped and resumed run must end as."""
    d = tmp_path_factory.mktemp("unbroken")
    r = mpiexec(2, TINY + ["--n-epochs", 5, "--workers", 1, "--save", "u.npz"], d)
    assert r.returncode == 0, r.stderr
    return d / "u.npz"


@pytest.mark.parametrize("where", ["mpiexec", "one rank"])
def test_a_stop_signal_stops_every_rank_at_one_step_saves_once_and_resumes_exactly(tmp_path,
                                                                                  where, unbroken):
    """SIGINT to mpiexec (which passes it to every rank) or SIGTERM to rank 1 alone: every rank
    stops after the same step, rank 0 saves, and --resume ends where an unbroken run ends."""
    argv = TINY + ["--n-epochs", 40, "--workers", 1, "--save", "c.npz", "--metrics-json", "c.json"]
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, str(ROOT / "mpi_train.py"),
                             *map(str, argv)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "c.npz").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first epoch's checkpoint: training is under way
        if where == "mpiexec":
            proc.send_signal(signal.SIGINT)
            want = 130
        else:
            ranks = subprocess.run(["pgrep", "-f", f"{ROOT / 'mpi_train.py'}"], capture_output=True,
                                   text=True).stdout.split()
            pids = sorted(int(p) for p in ranks if int(p) != proc.pid)
            os.kill(pids[-1], signal.SIGTERM)  # the later-started rank
            want = 143
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == want, err
    assert err.count("continue with:") == 1 and "mpiexec -n 2 python3" in err, err
    run = mc.load_checkpoint(tmp_path / "c.npz")
    assert 0 < run.step < 40 * 4
    r = mpiexec(2, ["--resume", "c.npz", "--save", "c.npz", "--n-epochs", 5, "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = params(tmp_path / "c.npz"), params(unbroken)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_on_another_number_of_ranks_continues(tmp_path):
    """The run's state is the same on every rank: it resumes on any N (each later step is then
    that of N ranks: equal to it within float32 rounding, not bit for bit)."""
    assert mpiexec(2, TINY + ["--n-epochs", 1, "--workers", 1, "--save", "c.npz"],
                   tmp_path).returncode == 0
    r = mpiexec(4, ["--resume", "c.npz", "--save", "c.npz", "--n-epochs", 2, "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert mc.load_checkpoint(tmp_path / "c.npz").epoch == 2


def test_a_divergence_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    script, env = driver(tmp_path, 1, "import numpy as np\n"
                                      "real = mc.loss_and_grads\n"
                                      "def nan(*a, **k):\n"
                                      "    loss, grads, aux = real(*a, **k)\n"
                                      "    grads['dec1_w'][0, 0] = np.nan\n"
                                      "    return loss, grads, aux\n"
                                      "mc.loss_and_grads = nan\n")
    t0 = time.monotonic()
    r = mpiexec(2, TINY + ["--n-epochs", 2, "--workers", 1, "--save", "c.npz"], tmp_path,
                script=script, **env)
    assert r.returncode == 1 and time.monotonic() - t0 < 30
    line = one_line(r.stderr)
    assert "training diverged at step 1" in line and "dec1_w" in line, line


def test_an_error_on_one_rank_aborts_the_job_with_one_line(tmp_path):
    script, env = driver(tmp_path, 1, "real = mc.adam_step\n"
                                      "def boom(*a, **k):\n"
                                      "    if a[2]['t'] == 2:\n"
                                      "        raise MemoryError('out of memory')\n"
                                      "    return real(*a, **k)\n"
                                      "mc.adam_step = boom\n")
    t0 = time.monotonic()
    r = mpiexec(2, TINY + ["--n-epochs", 2, "--workers", 1, "--mpi-timeout", 60], tmp_path,
                script=script, **env)
    assert r.returncode != 0 and time.monotonic() - t0 < 30  # MPI_Abort, not the timeout
    assert "rank 1: MemoryError: out of memory; aborting the job" in one_line(r.stderr)


def test_a_rank_that_stalls_is_found_by_the_timeout(tmp_path):
    script, env = driver(tmp_path, 1, "import time\n"
                                      "real = mc.adam_step\n"
                                      "def stall(*a, **k):\n"
                                      "    if a[2]['t'] == 2:\n"
                                      "        time.sleep(3600)\n"
                                      "    return real(*a, **k)\n"
                                      "mc.adam_step = stall\n")
    t0 = time.monotonic()
    r = mpiexec(2, TINY + ["--n-epochs", 2, "--workers", 1, "--mpi-timeout", 3], tmp_path,
                script=script, **env)
    assert r.returncode != 0 and time.monotonic() - t0 < 40
    assert "rank 0: no answer from the other ranks in step 4" in one_line(r.stderr)


def test_a_rank_that_dies_ends_the_job(tmp_path):
    script, env = driver(tmp_path, 1, "import os, signal\n"
                                      "real = mc.adam_step\n"
                                      "def die(*a, **k):\n"
                                      "    if a[2]['t'] == 2:\n"
                                      "        os.kill(os.getpid(), signal.SIGKILL)\n"
                                      "    return real(*a, **k)\n"
                                      "mc.adam_step = die\n")
    t0 = time.monotonic()
    r = mpiexec(2, TINY + ["--n-epochs", 2, "--workers", 1, "--mpi-timeout", 60], tmp_path,
                script=script, **env)
    assert r.returncode != 0 and time.monotonic() - t0 < 30  # mpiexec ends the others


def test_bad_flags_are_one_line_from_rank_0_and_every_rank_exits(tmp_path):
    r = mpiexec(2, TINY + ["--lr", "-1"], tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert "--lr must be a positive finite number" in r.stderr
    r = mpiexec(2, ["--mpi-timeout", "0"], tmp_path, timeout=60)
    assert r.returncode == 2 and "--mpi-timeout must be positive" in r.stderr


def test_help_leads_with_its_own_flags_and_needs_no_mpi():
    r = subprocess.run([sys.executable, str(ROOT / "mpi_train.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.index("--mpi-timeout") < r.stdout.index("--n-epochs")


def test_a_rank_takes_its_threads_shards_of_the_global_cut():
    class Comm:
        rank, size = 1, 2
    team = mpi_train.Team.__new__(mpi_train.Team)
    team.rank, team.size = Comm.rank, Comm.size
    assert team.rows(32, 1) == slice(16, 32)
    assert team.rows(30, 2) == slice(15, 30)          # shards 2 and 3 of linspace(0, 30, 5)
    assert team.rows(7, 1) == slice(3, 7)
