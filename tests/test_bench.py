"""The bench scripts as a user meets them: every script and subcommand answers --help without
running anything, the runners share their helpers through bench/common.py instead of importing one
another, and the timing, A/B, Table 1, routing and sample commands work on tiny inputs."""
import ast
import concurrent.futures
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import multimnist_capsnet as mc

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")
# Every script's subcommands, as the docs name them ("" is the script itself)
COMMANDS = {
    "speed.py": ["", "step", "ab", "floor", "alternatives", "micro", "workers", "data", "torch"],
    "samples.py": ["", "mnist", "examples", "examples write", "examples hand", "examples score",
                   "count", "count train", "count held", "count fuse",
                   "count features", "count score"],
    "experiments.py": ["", "run", "long", "long-split", "summarize", "failures", "routing",
                       "task-stats"],
    "recipe.py": ["", "ab", "long", "score", "summarize", "throughput", "init-lengths", "ship"],
    "table1.py": ["", "calibrate", "run", "long", "score", "summarize"],
    "mnist.py": ["", "summary", "plot", "ship", "steps", "table1"],
    "serve_load.py": [""],
    "scaling.py": ["", "throughput", "allreduce", "compute", "model"],
    "affnist.py": ["", "steps", "train", "report", "score"],
}
# Asks a script for the --help of itself and of every subcommand its help lists, in one process:
# main(argv) must exit at --help; prints {command: [exit code, stdout, stderr]} and whether torch
# was imported
HELP_DRIVER = r"""
import contextlib, io, json, re, runpy, sys
main = runpy.run_path(sys.argv[1])["main"]
out, todo = {}, [[]]
while todo:
    words = todo.pop(0)
    buf, err = io.StringIO(), io.StringIO()
    code = "returned without exiting"
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            main([*words, "--help"])
        except SystemExit as e:
            code = e.code
    text = buf.getvalue()
    out[" ".join(words)] = [code, text, err.getvalue()]
    listed = text.split("positional arguments:", 1)[1] if "positional arguments:" in text else ""
    listed = listed.split("options:", 1)[0]
    todo += [[*words, name] for name in re.findall(r"^    ([a-z][\w-]*)", listed, re.M)]
print(json.dumps(dict(out=out, torch="torch" in sys.modules)))
"""


