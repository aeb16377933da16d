"""How fast is one training step of the same CapsNet in PyTorch, eager and under torch.compile?

    python3 bench/torch_step.py --mode eager            # PyTorch eager mode
    python3 bench/torch_step.py --mode compile          # torch.compile (inductor, C++ on CPU)
    python3 bench/torch_step.py --mode eager --check    # first: same weights, same loss and grads?

Times one training step (zero_grad, forward, loss, backward, Adam) of a PyTorch re-implementation
of multimnist_capsnet.py's CapsNet at the shipped size (--conv1-channels 64 --primary-types 16
--digit-bias on top of the defaults; 3,554,736 parameters) on CPU, float32, on a random batch:
x uniform in [0, 1), two different random labels and two random source images per composite. It
prints the median ms of --steps timed steps per round, then the median over rounds. With
--mode compile the loss (forward, and through AOTAutograd the backward) and Adam's step are
compiled; the first step compiles and its seconds are reported apart (inductor keeps what it
compiled on disk, /tmp/torchinductor_$USER: a second run compiles in a fraction of the time).

The network follows the module, whose Config (sizes, loss weights, learning rate) and initial
weights it takes (multimnist_capsnet needs only NumPy): Conv1 9x9 stride 1 + ReLU, PrimaryCaps
9x9 stride 2, squashed 8-D capsules, u_hat from W (I, 10, 16, 8), 3 routing iterations with the
module's default routing_grad='frozen' backward (routing runs on u_hat detached; only the last
s = sum_i c u_hat + bias carries gradient), margin loss, both digits reconstructed by the
decoder (160 -> 256 -> 512 -> 1296) against the two sources, Adam. The convolutions run
channels-last (NHWC in memory: a little faster than NCHW here in eager mode, and the module's
layout, so the primary capsules come out in the module's order without a copy). --check
compares the loss and every gradient with the module's loss_and_grads on the same batch.

torch is an optional comparison tool for docs/speed.md, not a dependency of the project: nothing
in the project or its tests imports it. Install it into a separate venv, CPU build (PyPI's
default Linux wheel pulls in the CUDA libraries, a 5.5 GB venv; a +cpu wheel makes it 1 GB and
needs only a few small pure-Python packages):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install --no-deps torch-*+cpu-*.whl   # or: --index-url .../whl/cpu torch
    /tmp/torchenv/bin/pip install numpy filelock typing-extensions sympy mpmath networkx jinja2 \\
        MarkupSafe fsspec "setuptools>=77"
    /tmp/torchenv/bin/python bench/torch_step.py --mode eager

torch.compile on CPU needs a C++ compiler (gcc). torch is imported after the flags are parsed,
so --help answers in the project's own venv, which lacks it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

torch = F = None  # load_torch() imports them
ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FLAGS = ["--conv1-channels", "64", "--primary-types", "16", "--digit-bias"]


def to_torch(params: dict[str, np.ndarray]) -> dict[str, torch.nn.Parameter]:
    """The module's arrays as torch parameters: conv weights (K, K, C, F) -> (F, C, K, K) stored
    channels-last; every other array keeps its layout."""
    out = {}
    for name, a in params.items():
        t = torch.from_numpy(np.ascontiguousarray(a))
        if name in ("conv1_w", "primary_w"):
            t = t.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        out[name] = torch.nn.Parameter(t.clone())
    return out


def load_torch() -> None:
    """Import torch (and torch.nn.functional as F) into this module, or exit saying how to get
    it: it is no dependency of the project."""
    global torch, F
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit(f"torch_step.py: cannot import torch ({e}); install it into a separate venv, "
                 f"as this script's docstring says, and run the script with that venv's python")


def make_batch(cfg, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch in the module's layout: x (N, H, W, 1) uniform in [0, 1), sources a, b (N, H*W),
    labels (N, 2) two different digits each."""
    px = cfg.canvas ** 2
    first = rng.integers(0, cfg.n_classes, n)
    second = (first + rng.integers(1, cfg.n_classes, n)) % cfg.n_classes
    f32 = lambda shape: rng.random(shape, dtype=np.float32)
    return dict(x=f32((n, cfg.canvas, cfg.canvas, 1)), a=f32((n, px)), b=f32((n, px)),
                labels=np.stack([first, second], 1))


