"""Figures for the NumPy CapsNet on MultiMNIST: trains a run (or loads a checkpoint) and draws

  training_curves.png      margin / reconstruction loss per step, test accuracies per epoch
  reconstructions.png      composite | source a | recon from capsule a | source b | recon from b
  capsule_activations.png  capsule lengths |v_k| of test composites, and the hit breakdown
  multimnist_examples.png  composites, their two source digits, shifts and bounding-box IoU
  paper_overlay.png        the paper's Figure 5: inputs above red/green reconstructions
  capsule_dimensions.png   the paper's Figure 4: one capsule's 16 dimensions perturbed, decoded

Digit a is red and digit b is green in every figure. Matplotlib's object API only (no pyplot),
rendered by Agg, every file written atomically.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import multimnist_capsnet as mc

A_COLOR, B_COLOR = "#d62728", "#2ca02c"          # digit a red, digit b green, in lines and boxes
A_RGB, B_RGB = np.array([1.0, 0.1, 0.1]), np.array([0.1, 1.0, 0.1])  # the same, for pixels
DPI = 100
CHANCE = 1 / 45                                  # a random pair of distinct classes is right 1/45


# ----------------------------------------------------------------------------------------------
# Drawing helpers (the GIF script uses these too)

def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    try:
        mc.atomic_write(path, buf.getvalue())
    except OSError as e:
        raise mc.CapsNetError(f"cannot write {path}: {e.strerror}") from None


def figure_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as a uint8 (H, W, 3) array, for GIF frames."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def as_image(x: np.ndarray) -> np.ndarray:
    """A uint8 or [0, 1] float image, 2-D or flat square (H*W,), as 2-D float in [0, 1]."""
    x = np.asarray(x)
    x = x / 255 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.ndim == 1:
        s = int(round(np.sqrt(x.size)))
        x = x.reshape(s, s)
    return np.clip(x, 0, 1)


def tint(x, rgb) -> np.ndarray:
    """Grey image as the given colour on black, so a digit keeps its colour alone or overlaid."""
    return as_image(x)[..., None] * rgb


def overlay(xa, xb) -> np.ndarray:
    """Digit a in the red channel, digit b in green: overlap shows yellow (the paper's Figure 5)."""
    return np.clip(tint(xa, A_RGB) + tint(xb, B_RGB), 0, 1)


def show(ax, img, title: str | None = None, color="black", fontsize=8) -> None:
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize, color=color, pad=2)


def pair_str(p) -> str:
    return f"({p[0]},{p[1]})"


# ----------------------------------------------------------------------------------------------
# What the trained network says about test composites

def analyse(params, cfg: mc.Config, pairs: dict) -> dict:
    """Capsules, lengths and the top-2 prediction of every composite, computed once.

    pred is ordered to line up with labels (a label that was found stays in its column) so that
    'prediction a' is drawn red next to 'label a' whenever the network got digit a.
    """
    v = mc.predict(params, cfg, pairs["x"])
    norms = np.linalg.norm(v, axis=2)                                   # (N, J)
    top2 = np.argsort(-norms, axis=1, kind="stable")[:, :2]
    labels = pairs["labels"]
    swap = (top2[:, 0] == labels[:, 1]) | (top2[:, 1] == labels[:, 0])
    pred = np.where(swap[:, None], top2[:, ::-1], top2)
    hits = (top2[:, :, None] == labels[:, None, :]).any(2)              # (N, 2)
    return dict(v=v, norms=norms, top2=top2, pred=pred, hits=hits.sum(1),
                top1=hits[:, 0])


def decode(params, v, digits) -> np.ndarray:
    """Reconstructions (N, H*W) from capsule digits[n] of v[n] alone."""
    return mc.reconstruct(params, v, np.asarray(digits, np.int64))


def pick(an: dict, n: int, n_wrong: int) -> np.ndarray:
    """n test indices, n_wrong of them (when there are any) misclassified: not only the best."""
    wrong, right = np.flatnonzero(an["hits"] < 2), np.flatnonzero(an["hits"] == 2)
    right = right[:n - min(n_wrong, len(wrong))]
    return np.concatenate([right, wrong[:n - len(right)]])


