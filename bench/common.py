"""What the bench scripts share, in one place: the two tasks' names, scoring a checkpoint on fresh
test pairs, the training command of each model, running plain CLI calls a few at a time, timing
one training step, and the recipe of the shipped model.

Every bench script may import this module; none of them imports another.
"""
import dataclasses
import gzip
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cnn_baseline as cb  # noqa: E402  (registers the CNN: Config(model="cnn") validates)
import multimnist_capsnet as mc  # noqa: E402

# The two MultiMNIST tasks (docs/data.md#the-two-tasks), named so in every output, table and figure
IOU_TASK = "the IoU >= 0.8 task"   # the default: bounding boxes overlap with IoU >= 0.8, max merge
PAPER_TASK = "the paper's task"    # Sabour et al.: free shifts of up to 4 px, added and clipped
TASKS = {PAPER_TASK: dict(min_iou=0.0, overlay="clip-sum"),
         IOU_TASK: dict(min_iou=0.8, overlay="max")}


def test_metrics(params, cfg, mnist, n_test, workers) -> dict:
    """set/soft/top-1 accuracy on n_test fresh test pairs of each task (seed cfg.seed)."""
    if cfg.task != "multimnist":
        raise mc.CapsNetError(f"test pairs of the MultiMNIST tasks need a MultiMNIST model, "
                              f"not a {cfg.task} one")
    out = {}
    for task, kw in TASKS.items():
        tcfg = dataclasses.replace(cfg, n_test=n_test, resample=True, **kw)
        _, test = mc.make_data(tcfg, mnist)
        out[task] = mc.evaluate(params, tcfg, test, workers)
    return out


def slug(name: str) -> str:
    """A run's name as a file name: runs/table1/ and runs/recipe/ use it."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_file(path) -> Path | None:
    """The file that stores the run whose metrics JSON is `path` (NAME.json, as --metrics-json
    names it): NAME.json itself, else its compact form NAME.json.gz (runs/README.md); either name
    may be given. None when neither exists."""
    p = Path(path)
    other = p.with_name(p.name[:-3]) if p.name.endswith(".gz") else p.with_name(p.name + ".gz")
    return next((q for q in (p, other) if q.exists()), None)


def read_run(path) -> dict:
    """A run's metrics JSON, stored plain (NAME.json) or compact (NAME.json.gz): see run_file."""
    q = run_file(path)
    if q is None:
        raise FileNotFoundError(f"no run at {path} (nor its .gz)")
    if q.name.endswith(".gz"):
        with gzip.open(q, "rt", encoding="utf-8") as f:
            return json.load(f)
    return json.loads(q.read_text())


def compress_run(path) -> Path:
    """Store a run's metrics JSON in its compact form NAME.json.gz and remove NAME.json: the text
    write_metrics writes (one top-level key per line; the per-step losses at its 5 significant
    digits, which files written before that rule get here too), gzip level 9 with mtime 0, so the
    same run always gives the same bytes. Nothing a summary or figure reads changes."""
    src = run_file(path)
    doc = read_run(src)
    history = doc.get("history") or {}
    for k, v in history.items():
        if k != "epochs":  # per-step lists: the per-epoch metrics stay whole
            history[k] = [float(f"{x:.5g}") for x in v]
    text = "{\n" + ",\n".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}"
                              for k, v in doc.items()) + "\n}\n"
    dst = src if src.name.endswith(".gz") else src.with_name(src.name + ".gz")
    mc.atomic_write(dst, gzip.compress(text.encode(), compresslevel=9, mtime=0))
    if dst != src:
        src.unlink()
    return dst


# The program that trains each model: the CNN's --cnn-* flags exist only on cnn_baseline.py's
TRAINERS = {"capsnet": "multimnist_capsnet.py", "cnn": "cnn_baseline.py"}


def train_command(model: str, *flags) -> list[str]:
    """[this Python, the script that trains model (relative to ROOT, the runners' cwd), *flags]."""
    return [sys.executable, TRAINERS[model], *flags]


def training_parser(model: str = "capsnet"):
    """The training CLI's parser of model, as its own program builds it (the CNN's: with its
    --cnn-* flags)."""
    return mc.build_parser(cb.CNN if model == "cnn" else None, str(ROOT / TRAINERS[model]))


ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # two runs side by side: one core each


def shown(cmd, one_thread=True) -> str:
    """cmd as a shell line, with this interpreter spelled python3."""
    words = ["python3" if c == sys.executable else c for c in cmd]
    return ("OPENBLAS_NUM_THREADS=1 " if one_thread else "") + " ".join(words)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process pid so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_model() -> str:
    """The CPU's model name and number (Linux; virtual machines often name only the vendor's
    line), else the machine type."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first core's lines
        info = dict(ln.split(":", 1) for ln in first.splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (model {info.get('model', '?')})"
    except (OSError, KeyError):
        return platform.machine()


def commit() -> str:
    """The checkout's short commit, with + when the working tree has changes."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                                    text=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "-uno")
                                                      else "")
    except OSError:  # no git
        return "unknown"