def test_every_bench_script_and_subcommand_answers_help_and_runs_nothing():
    def ask(script):
        return subprocess.run([sys.executable, "-c", HELP_DRIVER, str(script)], cwd=ROOT,
                              timeout=120, capture_output=True, text=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        results = dict(zip(SCRIPTS, ex.map(ask, SCRIPTS)))
    assert sorted(COMMANDS) == [p.name for p in SCRIPTS], "a new bench script: add it to COMMANDS"
    for script, r in results.items():
        assert r.returncode == 0 and r.stderr == "", f"{script.name}: {r.stderr[-2000:]}"
        doc = json.loads(r.stdout)
        assert not doc["torch"], f"{script.name} imported torch to answer --help"
        assert sorted(doc["out"]) == sorted(COMMANDS[script.name]), script.name
        for words, (code, out, err) in doc["out"].items():
            name = " ".join([script.name, words]).strip()
            assert code == 0 and err == "", f"{name} --help: exit {code}, stderr {err[:200]}"
            assert out.startswith(f"usage: {name} "), f"{name}: {out[:200]}"
            if "training:" in out:  # the forwarded training flags come after the command's own
                assert out.index("options:") < out.index("training:"), name


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_no_bench_script_imports_another_but_common(script):
    names = {p.stem for p in SCRIPTS}
    imported = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported & names == set(), f"{script.name} imports {imported & names}"


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
    """The MNIST rows: each its decay spacing and folder; the CNN row trains through
    cnn_baseline.py, whose parser takes its flags and makes a CNN config."""
    import common
    import mnist
    (caps, _), (cnn, _) = (mnist.t1_command(*mnist.T1_ROWS[i][:3], 3, tmp_path, (300, 150))
                           for i in (0, 4))
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag(caps, "--lr-decay-steps") == "300" and flag(cnn, "--lr-decay-steps") == "150"
    assert cnn.count("--lr-decay-steps") == 1
    assert caps[1] == "multimnist_capsnet.py" and cnn[1] == "cnn_baseline.py"
    assert "--model" not in cnn and (ROOT / cnn[1]).exists()
    assert mc.config_from_args(common.training_parser("cnn").parse_args(cnn[2:])).model == "cnn"
    assert Path(ROOT, flag(caps, "--save")).resolve() == (
        tmp_path / "CapsNet-1-routing-iteration-no-reconstruction_s3.npz").resolve()


def test_multimnist_table1_rows_train_the_cnn_through_its_own_script():
    import common
    import table1
    for name, model, flags in table1.ROWS:
        cmd, _ = table1.command(name, model, flags, 0, 15)
        script = cmd[cmd.index(sys.executable) + 1]
        assert script == common.TRAINERS[model] and "--model" not in cmd, name
        args = common.training_parser(model).parse_args(cmd[cmd.index(script) + 1:])
        assert mc.config_from_args(args).model == model, name


TINY_FLAGS = ["--conv1-channels", "4", "--primary-types", "2", "--decoder-h1", "16",
              "--decoder-h2", "16", "--batch-size", "4", "--digit-bias"]


def test_vs_floor_times_steps_and_products_in_alternating_pairs(monkeypatch):
    """step_vs_floor alternates its two callables (step first in even pairs), one time each."""
    import speed
    order = []
    monkeypatch.setattr(speed, "make_step", lambda cfg, n, pool: lambda: order.append("s"))
    monkeypatch.setattr(speed, "floor_products",
                        lambda cfg, pool, rng: ([None], lambda picked: order.append("f")))
    cfg = speed.m.Config(workers=1)
    s, f, ticks = speed.step_vs_floor(cfg, 3)
    assert order == ["s", "f"] + ["s", "f", "f", "s", "s", "f"]  # warm-up, then the pairs
    assert len(s) == len(f) == 3 and (s >= 0).all() and (f >= 0).all()
    assert ticks is None or (len(ticks) == 8 and (ticks >= 0).all())


def test_vs_floor_and_floor_run_at_a_tiny_size():
    """The two commands the speed notes quote, end to end on a tiny network: each prints its
    closing line."""
    for cmd, line in ((["step", "--vs-floor", "2"], "step / products, the pairs' ratio"),
                      (["floor", "--rounds", "2"], "together")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), *cmd, *TINY_FLAGS],
                           cwd=ROOT, timeout=120, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert line in r.stdout, r.stdout


def test_ab_loads_a_tree_under_its_own_names_with_its_cnn():
    """speed.py ab's side of a revision after the split: a fresh copy of the model module, and a
    CNN module registered in that copy (not in this process's), giving the same steps."""
    import speed
    side = speed.load_tree(ROOT, "copy", "test_ab")
    assert side.m is not mc and side.cnn.mc is side.m and "cnn" in side.m.MODELS
    for model in ("capsnet", "cnn"):
        flags = ["--model", model, *(TINY_FLAGS if model == "capsnet" else
                                     ["--cnn-conv1", "4", "--cnn-conv2", "4", "--cnn-fc", "8",
                                      "--batch-size", "4"])]
        p = speed.build_parser()
        args = p.parse_args(["ab", "HEAD", *flags])
        (ga, pa), (gb, pb) = (speed.three_steps(s, s.m.config_from_args(args))
                              for s in (side, speed.load_side(None, "", None)))
        assert all(np.array_equal(ga[k], gb[k]) for k in gb) and ga.keys() == gb.keys(), model
        assert all(np.array_equal(pa[k], pb[k]) for k in pb), model


