"""An animated GIF of a CapsNet learning MultiMNIST: trains from scratch and, every K steps (and at
step 0 and at the end), draws the same few test composites, their red/green reconstructions, the
capsule lengths, the loss so far and the accuracy on a small fixed subset of test pairs.

Drawing helpers come from visualize_multimnist_capsnet; digit a is red and digit b green there too.
"""
from __future__ import annotations

import argparse
import sys

import imageio.v3 as iio
import numpy as np

import multimnist_capsnet as mc
import visualize_multimnist_capsnet as viz

FRAME_INCHES = (8, 4.5)  # 800 x 450 px at viz.DPI: small enough that 30 frames stay well under 5 MB


def draw_frame(run: mc.Run, sub: dict, an: dict, acc: list, n_watch: int) -> np.ndarray:
    """One frame as uint8 (H, W, 3). Fixed axes positions and limits (no layout engine), so
    nothing jumps from frame to frame."""
    cfg = run.cfg
    total = cfg.n_epochs * run.steps_per_epoch()
    fig = viz.new_figure(*FRAME_INCHES, layout=None)
    grid = fig.add_gridspec(3, n_watch, left=0.05, right=0.57, top=0.86, bottom=0.07,
                            hspace=0.45, wspace=0.12, height_ratios=[1, 1, 0.7])
    labels = sub["labels"][:n_watch]
    ra = viz.decode(run.eval_params, an["v"][:n_watch], labels[:, 0])
    rb = viz.decode(run.eval_params, an["v"][:n_watch], labels[:, 1])
    for c in range(n_watch):
        ok = an["hits"][c] == 2
        viz.show(fig.add_subplot(grid[0, c]), viz.as_image(sub["x"][c]),
                 f"L:{viz.pair_str(labels[c])} P:{viz.pair_str(an['pred'][c])}",
                 "black" if ok else "darkorange")
        viz.show(fig.add_subplot(grid[1, c]), viz.overlay(ra[c], rb[c]))
        draw_norm_bars(fig.add_subplot(grid[2, c]), an["norms"][c], labels[c], first=c == 0)
    for y, text in ((0.70, "input"), (0.42, "recon from labels"), (0.14, "$|v_k|$")):
        fig.text(0.008, y, text, rotation=90, fontsize=8, va="center")

    loss_ax = fig.add_axes((0.65, 0.57, 0.33, 0.28))
    margin = np.asarray(run.history["margin"])
    if len(margin):
        steps = np.arange(1, len(margin) + 1)
        loss_ax.plot(steps, margin, color="tab:blue", alpha=0.25, lw=0.6)
        loss_ax.plot(steps, viz.smooth(margin, max(1, total // 40)), color="tab:blue", lw=1.4)
    loss_ax.set_xlim(0, total)
    loss_ax.set_ylim(0, 1.4)
    loss_ax.set_title("margin loss (training)", fontsize=8)
    acc_ax = fig.add_axes((0.65, 0.12, 0.33, 0.28))
    if acc:
        s, both, soft = np.array(acc).T
        acc_ax.plot(s, both, "o-", ms=3, label="both digits (set)")
        acc_ax.plot(s, soft, "s--", ms=3, label="at least one")
    acc_ax.axhline(viz.CHANCE, color="gray", ls="--", lw=1, label="chance 1/45")
    acc_ax.set_xlim(0, total)
    acc_ax.set_ylim(0, 1)
    acc_ax.set_xlabel("Adam step", fontsize=8)
    acc_ax.set_title(f"accuracy on {len(sub['x'])} fixed test pairs", fontsize=8)
    acc_ax.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1, 0.06))
    for ax in (loss_ax, acc_ax):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)

    set_acc = acc[-1][1] if acc else float("nan")
    fig.suptitle(f"CapsNet on MultiMNIST   step {run.step}/{total}   epoch "
                 f"{run.step / run.steps_per_epoch():.1f}/{cfg.n_epochs}   "
                 f"test set accuracy {set_acc:.2f} ({len(sub['x'])} pairs)", fontsize=10)
    return viz.figure_rgb(fig)