def batch_to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """x (N, H, W, 1) -> an NCHW tensor that is channels-last in memory (the same bytes);
    the two sources stacked as the decoder's targets (2N, H*W); labels (N, 2) int64."""
    x = torch.from_numpy(batch["x"]).permute(0, 3, 1, 2)
    return dict(x=x.contiguous(memory_format=torch.channels_last),
                target=torch.from_numpy(np.concatenate([batch["a"], batch["b"]])),
                labels=torch.from_numpy(batch["labels"]).long())


def squash(s: torch.Tensor) -> torch.Tensor:
    """s * |s| / (1 + |s|^2) along the last axis."""
    n = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return s * (n / (1 + n * n))


def route(uh: torch.Tensor, bias: torch.Tensor, iters: int) -> torch.Tensor:
    """Routing by agreement with the frozen backward. uh (I, N, J, E), bias (J, E) -> v (N, J, E).

    The iterations run on uh detached to find the final coupling coefficients c (I, N, J),
    softmax over J; only the last s = sum_i c uh + bias carries gradient."""
    d, bd = uh.detach(), bias.detach()
    b = torch.zeros(uh.shape[:3], dtype=uh.dtype)
    for _ in range(iters - 1):
        v = squash((b.softmax(-1).unsqueeze(-1) * d).sum(0) + bd)   # (N, J, E)
        b = b + (d * v).sum(-1)                                     # agreement (I, N, J)
    c = b.softmax(-1)
    return squash((c.unsqueeze(-1) * uh).sum(0) + bias)


def encode(p: dict, x: torch.Tensor, cfg) -> torch.Tensor:
    """x (N, 1, H, W) channels-last -> digit capsules v (N, J, E)."""
    h = F.relu(F.conv2d(x, p["conv1_w"], p["conv1_b"]))                        # (N, 64, 28, 28)
    s = F.conv2d(h, p["primary_w"], p["primary_b"], stride=cfg.primary_stride)  # (N, 128, 10, 10)
    n = len(x)
    # NHWC order, as the module reshapes it: capsule i = (y * G + x) * T + type
    u = squash(s.permute(0, 2, 3, 1).reshape(n, cfg.n_primary, cfg.primary_dim))  # (N, I, D)
    w = p["digit_w"]                                                            # (I, J, E, D)
    i_, j, e, d = w.shape
    uh = torch.matmul(u.transpose(0, 1), w.reshape(i_, j * e, d).transpose(1, 2))  # (I, N, J*E)
    return route(uh.view(i_, n, j, e), p["digit_b"], cfg.routing_iters)


def capsnet_loss(p: dict, batch: dict, cfg, margin_scale: float) -> torch.Tensor:
    """Margin loss + recon_weight * the decoder's squared error for both digits, batch means."""
    x, labels = batch["x"], batch["labels"]
    n, k = labels.shape
    v = encode(p, x, cfg)                                                        # (N, J, E)
    t = torch.zeros(n, cfg.n_classes).scatter_(1, labels, 1.0)                   # (N, J)
    length = torch.linalg.vector_norm(v, dim=-1)
    margin = (t * F.relu(0.9 - length) ** 2
              + 0.5 * (1 - t) * F.relu(length - 0.1) ** 2).sum() / n * margin_scale
    mask = F.one_hot(labels.T.reshape(-1), cfg.n_classes).to(v.dtype)           # (K*N, J)
    z = (v.repeat(k, 1, 1) * mask.unsqueeze(-1)).reshape(k * n, -1)              # (K*N, J*E)
    a1 = F.relu(torch.addmm(p["dec1_b"], z, p["dec1_w"]))
    a2 = F.relu(torch.addmm(p["dec2_b"], a1, p["dec2_w"]))
    recon = torch.sigmoid(torch.addmm(p["dec3_b"], a2, p["dec3_w"]))            # (K*N, H*W)
    rec = ((recon - batch["target"]) ** 2).sum() / n
    return margin + cfg.recon_weight * rec