# ----------------------------------------------------------------------------------------------
# The figures

def smooth(y: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average; the first w-1 points average what exists so far."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), w)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def plot_loss(ax, history: dict, key: str, epoch_key: str, color: str, ylabel: str) -> None:
    y = np.asarray(history[key], np.float64)
    steps = np.arange(1, len(y) + 1)
    ax.plot(steps, y, color=color, alpha=0.2, lw=0.7, label="per step")
    ax.plot(steps, smooth(y, max(1, len(y) // 40)), color=color, lw=1.6, label="smoothed")
    ep = history["epochs"]
    if ep:  # a segment over the steps each mean covers
        ends = np.array([m["step"] for m in ep])
        ax.hlines([m[epoch_key] for m in ep], np.insert(ends[:-1], 0, 0), ends, color="black",
                  lw=1.4, label="epoch mean")
    ax.set_xlabel("Adam step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def fig_training_curves(run: mc.Run) -> Figure:
    fig = new_figure(13, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    plot_loss(ax1, run.history, "margin", "train_margin", "tab:blue", "margin loss")
    ax1.set_title("Margin loss (training batches)")
    plot_loss(ax2, run.history, "recon", "train_recon", "tab:purple",
              "sum of squared errors, both digits")
    ax2.set_yscale("log")  # the first steps drop 5x; log keeps the slow tail readable
    ax2.set_title("Reconstruction loss (unweighted)")
    ep = run.history["epochs"]
    x = [m["epoch"] for m in ep]
    for key, name, style in (("set_acc", "both digits (set)", "o-"),
                             ("soft_acc", "at least one (soft)", "s--"),
                             ("top1", "top-1 is a label", "^:")):
        y = [m[key] for m in ep]
        line, = ax3.plot(x, y, style, label=name)
        if ep:
            ax3.annotate(f"{y[-1]:.3f}", (x[-1], y[-1]), xytext=(0, 6), textcoords="offset points",
                         ha="center", fontsize=8, color=line.get_color())
    ax3.axhline(CHANCE, color="gray", ls="--", lw=1, label="chance 1/45 (set)")
    ax3.set_ylim(0, 1.05)
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("accuracy")
    ax3.set_title(f"Test accuracy ({run.cfg.n_test} composites)")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 0.06))
    if ep:
        ax3.set_xticks(x if len(x) <= 12 else x[:: len(x) // 12 + 1])
    return fig


def fig_reconstructions(params, test: dict, an: dict, idx: np.ndarray) -> Figure:
    v, labels = an["v"][idx], test["labels"][idx]
    ra, rb = decode(params, v, labels[:, 0]), decode(params, v, labels[:, 1])
    cols = ("composite", "source a", "recon from capsule a", "source b", "recon from capsule b")
    fig = new_figure(7.2, 1.35 * len(idx) + 0.6)
    axes = fig.subplots(len(idx), 5, squeeze=False)
    for r, n in enumerate(idx):
        la, lb = labels[r]
        ok = an["hits"][n] == 2
        row = ((as_image(test["x"][n]), f"L:{pair_str(labels[r])} P:{pair_str(an['pred'][n])}",
                "black" if ok else "darkorange"),
               (tint(test["a"][n], A_RGB), f"a = {la}", A_COLOR),
               (tint(ra[r], A_RGB), f"$|v_{la}|$ = {an['norms'][n, la]:.2f}", A_COLOR),
               (tint(test["b"][n], B_RGB), f"b = {lb}", B_COLOR),
               (tint(rb[r], B_RGB), f"$|v_{lb}|$ = {an['norms'][n, lb]:.2f}", B_COLOR))
        for c, (img, title, color) in enumerate(row):
            show(axes[r, c], img, title, color)
    for c, name in enumerate(cols):
        axes[0, c].set_title(f"{name}\n{axes[0, c].get_title()}", fontsize=8,
                             color=axes[0, c].title.get_color(), pad=2)
    fig.suptitle("Each digit reconstructed from its own capsule alone (L: labels, P: predicted; "
                 "orange: wrong)", fontsize=9)
    return fig


def fig_capsule_activations(test: dict, an: dict, n_rows: int = 12) -> Figure:
    n_rows = min(n_rows, len(test["x"]))
    norms, labels = an["norms"][:n_rows], test["labels"][:n_rows]
    fig = new_figure(11, 0.42 * n_rows + 1.4)
    heat, bars = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[11, 6]))
    im = heat.imshow(norms, cmap="viridis", vmin=0, vmax=1)
    # the inputs as one extra column left of capsule 0, so each sits on its own row
    heat.imshow(np.concatenate([as_image(x) for x in test["x"][:n_rows]]), cmap="gray",
                extent=(-1.7, -0.7, n_rows - 0.5, -0.5), interpolation="nearest")
    heat.set_xlim(-1.75, 9.5)
    for r in range(n_rows):
        for k, color in zip(labels[r], (A_COLOR, B_COLOR)):
            heat.add_patch(Rectangle((k - 0.5, r - 0.5), 1, 1, fill=False, ec=color, lw=2.2))
        for k in an["top2"][r]:  # the two longest capsules: the prediction
            heat.plot(k, r, "o", color="white", ms=3)
    heat.set_xticks(range(-1, 10), ["input"] + [str(k) for k in range(10)])
    heat.set_yticks(range(n_rows), [f"L:{pair_str(l)}" for l in labels], fontsize=8)
    heat.set_xlabel("digit capsule k")
    heat.set_title("capsule length $|v_k|$ (boxes: label a red, label b green; dots: top-2)",
                   fontsize=9)
    fig.colorbar(im, ax=heat, fraction=0.04, pad=0.02, label="$|v_k|$")
    draw_breakdown(bars, an)
    return fig


def draw_breakdown(ax, an: dict) -> None:
    hits = an["hits"]
    rows = (("both right\n(set accuracy)", (hits == 2).mean(), "tab:green"),
            ("exactly one right", (hits == 1).mean(), "tab:orange"),
            ("none right", (hits == 0).mean(), "tab:gray"),
            ("top-1 is a label", an["top1"].mean(), "tab:blue"))
    y = np.array([4.2, 3.2, 2.2, 0.8])  # a gap sets top-1 apart: it is not part of the split
    ax.barh(y, [r[1] for r in rows], color=[r[2] for r in rows], height=0.7)
    for yi, (_, frac, _) in zip(y, rows):
        inside = frac > 0.8
        ax.text(frac - 0.02 if inside else frac + 0.02, yi, f"{100 * frac:.1f}%", va="center",
                ha="right" if inside else "left", fontsize=9, color="white" if inside else "black")
    ax.axvline(CHANCE, color="gray", ls="--", lw=1, label="chance 1/45 (set)")
    ax.set_yticks(y, [r[0] for r in rows], fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of test composites")
    ax.set_title(f"top-2 capsules vs labels\n(all {len(hits)} test composites)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")


def fig_examples(test: dict, n: int = 8) -> Figure:
    n = min(n, len(test["x"]))
    fig = new_figure(1.25 * n + 0.4, 4.6)
    axes = fig.subplots(3, n, squeeze=False)
    for c in range(n):
        la, lb = test["labels"][c]
        dya, dxa, dyb, dxb = test["shifts"][c]
        show(axes[0, c], as_image(test["x"][c]), f"{la} + {lb}\nIoU {test['iou'][c]:.2f}")
        for src, color in ((test["a"][c], A_COLOR), (test["b"][c], B_COLOR)):
            t, b, l, r = mc.bounding_boxes(src[None])[0]
            axes[0, c].add_patch(Rectangle((l - 0.5, t - 0.5), r - l + 1, b - t + 1, fill=False,
                                           ec=color, lw=1.2))
        show(axes[1, c], tint(test["a"][c], A_RGB), f"a = {la}\nshift ({dya:+d},{dxa:+d})",
             A_COLOR)
        show(axes[2, c], tint(test["b"][c], B_RGB), f"b = {lb}\nshift ({dyb:+d},{dxb:+d})",
             B_COLOR)
    for r, name in enumerate(("composite", "digit a", "digit b")):
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle("MultiMNIST test composites, bounding boxes and sources (shift = (dy, dx) in px)",
                 fontsize=9)
    return fig


def fig_paper_overlay(params, test: dict, an: dict, n_right: int = 5, n_wrong: int = 3) -> Figure:
    """Figure 5: correct cases reconstructed from their labels (R = L); each failure twice, from
    the labels and from the prediction (R = P), as the paper shows its failures."""
    right = np.flatnonzero(an["hits"] == 2)[:n_right]
    wrong = np.flatnonzero(an["hits"] < 2)[:n_wrong]
    cols = [(n, test["labels"][n]) for n in right]
    for n in wrong:
        cols += [(n, test["labels"][n]), (n, an["pred"][n])]
    idx = np.array([n for n, _ in cols])
    digits = np.array([d for _, d in cols])
    ra, rb = decode(params, an["v"][idx], digits[:, 0]), decode(params, an["v"][idx], digits[:, 1])
    fig = new_figure(1.15 * len(cols) + 0.3, 3.4)
    axes = fig.subplots(2, len(cols), squeeze=False)
    for c, n in enumerate(idx):
        ok = an["hits"][n] == 2
        show(axes[0, c], as_image(test["x"][n]), f"L:{pair_str(test['labels'][n])}\n"
             f"P:{pair_str(an['pred'][n])}", "black" if ok else "darkorange")
        show(axes[1, c], overlay(ra[c], rb[c]), f"R:{pair_str(digits[c])}\n"
             + ("correct" if ok else "wrong, R=L" if (digits[c] == test["labels"][n]).all()
                else "wrong, R=P"), "black" if ok else "darkorange")
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("reconstruction", fontsize=9)
    fig.suptitle("Paper Fig. 5 style: L labels, P predicted (top-2), R capsules decoded; "
                 "first of R red, second green, overlap yellow", fontsize=9)
    return fig


def fig_capsule_dimensions(params, test: dict, an: dict, n: int | None = None) -> Figure:
    """Figure 4: perturb each dimension of digit a's capsule by -0.25..0.25 and decode."""
    right = np.flatnonzero(an["hits"] == 2)
    n = int(right[0] if len(right) else 0) if n is None else n
    k = int(test["labels"][n, 0])
    deltas = np.round(np.linspace(-0.25, 0.25, 11), 2) + 0.0          # + 0.0: no "-0.00"
    dims = an["v"].shape[2]
    v = np.repeat(an["v"][n:n + 1], dims * len(deltas), axis=0)        # (E*11, J, E)
    v[np.arange(len(v)), k, np.repeat(np.arange(dims), len(deltas))] += np.tile(deltas, dims)
    s = test["x"].shape[1]
    rec = decode(params, v, np.full(len(v), k)).reshape(dims, len(deltas), s, s)
    rows, cols = crop_box(rec.max((0, 1)))                             # shared crop: cells bigger
    rec = rec[:, :, rows, cols]
    h, w = rec.shape[2:]
    mosaic = rec.transpose(0, 2, 1, 3).reshape(dims * h, len(deltas) * w)
    fig = new_figure(9, 11)
    left, right_ax = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.4, 7]))
    show(left, as_image(test["x"][n]), f"input, L:{pair_str(test['labels'][n])}\n"
         f"decoding capsule {k}", A_COLOR)
    right_ax.imshow(tint(mosaic, A_RGB),
                    interpolation="nearest", extent=(-0.5, len(deltas) - 0.5, dims - 0.5, -0.5),
                    aspect=h / w)  # cells keep the pixels square
    right_ax.hlines(np.arange(1, dims) - 0.5, -0.5, len(deltas) - 0.5, color="0.35", lw=0.6)
    right_ax.vlines(np.arange(1, len(deltas)) - 0.5, -0.5, dims - 0.5, color="0.35", lw=0.6)
    right_ax.set_xticks(range(len(deltas)), [f"{d:+.2f}" for d in deltas], fontsize=8)
    right_ax.set_yticks(range(dims), [f"dim {d + 1}" for d in range(dims)], fontsize=8)
    right_ax.set_xlabel("value added to one dimension of the capsule")
    right_ax.set_title(f"Paper Fig. 4 style: each of the {dims} dimensions of capsule {k} "
                       f"perturbed, decoded", fontsize=9)
    return fig


def crop_box(img: np.ndarray, thresh: float = 0.05, margin: int = 2) -> tuple[slice, slice]:
    """Rows and columns around where img exceeds thresh (the whole image when nowhere)."""
    rs, cs = np.flatnonzero(img.max(1) > thresh), np.flatnonzero(img.max(0) > thresh)
    if len(rs) == 0 or len(cs) == 0:
        return slice(None), slice(None)
    clip = lambda lo, hi: slice(max(lo - margin, 0), min(hi + margin + 1, len(img)))
    return clip(rs[0], rs[-1]), clip(cs[0], cs[-1])


def write_figures(run: mc.Run, test: dict, outdir: Path) -> list[Path]:
    an = analyse(run.params, run.cfg, test)
    figs = {
        "training_curves.png": fig_training_curves(run),
        "reconstructions.png": fig_reconstructions(run.params, test, an, pick(an, 8, 3)),
        "capsule_activations.png": fig_capsule_activations(test, an),
        "multimnist_examples.png": fig_examples(test),
        "paper_overlay.png": fig_paper_overlay(run.params, test, an),
        "capsule_dimensions.png": fig_capsule_dimensions(run.params, test, an),
    }
    for name, fig in figs.items():
        save_png(fig, outdir / name)
    return [outdir / name for name in figs]


# ----------------------------------------------------------------------------------------------
# Command line (the GIF script shares the training half)

def outdir_problem(path: str) -> str | None:
    """Why figures could not be written into path (created if missing), or None: checked before
    any training so a bad destination costs nothing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"--outdir {path} exists and is not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=p).close()  # a real write: os.access misjudges some mounts
    except OSError as e:
        return f"--outdir {path} is not writable: {e.strerror}"
    return None


def prepare_run(args, cfg: mc.Config) -> tuple[mc.Run, dict, dict | None, dict]:
    """(run, mnist, pool, test): a fresh run with the module's own seed semantics, or the run in
    --checkpoint (its config wins), with the data its config determines."""
    ckpt = getattr(args, "checkpoint", None)
    run = mc.load_checkpoint(ckpt) if ckpt else mc.new_run(cfg)
    mnist = mc.load_data(args, run.cfg)
    return (run, mnist, *mc.make_data(run.cfg, mnist))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visualize_multimnist_capsnet.py",
                                description="Train a CapsNet on MultiMNIST (or load a checkpoint) "
                                            "and draw its figures into --outdir.")
    mc.add_training_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--outdir", default="viz", help="created if missing (default: %(default)s)")
    o.add_argument("--checkpoint", default=None,
                   help="a checkpoint from multimnist_capsnet.py --save: draw it, no training "
                        "(its config, data source included, replaces the training flags)")
    o.add_argument("--quiet", action="store_true", help="no per-step progress bar")
    return p


def config_or_error(parser: argparse.ArgumentParser, args) -> mc.Config:
    try:
        return mc.config_from_args(args)
    except mc.CapsNetError as e:
        parser.error(str(e))


def run_reporting_errors(prog: str, work) -> int:
    """work() -> 0; a CapsNetError or Ctrl-C becomes one line on stderr, no traceback."""
    try:
        work()
    except mc.CapsNetError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written (every write is atomic)", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_or_error(parser, args)
    if why := outdir_problem(args.outdir):
        parser.error(why)
    outdir = Path(args.outdir).expanduser()

    def work():
        run, mnist, pool, test = prepare_run(args, cfg)
        if not args.checkpoint:
            mc.train(run, mnist, pool, test, progress=not args.quiet)
        for path in write_figures(run, test, outdir):
            print(f"wrote {path}")
    return run_reporting_errors(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