def run_jobs(todo, jobs: int, env=ENV, on_done=None, cpu_budget=None) -> None:
    """Run the (cmd, out) pairs of todo, jobs at a time, each logging to out's .log beside it;
    on_done(returncode, out) after each. With cpu_budget (seconds), each process gets one SIGINT
    when its own CPU time reaches it: a budget that other work on the machine cannot eat into."""
    running, signalled = [], set()
    while todo or running:
        while todo and len(running) < jobs:
            cmd, out = todo.pop(0)
            print("$ " + shown(cmd, one_thread=env is ENV), flush=True)
            log = open(out.with_suffix(".log"), "w")
            running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT), out))
        time.sleep(2)
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                print(f"  exit {proc.returncode}: {out.name}", flush=True)
                if on_done is not None:
                    on_done(proc.returncode, out)
            elif (cpu_budget is not None and proc.pid not in signalled
                  and cpu_seconds(proc.pid) >= cpu_budget):
                proc.send_signal(signal.SIGINT)  # the run finishes its step and saves
                signalled.add(proc.pid)


def difference(x: np.ndarray, y: np.ndarray) -> str:
    """mean(x) - mean(y), ± the s.e. of two independent means when both have two seeds or more."""
    d = f"{x.mean() - y.mean():+.3f}"
    if len(x) > 1 and len(y) > 1:
        d += f" ± {np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y)):.3f}"
    return d


def score_missing(out_dir: Path, score) -> None:
    """score(stem) for every checkpoint in out_dir whose .eval.json is missing (a run whose
    scoring was cut short, or that finished outside the runner)."""
    for ckpt in sorted(out_dir.glob("*.npz")):
        if not ckpt.with_suffix(".eval.json").exists():
            print(f"scoring {ckpt.name}", flush=True)
            score(ckpt.with_suffix(""))


# ----------------------------------------------------------------------------------------------
# One training step, timed: speed.py, recipe.py and table1.py

def median_time(f, repeat: int, warmup: bool = True) -> float:
    """Median seconds of `repeat` calls of f, after one untimed call (caches, BLAS buffers)."""
    if warmup:
        f()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def training_batch(cfg, n: int, rng: np.random.Generator, m=mc, cnn=cb) -> dict[str, np.ndarray]:
    """n composites (--task mnist: single digits) of synthetic glyphs (no MNIST needed) as one
    batch in cfg's dtype, drawn with model module m (and its CNN module cnn: None where m still
    holds the CNN, as before the split). Composites are drawn without the IoU demand: random
    glyphs cannot always reach IoU 0.8 (one failed at Conv1 8), and a step's time does not depend
    on the pixels."""
    mnist = m.synthetic_mnist(rng, n_train=max(n, 64), n_test=10)
    if cfg.n_labels == 1:  # single shifted digits, and the CNN's dropout mask as train() draws it
        pairs = m.shift_digits(mnist["train_x"][:n], mnist["train_y"][:n], rng, cfg.max_shift,
                               cfg.canvas)
    else:
        pairs = m.make_pairs(mnist["train_x"], mnist["train_y"], n, rng, min_iou=0.0,
                             overlay=cfg.overlay)
    batch = m.batch_arrays(pairs, np.arange(n), cfg.np_dtype)
    dropout = cnn if cnn is not None else m
    if dropout.uses_dropout(cfg):
        batch["keep"] = dropout.dropout_mask(rng, (n, cfg.cnn_fc2), cfg.cnn_dropout, cfg.np_dtype)
    return batch


def make_step(cfg, n: int, workers=None, m=mc, cnn=cb):
    """One training step as train() runs it: (sharded) forward + backward, the divergence guard,
    then Adam; built with model module m (and CNN module cnn, as training_batch)."""
    m.keep_freed_memory()  # as train() does
    rng = np.random.default_rng(0)
    params = m.init_params(cfg, rng)
    run = m.Run(cfg, params, m.adam_init(params), rng.bit_generator.state)
    batch = training_batch(cfg, n, rng, m, cnn)

    def step():
        loss, grads, aux = m.sharded_loss_and_grads(run.params, batch, cfg, workers)
        m.check_finite(run, loss, aux, grads, cfg.lr)
        m.adam_step(run.params, grads, run.adam, cfg.lr, workers=workers)
    return step


# ----------------------------------------------------------------------------------------------
# The recipe of the shipped model: recipe.py measures it (ab, long) and ships it (ship)

# The previous shipped model's recipe (runs/ship/paper-task-36-epochs_s0.json): the paper's task
# with fresh pairs, Conv1 64, 16 capsule types, recon weight 0.005, lr decay 0.96 per 500 steps,
# batch 32.
BASE = ["--min-iou", "0", "--overlay", "clip-sum", "--resample", "--n-train", "30000",
        "--n-test", "1000", "--n-epochs", "1000", "--conv1-channels", "64", "--primary-types", "16",
        "--recon-weight", "0.005", "--lr-decay", "0.96", "--lr-decay-steps", "500", "--ema", "0.999"]
# The long run's recipe on top of BASE, from the A/B results (docs/recipe.md): digit-capsule
# biases won on both seeds; warm-up + cosine did not beat the exponential decay, so it stays, but
# its step is doubled for a run of about 10x the A/B's steps: 0.96 every 500 steps would put the
# rate under 1e-4 after 28,000 of its ~49,000 steps (ending at 0.02x), and the curve's flattening
# would then say more about the schedule than about what longer training reaches.
LONG = ["--n-train", "60000", "--n-test", "10000", "--digit-bias", "--bias-init", "0.1",
        "--lr-decay-steps", "1000"]
# Long runs that change one thing in LONG, each against the plain long run at equal wall time:
# "truncated init" is the fourth A/B round's winner (one seed); "decay 500" is the A/B's
# schedule, which LONG doubled without measuring it at this length.
VARIANTS = {"": [], "truncated init": ["--init", "truncated"],
            "decay 500": ["--lr-decay-steps", "500"]}
SHIPPED = ""  # the variant whose 120-minute run is the shipped model (recipe.py ship)