def test_ab_against_the_commit_before_the_split():
    """5947e33 held the CNN and the MNIST fetch in the model module: ab still loads and steps
    it beside the working tree, and says whether the two agree bit for bit."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "5947e33^{commit}"],
                      capture_output=True).returncode:
        pytest.skip("no git history here")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "ab", "5947e33",
                        "--pairs", "1", *TINY_FLAGS], cwd=ROOT, timeout=120, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "ratio B/A" in r.stdout
    assert "bit-identical gradients and parameters after 3 steps: " in r.stdout


# ----------------------------------------------------------------------------------------------
# experiments.py routing and failures on a tiny trained checkpoint

TINY_RUN = ["--data", "synthetic", "--n-train", "64", "--n-test", "40", "--batch-size", "16",
            "--n-epochs", "1", "--quiet", "--conv1-channels", "4", "--primary-types", "2",
            "--decoder-h1", "8", "--decoder-h2", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run.npz"
    assert mc.main(TINY_RUN + ["--save", str(path)]) == 0
    return path


def test_routing_table(checkpoint, capsys):
    import experiments
    assert experiments.main(["routing", str(checkpoint), str(checkpoint), "--n-test", "12"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| run.npz |")]
    assert len(rows) == 2 and "| IoU >= 0.8 | 4 | 12 |" in rows[0]
    assert "| 0.1000 / 0.1000 |" in rows[0]                     # iteration 1, both digits
    assert "purity iter 3 (a / b)" in out


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_routing_bad_checkpoint_is_one_line(tmp_path, checkpoint, capsys, kind):
    import experiments
    bad = tmp_path / "bad.npz"
    if kind == "text":
        bad.write_text("not a checkpoint")
    assert experiments.main(["routing", str(checkpoint), str(bad)]) == 1  # before any work
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("experiments.py routing: error:") and "\n" not in err
    assert "bad.npz" in err and cap.out == ""


def test_routing_bad_n_test(checkpoint, capsys):
    import experiments
    with pytest.raises(SystemExit) as e:
        experiments.main(["routing", str(checkpoint), "--n-test", "0"])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_failures_tables(checkpoint, capsys):
    import experiments
    with warnings.catch_warnings():  # a digit no test pair holds: the mean of nothing, nan
        warnings.simplefilter("ignore", RuntimeWarning)
        assert experiments.main(["failures", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "set accuracy 0." in out and "| pairs containing digit |" in out
    assert out.count("\n| ") >= 2 + 5  # the digit table and the five IoU quintiles


# ----------------------------------------------------------------------------------------------
# samples.py, on synthetic digits

@pytest.fixture
def synthetic_mnist(monkeypatch):
    import samples
    digits = mc.synthetic_mnist(np.random.default_rng(0), n_train=16, n_test=40)
    monkeypatch.setattr(samples.mnist_fetch, "load_mnist", lambda data_dir=None: digits)
    return samples


def test_samples_write_labelled_digits_composites_and_examples(synthetic_mnist, tmp_path, capsys):
    samples = synthetic_mnist
    assert samples.main(["mnist", str(tmp_path / "m"), "--n", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert len(names) == 4 and [n.split("_")[0] for n in names] == ["composite"] * 2 + ["digit"] * 2
    assert samples.main(["examples", "write", str(tmp_path / "e")]) == 0
    names = sorted(p.suffix for p in (tmp_path / "e").iterdir())
    assert names == [".jpg", ".png", ".png"]
    assert samples.main(["examples", "hand", str(tmp_path / "h")]) == 0
    assert len(list((tmp_path / "h").iterdir())) == 18
    bold = iio.imread(next((tmp_path / "h").glob("bold_test0_*.png"))) < 128  # black ink
    assert bold.shape[0] == 120 and bold[[0, -1]].any(1).all() and bold[:, [0, -1]].any(0).all()
    assert samples.main(["examples", "score", "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("top-1") == 3 and out.count("set acc") == 2


def test_count_held_scores_a_counter_as_count_train_did(monkeypatch, tmp_path, capsys):
    """count held redraws count train's held-out images (the same options): a tiny counter gets
    count train's threshold and right counts back, and a second file adds the mean's column."""
    import samples
    digits = mc.synthetic_mnist(np.random.default_rng(0), n_train=50040, n_test=8)
    monkeypatch.setattr(samples.mnist_fetch, "load_mnist", lambda data_dir=None: digits)
    plans, draw = [], samples.draw_all  # the polarities each drawing got (a view hides them)
    monkeypatch.setattr(samples, "draw_all", lambda x, *plan: plans.append(plan) or draw(x, *plan))
    opts = ["--n", "12", "--renders", "1", "--held", "6", "--seed", "3"]
    model, log = tmp_path / "c.npz", tmp_path / "train.txt"
    assert samples.main(["count", "train", *opts, "--channels", "2,2", "--fc", "4", "--epochs",
                         "1", "--model", str(model), "--out", str(log)]) == 0
    trained = log.read_text()
    assert "--renders 1 --held 6 --channels 2,2 --fc 4 --epochs 1 --seed 3" in trained
    threshold = trained.split("threshold on the logit: ")[1].split()[0]
    at_threshold = [line.split()[-1] for line in trained.splitlines() if " n     6 " in line]
    other = tmp_path / "d.npz"
    other.write_bytes(model.read_bytes())
    held_plans, plans[:] = plans[-12:], []
    assert samples.main(["count", "held", str(model), str(other), *opts]) == 0
    assert plans == held_plans and len({p[1][0] for p in plans}) == 2
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert [r[1] for r in rows[1:13]] == at_threshold and len(at_threshold) == 12
    assert rows[13][1] == threshold and rows[0][3] == "their mean logit |"
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for bad in ("missing.npz", "junk.npz", "train.txt"):
        plans[:] = []
        assert samples.main(["count", "held", str(tmp_path / bad), *opts]) == 1 and not plans
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad in err and "Traceback" not in err, err


def test_count_train_distort_bends_half_the_fit_digits_and_nothing_else():
    """--distort: with no turn, shear or stretch the warp is the identity; with them about half
    the digits change, their ink's centre kept; each render draws the same digits bent anew, by
    the same drawing plans as without it (so the held-out images are the same too)."""
    import argparse
    import samples
    digits = mc.synthetic_mnist(np.random.default_rng(0), n_train=400, n_test=1)
    x = digits["train_x"]
    flat = samples.distorted(x, np.random.default_rng(1), share=1, turn=0, shear=0, stretch=0)
    assert np.array_equal(flat, x)
    bent = samples.distorted(x, np.random.default_rng(1))
    changed = (bent != x).any((1, 2))
    assert 0.35 < changed.mean() < 0.65
    centre = lambda im: np.array([(im.sum(1 - ax) * np.arange(28)).sum() for ax in (0, 1)]
                                 ) / im.sum()
    assert max(np.abs(centre(b.astype(float)) - centre(a.astype(float))).max()
               for a, b in zip(x[changed], bent[changed])) < 1.5
    pools = {"fit": {"train_x": x, "train_y": digits["train_y"]}}
    draws = {}
    for distort in (False, True):
        args = argparse.Namespace(n=30, renders=2, seed=3, distort=distort)
        draws[distort] = list(samples.fit_plans(pools, args, np.random.default_rng(3)))
    assert [(k, p) for k, _, p in draws[False]] == [(k, p) for k, _, p in draws[True]]
    (_, a, _), (_, b, _) = draws[True][:2]  # the lone digits' two renders
    assert np.array_equal(draws[False][0][1], draws[False][1][1]) and not np.array_equal(a, b)
    assert 0.3 < (a == draws[False][0][1]).all((1, 2)).mean() < 0.7  # half as written


def test_count_score_names_what_predict_would_name(monkeypatch, capsys):
    """auto is scored by the digits predict names: a lone digit counted two but named alone is
    right, two named for one is wrong; count score --mixed reads one group a size, and its
    second table puts the whole of auto - forced in the miscounted images."""
    import samples
    g = dict(count=np.array([2, 2, 1, 1, 2]), found1=[[3], [3], [3], [4], [3]],
             found2=[[3], [3, 1], [3, 5], [4], [3, 5]])
    labels = [np.array([[3]] * 4 + [[5]]), np.array([[3, 5]] * 5)]
    assert samples.named_auto(g, labels[0]).tolist() == [True, False, True, False, False]
    assert samples.named_auto(g, labels[1]).tolist() == [False, False, False, False, True]
    digits = mc.synthetic_mnist(np.random.default_rng(0), n_train=8, n_test=20)
    monkeypatch.setattr(samples.mnist_fetch, "load_mnist", lambda data_dir=None: digits)
    assert samples.main(["count", "score", "--n", "3", "--mixed"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| digits")
            or r.startswith("| composites")]
    assert len(rows) == 20 and all(" | mixed | " in r for r in rows), rows
    for first, gap in zip(rows[:10], rows[10:]):
        n, right, diff = (float(first.split(" | ")[i].split()[0]) for i in (3, 4, 7))
        missed, auto, forced = (int(c) for c in gap.split(" | ")[3:6])
        assert first.split(" | ")[:3] == gap.split(" | ")[:3]
        assert missed == round(n * (1 - right)) and abs((auto - forced) / n - diff) < 1e-3


def test_fit_logistic_reaches_the_minimum():
    """fit_logistic's weights zero the gradient of its objective; moving any weight costs."""
    import samples
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = (x @ [1.5, -2.0, 0.5] + 0.3 + rng.normal(size=300) > 0).astype(float)
    w, b = samples.fit_logistic(x, y, l2=1e-2)
    cost = lambda w, b: (np.mean(np.logaddexp(0, x @ w + b) - y * (x @ w + b))
                         + 1e-2 / 2 * w @ w)
    grad = x.T @ (mc.sigmoid(x @ w + b) - y) / len(y) + 1e-2 * w
    assert np.abs(grad).max() < 1e-10 and abs(np.mean(mc.sigmoid(x @ w + b) - y)) < 1e-10
    assert all(cost(w + d, b) > cost(w, b) for d in 1e-3 * np.eye(3))


