"""Figures for the NumPy CapsNet on MultiMNIST: trains a run (or loads a checkpoint) and draws

  training_curves.png      margin / reconstruction loss per step, test accuracies per epoch
  reconstructions.png      composite | source a | recon from capsule a | source b | recon from b
  capsule_activations.png  capsule lengths |v_k| of test composites, and the hit breakdown
  multimnist_examples.png  composites, their two source digits, shifts and bounding-box IoU
  paper_overlay.png        the paper's Figure 5: inputs above red/green reconstructions
  capsule_dimensions.png   the paper's Figure 4: one capsule's 16 dimensions perturbed, decoded
  routing.png              where each primary capsule's vote goes, per routing iteration

and measures routing: routing_purity (the share of a digit's primary capsules' votes routed to
its own capsule) and segmentation_accuracy (the paper's segmentation by reconstruction); the
numbers for trained checkpoints come from `bench/experiments.py routing`.

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
from matplotlib.ticker import FuncFormatter

import mnist_fetch
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
    """Labels as written on the figures: (3,7) for a pair, 7 for one digit."""
    return str(p[0]) if len(p) == 1 else f"({p[0]},{p[1]})"


# ----------------------------------------------------------------------------------------------
# What the trained network says about test composites

def analyse(params, cfg: mc.Config, pairs: dict) -> dict:
    """Capsules, lengths and the top-2 prediction of every composite, computed once (one digit
    per image, MNIST: the longest capsule's). right: every label found.

    pred is ordered to line up with labels (a label that was found stays in its column) so that
    'prediction a' is drawn red next to 'label a' whenever the network got digit a.
    """
    v = mc.predict(params, cfg, pairs["x"])
    norms = np.linalg.norm(v, axis=2)                                   # (N, J)
    labels = pairs["labels"]
    if labels.shape[1] == 1:  # MNIST: the longest capsule is the answer
        pred = norms.argmax(1)[:, None]                                 # (N, 1)
        right = pred[:, 0] == labels[:, 0]
        return dict(v=v, norms=norms, pred=pred, hits=right.astype(int), right=right, top1=right)
    top2 = mc.top2(norms)
    swap = (top2[:, 0] == labels[:, 1]) | (top2[:, 1] == labels[:, 0])
    pred = np.where(swap[:, None], top2[:, ::-1], top2)
    hits = (top2[:, :, None] == labels[:, None, :]).any(2)              # (N, 2)
    return dict(v=v, norms=norms, top2=top2, pred=pred, hits=hits.sum(1), right=hits.all(1),
                top1=hits[:, 0])


def decode(params, v, digits) -> np.ndarray:
    """Reconstructions (N, H*W) from capsule digits[n] of v[n] alone."""
    return mc.reconstruct(params, v, np.asarray(digits, np.int64))


def pick(an: dict, n: int, n_wrong: int) -> np.ndarray:
    """n test indices, n_wrong of them (when there are any) misclassified: not only the best."""
    wrong, right = np.flatnonzero(~an["right"]), np.flatnonzero(an["right"])
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
    y = np.asarray(history.get(key, ()), np.float64)  # a model file keeps the epoch means only
    if len(y):
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


def fig_training_curves(run: mc.Run, an: dict | None = None) -> Figure:
    """Losses per step and test accuracies per epoch; the final values are in the legend, where
    they cannot overlap or leave the axes. an: analyse() of these weights on the same test pairs,
    drawn as a star when the weights are not those of the last evaluation (a run stopped
    mid-epoch, as the shipped model's), so that its accuracy and the curve's end both show."""
    fig = new_figure(13, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    plot_loss(ax1, run.history, "margin", "train_margin", "tab:blue", "margin loss")
    ax1.set_title("Margin loss (training batches)")
    plot_loss(ax2, run.history, "recon", "train_recon", "tab:purple",
              "sum of squared errors" + (", both digits" if run.cfg.n_labels == 2 else ""))
    ax2.set_yscale("log")  # the first steps drop 5x; log keeps the slow tail readable
    ax2.set_title("Reconstruction loss (unweighted)")
    ep = run.history["epochs"]
    x = [m["epoch"] for m in ep]
    if run.cfg.n_labels == 1:
        plot_test_error(ax3, run, an)
        return fig
    for key, name, style in (("set_acc", "both digits (set)", "o-"),
                             ("soft_acc", "at least one (soft)", "s--"),
                             ("top1", "top-1 is a label", "^:")):
        y = [m[key] for m in ep]
        ax3.plot(x, y, style, ms=4, label=f"{name}: {y[-1]:.3f}" if ep else name)
    ax3.axhline(CHANCE, color="gray", ls="--", lw=1, label="chance 1/45 (set)")
    ax3.set_title(f"Test accuracy ({run.cfg.n_test:,} composites)")
    if an is not None and ep and run.step != ep[-1]["step"]:
        acc = (an["hits"] == 2).mean()
        ax3.plot(run.step / run.steps_per_epoch(), acc, "*", color="C3", ms=11,
                 label=f"set, the weights drawn (step {run.step:,}): {acc:.3f}")
        ax3.set_title(f"Test accuracy ({run.cfg.n_test:,} composites)\nthe curves: after each "
                      f"epoch, the last at step {ep[-1]['step']:,}", fontsize=9)
    ax3.set_ylim(0, 1.05)
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("accuracy")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 0.06))
    if ep:
        ax3.set_xticks(x if len(x) <= 12 else x[:: len(x) // 12 + 1])
    return fig


def plot_test_error(ax, run: mc.Run, an: dict | None) -> None:
    """MNIST: test error per epoch, in percent; a star for weights drawn after the last
    evaluation, as in the accuracy panel."""
    ep = run.history["epochs"]
    x, y = [m["epoch"] for m in ep], [100 * m["test_error"] for m in ep]
    ax.plot(x, y, "o-", ms=3, label=f"test error: {y[-1]:.2f}%" if ep else "test error")
    if an is not None and ep and run.step != ep[-1]["step"]:
        err = 100 * (1 - an["right"].mean())
        ax.plot(run.step / run.steps_per_epoch(), err, "*", color="C3", ms=11,
                label=f"the weights drawn (step {run.step:,}): {err:.2f}%")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, not 5 x 10^-1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set(xlabel="epoch", ylabel="% of the test digits",
           title=f"Test error ({run.cfg.n_test:,} digits)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def fig_digit_reconstructions(params, test: dict, an: dict, idx: np.ndarray) -> Figure:
    """MNIST, the paper's Figure 3: each test digit above its reconstruction from the longest
    capsule alone (red); L the label, P the prediction, wrong ones in orange."""
    rec = decode(params, an["v"][idx], an["pred"][idx, 0])
    fig = new_figure(1.1 * len(idx) + 0.4, 2.9)
    axes = fig.subplots(2, len(idx), squeeze=False)
    for c, n in enumerate(idx):
        ok = bool(an["right"][n])
        show(axes[0, c], as_image(test["x"][n]), f"L:{test['labels'][n, 0]} P:{an['pred'][n, 0]}",
             "black" if ok else "darkorange")
        show(axes[1, c], tint(rec[c], A_RGB), f"R:{an['pred'][n, 0]}")
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("reconstruction", fontsize=9)
    fig.suptitle("Paper Fig. 3 style: L label, P prediction (longest capsule), R the capsule "
                 "decoded; wrong in orange", fontsize=9)
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
    heat.set_title("capsule length $|v_k|$ (L: the labels; boxes: label a red, label b green; "
                   "dots: top-2)", fontsize=9)
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
    right = np.flatnonzero(an["right"])
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


# ----------------------------------------------------------------------------------------------
# Routing: where the primary capsules' votes go, drawn and measured

INK = 0.5  # a pixel (in [0, 1], uint8 / 255) is ink above half intensity: uint8 >= 128


def rf_centres(cfg: mc.Config) -> np.ndarray:
    """Canvas row (and column) of the receptive-field centre of each PrimaryCaps grid row, (G,).

    Conv1 (kernel K, stride 1) then PrimaryCaps (kernel K, stride S): grid row g sees conv1 rows
    [S g, S g + K - 1], so canvas rows [S g, S g + 2K - 2], centred on S g + K - 1. Primary
    capsule i sits at grid cell (row, col) = divmod(i // T, G), T = cfg.primary_types (the conv
    output (N, G, G, T*D) is reshaped to (N, G*G*T, D)). tests/test_routing.py checks both by
    perturbing one input pixel.
    """
    return cfg.primary_stride * np.arange(cfg.grid()[1]) + cfg.kernel - 1


def routing_batches(params, cfg: mc.Config, x_uint8: np.ndarray, digits: np.ndarray):
    """Encode uint8 composites (N, H, W) cfg.eval_batch at a time (bounded memory) and yield, per
    batch, (sl, ulen, c, v), all float64: sl the batch's slice of the N composites, ulen (n, I)
    the primary capsule lengths |u_i|, c (R, n, K, I) the coupling coefficients c_ij of every
    routing iteration to the capsules digits[sl] (n, K) only, v (n, J, E) the digit capsules."""
    for start in range(0, len(x_uint8), cfg.eval_batch):
        sl = slice(start, min(start + cfg.eval_batch, len(x_uint8)))
        x = mc.network_input(x_uint8[sl], cfg.np_dtype)                  # (n, H, W, 1)
        v, cache = mc.encode(params, x, cfg)
        sq = cache.squash                                 # PrimaryCaps' squash: u = g s
        ulen = (sq.norm * sq.gain)[..., 0].astype(np.float64)            # |u| = |s| g, (n, I)
        rows = np.arange(len(x))[:, None]
        c = np.stack([it.c[rows, digits[sl]] for it in cache.routing.iters])  # (R, n, K, I)
        yield sl, ulen, c.astype(np.float64), v.astype(np.float64)


def couplings(params, cfg: mc.Config, x_uint8: np.ndarray, digits: np.ndarray):
    """routing_batches gathered: ulen (N, I) and c (R, N, K, I), for a few composites."""
    parts = [(u, c) for _, u, c, _ in routing_batches(params, cfg, x_uint8, digits)]
    return np.concatenate([u for u, _ in parts]), np.concatenate([c for _, c in parts], axis=1)


def capsule_owner(cfg: mc.Config, a: np.ndarray, b: np.ndarray, ink: float = INK) -> np.ndarray:
    """Whose ink each primary capsule's receptive-field centre pixel lies on: a, b (N, H, W)
    uint8 sources -> (N, I) int8, 0 where a > ink and b == 0 there (digit a only), 1 where
    b > ink and a == 0 (digit b only), -1 elsewhere (both, neither, or faint)."""
    cen = rf_centres(cfg)
    fa = a[:, cen][:, :, cen] / 255                                      # (N, G, G)
    fb = b[:, cen][:, :, cen] / 255
    own = np.where((fa > ink) & (fb == 0), 0, np.where((fb > ink) & (fa == 0), 1, -1))
    return np.repeat(own.reshape(len(a), -1), cfg.primary_types, axis=1).astype(np.int8)


def routing_purity(params, cfg: mc.Config, pairs: dict, ink: float = INK) -> dict:
    """How much of each digit's primary capsules' vote goes to that digit's capsule.

    Over all composites of pairs, the primary capsules whose receptive-field centre is on digit
    a's ink only (capsule_owner), pooled: a[r] = sum_i |u_i| c_ia / sum_i |u_i| at routing
    iteration r+1, c_ia the coupling to the capsule of label a; b likewise for b-only capsules
    and label b; mean = (a + b) / 2. cross_a, cross_b, cross: the same capsules' share routed to
    the other true digit's capsule. Iteration 1 is 1/10 (softmax of zero logits) by construction.
    Every value is an (R,) float64 array (nan if no capsule qualifies); n_a, n_b count the
    qualifying capsules (each of the T types at a grid position counts once).
    """
    r_ = cfg.routing_iters
    own_sum, other_sum, mass, count = (np.zeros((r_, 2)), np.zeros((r_, 2)), np.zeros(2),
                                       np.zeros(2, np.int64))
    for sl, ulen, c, _ in routing_batches(params, cfg, pairs["x"], pairs["labels"]):
        owner = capsule_owner(cfg, pairs["a"][sl], pairs["b"][sl], ink)  # (n, I)
        for k in (0, 1):
            w = ulen * (owner == k)                                      # (n, I)
            own_sum[:, k] += np.einsum("ni,rni->r", w, c[:, :, k])
            other_sum[:, k] += np.einsum("ni,rni->r", w, c[:, :, 1 - k])
            mass[k] += w.sum()
            count[k] += (owner == k).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        own, other = own_sum / mass, other_sum / mass                    # (R, 2)
    return dict(a=own[:, 0], b=own[:, 1], mean=own.mean(1), cross_a=other[:, 0],
                cross_b=other[:, 1], cross=other.mean(1), n_a=int(count[0]), n_b=int(count[1]))


def assign_pixels(composite, recon_a, recon_b, src_a, src_b, ink: float = INK):
    """Segmentation by reconstruction, one step: same-shaped arrays in [0, 1] -> (scored, right)
    bool arrays of that shape. scored: composite ink (> ink) that belongs to exactly one source
    (one source is non-zero there, the other is 0); right: scored, and the larger of the two
    reconstructions there is that source's (a tie counts as wrong)."""
    only_a, only_b = (src_a > 0) & (src_b == 0), (src_b > 0) & (src_a == 0)
    scored = (composite > ink) & (only_a | only_b)
    right = scored & np.where(only_a, recon_a > recon_b, recon_b > recon_a)
    return scored, right


def segmentation_accuracy(params, cfg: mc.Config, pairs: dict, v: np.ndarray | None = None,
                          ink: float = INK) -> dict:
    """The paper's segmentation: decode each true-label capsule alone and give every scored ink
    pixel (assign_pixels) to the larger reconstruction. accuracy: the share of scored pixels
    given to the right digit, pooled over all composites; acc_a, acc_b: over a's and b's
    pixels; n_pixels: how many were scored. v: the digit capsules (N, J, E), if computed."""
    v = mc.predict(params, cfg, pairs["x"]) if v is None else v
    n, labels = len(pairs["x"]), pairs["labels"]
    flat = lambda k: pairs[k].reshape(n, -1) / 255
    src_a, src_b = flat("a"), flat("b")
    scored, right = assign_pixels(flat("x"), decode(params, v, labels[:, 0]),
                                  decode(params, v, labels[:, 1]), src_a, src_b, ink)
    on_a, on_b = scored & (src_a > 0), scored & (src_b > 0)
    share = lambda num, den: float(num.sum() / den.sum()) if den.any() else float("nan")
    return dict(accuracy=share(right, scored), acc_a=share(right & on_a, on_a),
                acc_b=share(right & on_b, on_b), n_pixels=int(scored.sum()))


def routing_colours(cfg: mc.Config, ulen: np.ndarray, ca: np.ndarray, cb: np.ndarray
                    ) -> np.ndarray:
    """One composite's votes per grid position: ulen, ca, cb (I,) -> (G, G, 2) in [0, 1].

    Channel 0 is sum_t |u_t| c_t,a over the T capsule types at a position, channel 1 the same
    for b, both divided by the largest sum_t |u_t| of any position: a position's colour is its
    |u|-weighted mean coupling (to a, to b) times its capsule mass relative to the strongest
    position, so inactive capsules fade out and the colours of different iterations compare.
    """
    g, t = cfg.grid()[1], cfg.primary_types
    mass = ulen.reshape(g, g, t).sum(2)
    votes = np.stack([(ulen * ca).reshape(g, g, t).sum(2), (ulen * cb).reshape(g, g, t).sum(2)],
                     axis=2)
    return votes / max(mass.max(), np.finfo(np.float64).tiny)


def upsample_grid(cfg: mc.Config, grid_img: np.ndarray) -> np.ndarray:
    """(G, G, C) per grid position -> (canvas, canvas, C): position (row, col) paints the
    stride x stride patch of canvas pixels nearest its receptive-field centre (rf_centres); the
    pixels no position is nearest to (the border) stay 0."""
    s, g = cfg.primary_stride, cfg.grid()[1]
    p = np.arange(cfg.canvas)
    cell = (p - (cfg.kernel - 1) + s // 2) // s                          # (canvas,)
    ok = (cell >= 0) & (cell < g)
    cell = np.clip(cell, 0, g - 1)
    return grid_img[cell[:, None], cell[None, :]] * (ok[:, None] & ok[None, :])[..., None]


def fig_routing(params, cfg: mc.Config, test: dict, idx: np.ndarray) -> Figure:
    """Rows: composites test[idx]; columns: composite, source a, source b, one panel per routing
    iteration, and the last iteration's excess over uniform routing.

    An iteration panel is routing_colours (red: |u|-weighted coupling to label a's capsule,
    green: to b's, on a linear scale where 1 is a full-mass position coupled only to that
    capsule) upsampled to the canvas, added to the composite in 30% grey. The last panel shows
    routing_excess instead, stretched per row by the gain in its title: that panel's scale is
    relative, the others' absolute. Titles: the composite's own-digit vote share (purity_str).
    """
    idx = np.asarray(idx)
    sub = {k: test[k][idx] for k in ("x", "a", "b", "labels")}
    an = analyse(params, cfg, sub)
    ulen, c = couplings(params, cfg, sub["x"], sub["labels"])           # (n, I), (R, n, 2, I)
    owner = capsule_owner(cfg, sub["a"], sub["b"])
    n_it = cfg.routing_iters
    fig = new_figure(1.25 * (4 + n_it) + 0.5, 1.25 * len(idx) + 1.0)
    axes = fig.subplots(len(idx), 4 + n_it, squeeze=False)
    for r in range(len(idx)):
        la, lb = sub["labels"][r]
        show(axes[r, 0], as_image(sub["x"][r]),
             f"L:{pair_str(sub['labels'][r])} P:{pair_str(an['pred'][r])}",
             "black" if an["hits"][r] == 2 else "darkorange")
        show(axes[r, 1], tint(sub["a"][r], A_RGB), f"a = {la}", A_COLOR)
        show(axes[r, 2], tint(sub["b"][r], B_RGB), f"b = {lb}", B_COLOR)
        grey = 0.3 * as_image(sub["x"][r])[..., None]
        for it in range(n_it):
            rg = routing_colours(cfg, ulen[r], c[it, r, 0], c[it, r, 1])
            show(axes[r, 3 + it], on_grey(cfg, grey, rg),
                 f"iter {it + 1}: {purity_str(ulen[r], c[it, r], owner[r])}", fontsize=7)
        rg, gain = routing_excess(cfg, ulen[r], c[-1, r])
        show(axes[r, 3 + n_it], on_grey(cfg, grey, rg), f"iter {n_it} − 1/10, ×{gain:.3g}",
             fontsize=7)
    for col, name in enumerate(("composite", "source a", "source b")):
        axes[0, col].set_title(f"{name}\n{axes[0, col].get_title()}", fontsize=8,
                               color=axes[0, col].title.get_color(), pad=2)
    fig.suptitle("Where each primary capsule's vote goes: red = coupling $c$ to digit a's capsule, "
                 "green = to b's, brightness also by $|u|$.\nLook for red on a's strokes and "
                 "green on b's. Iteration 1 is uniform ($c$ = 1/10: dim, equal red and green).\n"
                 "L: the labels (a, b); P: the prediction, the two longest capsules (orange: "
                 "wrong). Titles: share of the votes of capsules centred on a only (b only)\n"
                 "that goes to a (b). Last column: excess over 1/10, stretched.", fontsize=8.5)
    return fig


def on_grey(cfg: mc.Config, grey: np.ndarray, rg: np.ndarray) -> np.ndarray:
    """Grid colours rg (G, G, 2) upsampled onto a grey canvas (H, W, 1) -> RGB (H, W, 3)."""
    up = upsample_grid(cfg, rg)
    return np.clip(grey + up[..., :1] * A_RGB + up[..., 1:] * B_RGB, 0, 1)


def routing_excess(cfg: mc.Config, ulen: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
    """Where routing moved votes towards a and b: ulen (I,), c (2, I) -> ((G, G, 2), gain).

    routing_colours of c - 1/J clipped at 0 (votes moved away are not drawn), times the gain
    that brings the row's largest value to 1 (gain 1 when nothing moved)."""
    ex = np.maximum(routing_colours(cfg, ulen, c[0] - 1 / cfg.n_classes,
                                    c[1] - 1 / cfg.n_classes), 0)
    gain = 1 / ex.max() if ex.max() > 0 else 1.0
    return ex * gain, gain


def purity_str(ulen, c, owner) -> str:
    """'a 0.312 b 0.274': one composite's own-digit vote share, ulen (I,), c (2, I), owner (I,)."""
    out = []
    for k, name in ((0, "a"), (1, "b")):
        w = ulen * (owner == k)
        out.append(f"{name} {(w * c[k]).sum() / w.sum():.3f}" if w.sum() > 0 else f"{name} –")
    return " ".join(out)


def write_figures(run: mc.Run, test: dict, outdir: Path) -> list[Path]:
    params = run.eval_params
    an = analyse(params, run.cfg, test)
    if run.cfg.n_labels == 1:  # one digit: no pairs to separate, no red/green routing
        figs = {
            "training_curves.png": fig_training_curves(run, an),
            "reconstructions.png": fig_digit_reconstructions(params, test, an, pick(an, 10, 3)),
            "capsule_dimensions.png": fig_capsule_dimensions(params, test, an),
        }
    else:
        figs = {
            "training_curves.png": fig_training_curves(run, an),
            "reconstructions.png": fig_reconstructions(params, test, an, pick(an, 8, 3)),
            "capsule_activations.png": fig_capsule_activations(test, an),
            "multimnist_examples.png": fig_examples(test),
            "paper_overlay.png": fig_paper_overlay(params, test, an),
            "capsule_dimensions.png": fig_capsule_dimensions(params, test, an),
            "routing.png": fig_routing(params, run.cfg, test, pick(an, 6, 3)),
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


def prepare_run(args, cfg: mc.Config, given=()) -> tuple[mc.Run, dict, dict | None, dict]:
    """(run, mnist, pool, test): a fresh run with the module's own seed semantics, or the run in
    --checkpoint, with the data its config determines; a training flag among the Config fields
    given that disagrees with the checkpoint's config is an error, not silently ignored."""
    ckpt = getattr(args, "checkpoint", None)
    run = mc.load_checkpoint(ckpt) if ckpt else mc.new_run(cfg)
    if differ := sorted(mc.flag(k) for k in given if getattr(cfg, k) != getattr(run.cfg, k)):
        raise mc.CapsNetError(f"{', '.join(differ)}: {ckpt} was trained otherwise and is drawn "
                              "as it was trained; drop the flag, or train without --checkpoint")
    if run.cfg.model != "capsnet":
        raise mc.CapsNetError(f"the figures show capsules and their reconstructions; a "
                              f"{run.cfg.model} has neither")
    mnist = mnist_fetch.load_data(args, run.cfg)
    return (run, mnist, *mc.make_data(run.cfg, mnist))


def build_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="visualize_multimnist_capsnet.py",
                                description="Train a CapsNet on MultiMNIST (or load a checkpoint) "
                                            "and draw its figures into --outdir.")
    o = p.add_argument_group("figures")
    o.add_argument("--outdir", default=None,
                   help="created if missing (default: viz for a run trained here, viz/shipped for "
                        "the shipped model, viz/NAME for --checkpoint NAME.npz: a saved model's "
                        "figures never replace another's)")
    o.add_argument("--checkpoint", nargs="?", const=str(mc.MODEL_FILE), default=None,
                   help="draw a saved model, no training: a checkpoint from "
                        "multimnist_capsnet.py --save, or with no value the shipped model "
                        "(drawn with its own config, data source included: a training flag that "
                        "disagrees is an error)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is drawn only when stderr is a terminal)")
    mc.add_training_flags(p)  # after its own flags: --help leads with what this script adds
    return p


def default_outdir(checkpoint: str | None, task: str = "multimnist") -> str:
    """viz for a run trained here (the committed default-run figures; viz/mnist for an MNIST
    run), viz/shipped for the shipped model, viz/NAME for a checkpoint NAME.npz."""
    if checkpoint is None:
        return "viz" if task == "multimnist" else str(Path("viz") / task)
    if Path(checkpoint).resolve() == mc.MODEL_FILE:
        return str(Path("viz") / "shipped")
    return str(Path("viz") / Path(checkpoint).stem)


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
    outdir = args.outdir or default_outdir(args.checkpoint, cfg.task)
    if why := outdir_problem(outdir):
        parser.error(why)
    outdir = Path(outdir).expanduser()

    def work():
        given = mc.given_fields(build_parser(), argv) if args.checkpoint else set()
        run, mnist, pool, test = prepare_run(args, cfg, given)
        if not args.checkpoint:
            mc.train(run, mnist, pool, test, progress=not args.quiet)
        for path in write_figures(run, test, outdir):
            print(f"wrote {path}")
    return run_reporting_errors(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