def make_step(params: dict, batch: dict, cfg, margin_scale: float, mode: str):
    """One training step, (zero_grad, forward, loss, backward, Adam), as a function."""
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    loss_fn, opt_step = capsnet_loss, opt.step
    if mode == "compile":
        loss_fn, opt_step = torch.compile(capsnet_loss), torch.compile(opt.step)

    def step():
        opt.zero_grad()
        loss = loss_fn(params, batch, cfg, margin_scale)
        loss.backward()
        opt_step()
        return loss
    return step


def time_steps(step, n: int) -> float:
    """Median seconds of n calls."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def module_config():
    """The module and its Config at the shipped size, float32 (the module needs only NumPy)."""
    sys.path.insert(0, str(ROOT))
    import multimnist_capsnet as m
    p = m.ArgumentParser()
    m.add_training_flags(p)
    return m, dataclasses.replace(m.config_from_args(p.parse_args(SHIPPED_FLAGS)),
                                  dtype="float32")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(m, cfg, n: int, mode: str) -> bool:
    """Same weights (the module's init_params), same batch: the loss (1e-5 relative) and every
    gradient (1e-4 relative, in norm) against the module's loss_and_grads. Prints; True if all
    agree."""
    params = m.init_params(cfg, np.random.default_rng(0))
    batch = make_batch(cfg, n, np.random.default_rng(1))
    loss_np, grads_np, _ = m.loss_and_grads(params, batch, cfg)
    tp = to_torch(params)
    loss_fn = torch.compile(capsnet_loss) if mode == "compile" else capsnet_loss
    loss = loss_fn(tp, batch_to_torch(batch), cfg, m.MARGIN_SCALE[cfg.margin_loss])
    loss.backward()
    err = abs(loss.item() - loss_np) / abs(loss_np)
    print(f"loss: torch {loss.item():.7f}, module {loss_np:.7f}, relative error {err:.1e}")
    ok = err < 1e-5
    for name, g in grads_np.items():
        gt = tp[name].grad
        if name in ("conv1_w", "primary_w"):
            gt = gt.permute(2, 3, 1, 0)                                  # back to (K, K, C, F)
        e = rel_err(gt.numpy(), g)
        print(f"  grad {name:<10} relative error {e:.1e}{'' if e < 1e-4 else '  FAIL'}")
        ok &= e < 1e-4
    print("check passed" if ok else "check FAILED")
    return ok


def main():
    p = argparse.ArgumentParser(prog="torch_step.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("eager", "compile"), default="eager",
                   help="PyTorch eager, or torch.compile of the loss and of Adam's step")
    p.add_argument("--steps", type=int, default=15, help="steps timed per round")
    p.add_argument("--rounds", type=int, default=1, help="rounds of --steps timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=32, help="composites per step")
    p.add_argument("--check", action="store_true",
                   help="compare loss and gradients with the module's (same weights and batch) "
                        "instead of timing")
    args = p.parse_args()
    if min(args.steps, args.rounds, args.threads, args.batch) < 1:
        p.error("--steps, --rounds, --threads and --batch must be positive")
    load_torch()
    torch.set_num_threads(args.threads)
    m, cfg = module_config()
    print(f"torch {torch.__version__}, {args.threads} threads, float32, batch {args.batch}, "
          f"mode {args.mode}, channels-last")
    if args.check:
        sys.exit(0 if check(m, cfg, args.batch, args.mode) else 1)
    params = to_torch(m.init_params(cfg, np.random.default_rng(0)))
    print(f"parameters {sum(t.numel() for t in params.values()):,}")
    batch = batch_to_torch(make_batch(cfg, args.batch, np.random.default_rng(1)))
    step = make_step(params, batch, cfg, m.MARGIN_SCALE[cfg.margin_loss], args.mode)
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    if args.mode == "compile":
        t = time.perf_counter()
        step()  # Adam's second step may compile again
        print(f"compile: first step {first:.1f} s, second {time.perf_counter() - t:.1f} s")
    step()  # warm
    rounds = []
    for r in range(args.rounds):
        rounds.append(time_steps(step, args.steps))
        print(f"round {r + 1}: median of {args.steps} steps {rounds[-1] * 1e3:.1f} ms")
    print(f"median step {statistics.median(rounds) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