def test_count_fuse_writes_the_counter_with_weights_the_rule_uses(monkeypatch, tmp_path, capsys):
    """count fuse on held-out (synthetic) training digits: the report's cross-validated table,
    the file it writes keeps the counter and adds the weights count_scores weighs with both
    shipped models; an unwritable --model is one line before any drawing. count features on the same
    images: a column per feature set, its shipped column fuse's fused one, a PNG of the misses;
    a counter without weights, or an unwritable --figure, is one line; so is any count
    subcommand's unwritable output, before MNIST is read."""
    import samples
    cp = samples.cp
    digits = mc.synthetic_mnist(np.random.default_rng(0), n_train=50040, n_test=8)
    monkeypatch.setattr(samples.mnist_fetch, "load_mnist", lambda data_dir=None: digits)
    out = tmp_path / "fused.npz"
    assert samples.main(["count", "fuse", "--held", "4", "--model", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.count(" | 4 | ") == 12 and "| worst group, pens as written | |" in report
    png = tmp_path / "misses.png"
    assert samples.main(["count", "features", "--held", "4", "--figure", str(png)]) == 0
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines() if " | 4 | " in r]
    assert len(rows) == 12 and all(len(r) == 2 + len(samples.FEATURE_SETS) for r in rows)
    assert [r[3] for r in rows] == [r.split(" | ")[3].strip(" |") for r in report.splitlines()
                                    if " | 4 | " in r]  # count features' shipped is fuse's fused
    assert iio.imread(png).ndim == 3
    fused, plain = cp.load_counter(out), cp.load_counter()
    assert all(np.array_equal(fused[k], plain[k]) for k in plain if not k.startswith("fuse_"))
    assert fused["fuse_w"].shape == (4,) and fused["fuse_b"].shape == (1,)
    models = samples.load_shipped()
    v = cp.both_views([d / 255 for d in digits["test_x"][:3]])
    logits = cp.count_scores(v, plain) + plain["threshold"]
    np.testing.assert_allclose(cp.count_scores(v, fused, *models), cp.count_features(
        logits, v.ones, v.twos, *models) @ fused["fuse_w"] + fused["fuse_b"][0], rtol=1e-5)
    for without in ((), models[:1]):  # without both models, the counter alone
        np.testing.assert_allclose(cp.count_scores(v, fused, *without), cp.count_scores(v, plain))
    assert samples.main(["count", "fuse", "--held", "8", "--model", str(tmp_path / "no" / "f.npz")]
                        ) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    np.savez(tmp_path / "bare.npz", **{k: v for k, v in plain.items() if k[:5] != "fuse_"})
    for argv, says in ((["--counter", str(tmp_path / "bare.npz")], "no count fuse weights"),
                       (["--figure", str(tmp_path / "no" / "m.png")], "does not exist")):
        assert samples.main(["count", "features", "--held", "4", *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err
    loads = []  # an unwritable output is one line before MNIST is even read
    monkeypatch.setattr(samples.mnist_fetch, "load_mnist", lambda data_dir=None: loads.append(1))
    nowhere = str(tmp_path / "no" / "f.npz")
    for argv in (["train", "--model", nowhere], ["score", "--out", nowhere],
                 ["held", str(out), "--out", nowhere]):
        assert samples.main(["count", *argv]) == 1 and loads == []
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{argv[-2]}: directory " in err and "does not exist" in err


# ----------------------------------------------------------------------------------------------
# affnist.py: the protocol chooses from validation alone; the runner on synthetic digits

def val_point(step, error, cpu):
    return dict(step=step, epoch=step / 4, val_error=error, train_seconds=cpu,
                train_cpu_seconds=cpu)


def test_affnist_protocol_stops_at_the_shared_target_and_spends_equal_time():
    import affnist
    caps = [val_point(1, .10, 10), val_point(2, .025, 20), val_point(3, .02, 25),
            val_point(4, .01, 50)]
    cnn = [val_point(1, .20, 5), val_point(2, .05, 10), val_point(3, .03, 30),
           val_point(4, .04, 40)]
    docs = [dict(model="capsnet3", seed=0, points=caps), dict(model="cnn", seed=0, points=cnn)]
    target, budget, stops, equal = affnist.choose(docs)
    assert target == pytest.approx(0.97)  # the CNN's best: the best both reached
    assert [p["step"] for p in stops] == [2, 3]  # each run's first point at 97% or above
    assert budget == 30  # the CNN needed 30 s to get there, the CapsNet 20 s
    assert [p["step"] for p in equal] == [3, 3]  # the best within 30 s; 50 s is over budget


def test_affnist_train_and_report_on_synthetic_digits(monkeypatch, tmp_path, capsys):
    import affnist
    digits = mc.synthetic_mnist(np.random.default_rng(0), n_train=96, n_test=24)
    monkeypatch.setattr(affnist.mnist_fetch, "load_mnist", lambda data_dir=None: digits)
    monkeypatch.setattr(affnist, "N_TRAIN", 64)  # 2 steps an epoch: a point after each
    monkeypatch.setattr(affnist, "N_VAL", 32)
    runs = tmp_path / "runs"
    for model in ("capsnet3", "capsnet1", "cnn"):
        assert affnist.main(["train", model, "--epochs", "1", "--out", str(runs)]) == 0
        doc = affnist.read_run(runs / f"{model}_s0.json")  # written as NAME.json.gz
        assert [p["step"] for p in doc["points"]] == [1, 2]
        assert all((runs / "ckpt" / f"{model}_s0_step{s}.npz").exists() for s in (1, 2))
    args = ["report", "--runs", str(runs), "--out", str(tmp_path / "o"), "--viz",
            str(tmp_path / "v"),
            "--n", "24", "--workers", "1", "--epochs", "1"]
    assert affnist.main(args) == 0
    text = (tmp_path / "o" / "results.md").read_text()  # the folder is made
    assert text.count("| CapsNet, 3 routing iterations | 0 |") == 1 and "| CNN | 0 |" in text
    assert "CapsNet, 3 routing iterations − CNN" in text and "Shared target" in text
    assert {p.name for p in (tmp_path / "v").iterdir()} == {"affnist_robustness.png",
                                                            "affnist_reconstructions.png"}
    preds = json.loads(__import__("gzip").decompress((tmp_path / "o" / "predictions.json.gz")
                                                     .read_bytes()))
    assert len(preds) == 6 and all(len(v["affnist"]) == 24 for v in preds.values())
    capsys.readouterr()
    assert affnist.main(["report", "--runs", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith("affnist.py: error: no runs in")
    assert affnist.main(args[:-1] + ["2"]) == 1  # a 1-epoch run has no second epoch to read
    assert "fewer than --epochs 2" in capsys.readouterr().err
