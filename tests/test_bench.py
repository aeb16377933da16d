"""The bench scripts as a user meets them: --help answers without running anything, and the
runners share their helpers through bench/common.py instead of importing one another."""
import ast
import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")


def test_every_bench_script_answers_help_and_runs_nothing():
    def ask(script):
        return subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, timeout=60,
                              capture_output=True, text=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        results = dict(zip(SCRIPTS, ex.map(ask, SCRIPTS)))
    for script, r in results.items():
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
        assert r.stdout.startswith(f"usage: {script.name}"), f"{script.name}: {r.stdout[:200]}"
        assert r.stderr == "", f"{script.name} wrote to stderr: {r.stderr[:200]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_no_bench_script_imports_another_but_common(script):
    names = {p.stem for p in SCRIPTS}
    imported = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported & names <= {"bench_step"}, f"{script.name} imports {imported & names}"


sys.path.insert(0, str(ROOT / "bench"))


def test_run_jobs_stops_a_run_with_one_sigint_when_its_cpu_budget_is_spent(tmp_path):
    """The Table 1 runners' budget is the process's own CPU time: a busy loop gets SIGINT near
    the budget, handles it, and on_done sees its exit status; an idle process is not stopped."""
    import common
    busy = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
            "t = time.time()\n"
            "while time.time() - t < 30: pass\n")
    done = {}
    todo = [([sys.executable, "-c", busy], tmp_path / "busy"),
            ([sys.executable, "-c", "import time; time.sleep(4)"], tmp_path / "idle")]
    t0 = time.perf_counter()
    common.run_jobs(todo, 2, on_done=lambda rc, out: done.setdefault(out.name, rc),
                    cpu_budget=1.0)
    assert done == {"busy": 7, "idle": 0}
    assert time.perf_counter() - t0 < 15


def test_last_third_fits_the_trend_of_the_seeds_mean_curve():
    import mnist
    flat = [[1.0, 0.6, 0.5, 0.4, 0.41, 0.39, 0.4, 0.41, 0.39], [1.1, 0.7, 0.5, 0.4, 0.39, 0.41,
                                                                0.4, 0.39, 0.41]]
    change, se, k = mnist.last_third(flat)
    assert k == 3 and abs(change) < 2 * se + 1e-12
    falling = [[1.0, 0.9, 0.8, 0.7, 0.6, 0.5], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]]
    change, se, k = mnist.last_third(falling)
    assert k == 3 and change == pytest.approx(-0.2) and se == pytest.approx(0, abs=1e-9)


def test_table1_commands_carry_each_rows_decay_spacing_and_folder(tmp_path):
    import mnist
    (caps, _), (cnn, _) = (mnist.t1_command(*mnist.T1_ROWS[i][:2], 3, tmp_path, (300, 150))
                           for i in (0, 4))
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]
    assert flag(caps, "--lr-decay-steps") == "300" and flag(cnn, "--lr-decay-steps") == "150"
    assert cnn.count("--lr-decay-steps") == 1 and flag(cnn, "--model") == "cnn"
    assert Path(ROOT, flag(caps, "--save")).resolve() == (
        tmp_path / "CapsNet-1-routing-iteration-no-reconstruction_s3.npz").resolve()


TINY_FLAGS = ["--conv1-channels", "4", "--primary-types", "2", "--decoder-h1", "16",
              "--decoder-h2", "16", "--batch-size", "4", "--digit-bias"]


def test_vs_floor_times_steps_and_products_in_alternating_pairs(monkeypatch):
    """step_vs_floor alternates its two callables (step first in even pairs), one time each."""
    import bench_step
    order = []
    monkeypatch.setattr(bench_step, "make_step", lambda cfg, n, pool: lambda: order.append("s"))
    monkeypatch.setattr(bench_step, "floor_products",
                        lambda cfg, pool, rng: ([None], lambda picked: order.append("f")))
    cfg = bench_step.m.Config(workers=1)
    s, f, ticks = bench_step.step_vs_floor(cfg, 3)
    assert order == ["s", "f"] + ["s", "f", "f", "s", "s", "f"]  # warm-up, then the pairs
    assert len(s) == len(f) == 3 and (s >= 0).all() and (f >= 0).all()
    assert ticks is None or (len(ticks) == 8 and (ticks >= 0).all())


def test_vs_floor_and_floor_gap_run_at_a_tiny_size():
    """The two commands the speed notes quote, end to end on a tiny network: each prints its
    closing line."""
    for cmd, line in ((["bench_step.py", "--vs-floor", "2"], "step / products, the pairs' ratio"),
                      (["floor_gap.py", "--rounds", "2"], "together")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / cmd[0]), *cmd[1:], *TINY_FLAGS],
                           cwd=ROOT, timeout=120, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert line in r.stdout, r.stdout