def draw_norm_bars(ax, norms: np.ndarray, labels, first: bool) -> None:
    """Capsule lengths, the label capsules coloured like their digits."""
    colors = np.array(["0.6"] * len(norms), dtype=object)
    colors[labels[0]], colors[labels[1]] = viz.A_COLOR, viz.B_COLOR
    ax.bar(np.arange(len(norms)), norms, color=list(colors), width=0.8)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(norms)), [str(k) for k in range(len(norms))], fontsize=6)
    ax.tick_params(axis="x", length=0, pad=1)
    ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"] if first else [], fontsize=6)


class Recorder:
    """The on_step callback: a frame every `every` steps; snapshot() for step 0 and the end."""

    def __init__(self, test: dict, every: int, n_watch: int, n_eval: int):
        self.sub = {k: v[:n_eval] for k, v in test.items()}  # first n_eval: the same each time
        self.every, self.n_watch = every, n_watch
        self.frames, self.acc, self.steps = [], [], []

    def __call__(self, run: mc.Run, aux=None) -> None:
        if run.step % self.every == 0:
            self.snapshot(run)

    def snapshot(self, run: mc.Run) -> None:
        if self.steps and self.steps[-1] == run.step:
            return  # the last training step was already a multiple of `every`
        an = viz.analyse(run.eval_params, run.cfg, self.sub)
        self.acc.append((run.step, (an["hits"] == 2).mean(), (an["hits"] > 0).mean()))
        self.frames.append(draw_frame(run, self.sub, an, self.acc, self.n_watch))
        self.steps.append(run.step)


def write_gif(path: str, frames: list, fps: float) -> int:
    """Loop forever, 1000/fps ms a frame (imageio's pillow plugin takes milliseconds; GIF stores
    centiseconds, so round there rather than let pillow truncate 166.7 to 160)."""
    ms = 10 * max(1, round(100 / fps))
    data = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=ms, loop=0)
    try:
        mc.atomic_write(path, data)
    except OSError as e:
        raise mc.CapsNetError(f"cannot write {path}: {e.strerror}") from None
    return len(data)


def positive(kind):
    def parse(s):
        x = kind(s)
        if not x > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return x
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="make_multimnist_capsnet_gif.py",
                                description="Train a CapsNet on MultiMNIST from scratch and "
                                            "animate it into a GIF.")
    o = p.add_argument_group("animation")
    o.add_argument("--out", default="multimnist_capsnet.gif",
                   help="the GIF to write (default: %(default)s)")
    o.add_argument("--snapshot-every", type=positive(int), default=75,
                   help="Adam steps between frames (default: %(default)s)")
    o.add_argument("--fps", type=positive(float), default=6,
                   help="frames per second, at most 100 (default: %(default)s)")
    o.add_argument("--n-watch", type=positive(int), default=4,
                   help="test composites shown in every frame (default: %(default)s)")
    o.add_argument("--n-eval", type=positive(int), default=200,
                   help="test pairs scored at every frame, kept small for speed "
                        "(default: %(default)s)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is drawn only when stderr is a terminal)")
    mc.add_training_flags(p)  # after its own flags: --help leads with what this script adds
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = viz.config_or_error(parser, args)
    if cfg.task == "mnist":
        parser.error("the GIF follows pairs of digits; --task mnist has one per image")
    if why := mc.check_writable(args.out):
        parser.error(why)
    if args.fps > 100:
        parser.error(f"--fps must be at most 100 (GIF frame times are whole centiseconds), "
                     f"got {args.fps:g}")
    if args.n_watch > min(cfg.n_test, args.n_eval):
        parser.error(f"--n-watch {args.n_watch} exceeds the test pairs scored "
                     f"({min(cfg.n_test, args.n_eval)})")

    def work():
        run, mnist, pool, test = viz.prepare_run(args, cfg)
        rec = Recorder(test, args.snapshot_every, args.n_watch, args.n_eval)
        rec.snapshot(run)  # the untrained network
        mc.train(run, mnist, pool, test, on_step=rec, progress=not args.quiet)
        rec.snapshot(run)
        size = write_gif(args.out, rec.frames, args.fps)
        print(f"wrote {args.out}: {len(rec.frames)} frames, {size / 1e6:.2f} MB")
    return viz.run_reporting_errors(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
