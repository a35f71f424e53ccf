"""Figures for the book, drawn from a run's outputs (matplotlib; every function returns its figure).

Conventions: linear axes, colour-blind palette, one colour per arm and one line style per seed, intervals drawn
so that they stay visible at 0% and 100%. Nothing here imports torch or the simulator, so the book's figure
cells stay cheap.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

#: The arms in reading order, with the labels the figures and tables use.
ARM_LABELS = {"base": "pre-trained base (no fine-tune)", "baseline": "baseline (lambda = 0)",
              "refinevla": "ReFineVLA (rationale, then action)", "oracle": "ReFineVLA on the teacher's rationale",
              "dropout": "reasoning dropout, acts directly", "after": "rationale after the action"}
SHORT_LABELS = {"base": "base", "baseline": "baseline", "refinevla": "ReFineVLA", "oracle": "oracle",
                "dropout": "dropout", "after": "after"}
LINE_STYLES = ["-", "--", ":", "-."]


def _palette(names) -> dict:
    import seaborn as sns

    names = list(dict.fromkeys(names))
    return dict(zip(names, sns.color_palette("colorblind", max(len(names), 1))))


def plot_frames(images, titles=None, ncols: int | None = None, size: float = 2.2):
    """A row (or grid) of frames with titles."""
    import matplotlib.pyplot as plt

    ncols = ncols or len(images)
    nrows = int(np.ceil(len(images) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(np.asarray(img), cmap="gray" if np.asarray(img).ndim == 2 else None, interpolation="nearest")
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def plot_action_distributions(ds, max_rows: int = 5000):
    """Histograms of the 7 action dimensions per task (what the action bins must cover)."""
    import seaborn as sns

    n = min(len(ds), max_rows)
    sub = ds.select(np.linspace(0, len(ds) - 1, n).astype(int)) if len(ds) > n else ds
    acts = np.asarray(sub["action"], np.float32)
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    frame = pd.DataFrame(acts, columns=names).assign(task=sub["task"])
    long = frame.melt(id_vars="task", var_name="dimension", value_name="value")
    grid = sns.displot(long, x="value", hue="task", col="dimension", col_wrap=4, bins=30, height=1.8,
                       facet_kws=dict(sharey=False, sharex=False), element="step")
    return grid.figure


# ---------------------------------------------------------------------------------------- training
def plot_training_curves(curves: pd.DataFrame):
    """Linear axes. Left (only when the run pre-trained its own base): pre-training's action loss, with the step the
    fine-tunes start from marked. Then every fine-tune's action loss (one colour per arm, one line style per seed;
    dots: held-out losses), each starting from a star at the pre-trained model's last loss when the run has it.
    Right: the reasoning loss where rationales are in the target. A run that loads a released base (no
    train/pretrain) has the two fine-tune panels only: that base's losses are in its model card
    (plot_base_losses)."""
    import matplotlib.pyplot as plt

    pre = curves[curves["arm"] == "pretrain"]
    fig, axes = plt.subplots(1, 3 if len(pre) else 2, figsize=(13 if len(pre) else 9, 3.6))
    fine_ax, reason_ax = axes[-2], axes[-1]
    colours = _palette([a for a in curves["arm"].unique()])
    start = None
    if len(pre):
        axes[0].plot(pre["step"], pre["l_action"], color="0.3", lw=1.2, label="pre-training")
        h = pre.dropna(subset=["heldout_l_action"]) if "heldout_l_action" in pre else pre.iloc[:0]
        if len(h):
            axes[0].plot(h["step"], h["heldout_l_action"], "o", color="0.3", ms=4, label="held-out")
        start = pre.iloc[-1]
        axes[0].axvline(start["step"], color="k", ls=":", lw=1)
        axes[0].annotate("fine-tunes start here", (start["step"], start["l_action"]), xytext=(-8, 20),
                         textcoords="offset points", ha="right", fontsize=8, arrowprops=dict(arrowstyle="->"))
        axes[0].set(title="pre-training: L_action", xlabel="step", ylabel="cross-entropy (nats)")
    else:
        fine_ax.set(ylabel="cross-entropy (nats)")
    for (arm, seed), g in curves[curves["arm"] != "pretrain"].groupby(["arm", "seed"], sort=False):
        kw = dict(color=colours[arm], linestyle=LINE_STYLES[max(int(seed), 0) % len(LINE_STYLES)], lw=1.4,
                  label=f"{SHORT_LABELS.get(arm, arm)}, seed {seed}")
        steps, loss = list(g["step"]), list(g["l_action"])
        if start is not None:  # each fine-tune starts from the pre-trained model at step 0
            steps, loss = [0] + steps, [start["l_action"]] + loss
        fine_ax.plot(steps, loss, **kw)
        if "heldout_l_action" in g:
            h = g.dropna(subset=["heldout_l_action"])
            fine_ax.plot(h["step"], h["heldout_l_action"], "o", color=colours[arm], ms=4)
        if "l_reason" in g and (g["l_reason"] > 0).any():
            reason_ax.plot(g["step"], g["l_reason"], **kw)
    if start is not None:
        fine_ax.plot([0], [start["l_action"]], "*", color="k", ms=11, label="pre-trained start", zorder=5)
    fine_ax.set(title="fine-tunes: L_action (dots: held-out)", xlabel="fine-tuning step")
    reason_ax.set(title="fine-tunes: L_reasoning", xlabel="fine-tuning step")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.set_yscale("linear")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_base_losses(manifest: dict):
    """The released base's pre-training losses from its model card (manifest.json), linear axes. Left: stage (a),
    the grounding-answer loss (dots: on the held-out probe frames). Right: stage (b), the action loss and the
    grounding loss of the questions mixed in (dots: held-out grounding loss)."""
    import matplotlib.pyplot as plt

    losses = manifest.get("losses", {})
    colours = _palette(["l_action", "l_reason"])
    labels = {"l_action": "L_action", "l_reason": "grounding loss"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    top = 0.0
    for ax, stage, keys, title in [(axes[0], "vlm", ["l_reason"], "stage (a) VLM: grounding answers"),
                                   (axes[1], "vla", ["l_action", "l_reason"], "stage (b) VLA: actions + grounding")]:
        curve = pd.DataFrame(losses.get(stage) or [])
        for key in keys:
            if key not in curve or not curve[key].notna().any():
                continue
            ax.plot(curve["step"], curve[key], color=colours[key], lw=1.4, label=labels[key])
            top = max(top, float(curve[key].max()))
            held = f"heldout_{key}"
            if held in curve:  # the held-out set is the probe frames: grounding questions only, no actions
                h = curve.dropna(subset=[held])
                h = h[h[held] > 0] if key == "l_action" else h
                if len(h):
                    ax.plot(h["step"], h[held], "o", color=colours[key], ms=5, mec="k", mew=0.5,
                            label=f"{labels[key]}, held-out")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax.transAxes)
    for ax in axes:  # one linear scale from 0 for both stages, with room above the highest loss
        ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)
    axes[0].set_ylabel("cross-entropy (nats)")
    fig.tight_layout()
    return fig


def plot_grounding(table: pd.DataFrame, bar: float = 0.95):
    """The grounding probe per model (report.grounding_table: indexed by model): side accuracy and the share of
    answers within 1 cm, as bars in %, the value above each, and the competence bar (``bar``) as a dashed line. A
    model with no side questions shows "n/a" for its side accuracy."""
    import matplotlib.pyplot as plt

    metrics = ["side accuracy", "within 1 cm"]
    colours = _palette(metrics)
    models = list(table.index)
    x = np.arange(len(models))
    width = 0.38
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(1, len(models)), 3.4), layout="constrained")
    for k, metric in enumerate(metrics):
        values = pd.to_numeric(table[metric], errors="coerce").to_numpy(float) * 100
        xs = x + (k - 0.5) * width
        ax.bar(xs, np.nan_to_num(values, nan=0.0), width, color=colours[metric], label=metric)
        for xi, v in zip(xs, values):
            ax.annotate("n/a" if np.isnan(v) else f"{v:.0f}", (xi, 0 if np.isnan(v) else v), xytext=(0, 2),
                        textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(100 * bar, color="k", ls="--", lw=1, label=f"bar: {100 * bar:.0f}%")
    ax.set_xticks(x, models, rotation=20, ha="right")
    ax.set(ylim=(0, 108), ylabel="held-out questions (%)", title="where is the named object? (held-out frames)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ---------------------------------------------------------------------------------------- evaluation
def plot_success(table: pd.DataFrame, paper: pd.DataFrame | None = None):
    """Success rate of every arm on every split as points with Wilson 95% intervals (stats.success_table): one
    panel per split, one row per arm, the count k/n beside each point. Intervals are drawn as bars, so they stay
    visible at 0% and 100%."""
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(table["arm"]))
    splits = list(dict.fromkeys(table["split"]))
    colours = _palette(arms)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits) + 1.6, 0.45 * len(arms) + 1.4),
                             sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        g = table[table["split"] == split].set_index("arm").reindex(arms)
        for y, arm in enumerate(arms):
            r = g.loc[arm]
            if not r["n"] == r["n"]:  # NaN: this arm did not run on this split
                continue
            lo, hi = 100 * r["ci_low"], 100 * r["ci_high"]
            ax.plot([lo, hi], [y, y], color=colours[arm], lw=5, alpha=0.35, solid_capstyle="butt")
            ax.plot([lo, lo], [y - 0.2, y + 0.2], color=colours[arm], lw=1.2)
            ax.plot([hi, hi], [y - 0.2, y + 0.2], color=colours[arm], lw=1.2)
            ax.plot(100 * r["rate"], y, "o", color=colours[arm], ms=8, mec="k", mew=0.6, zorder=3)
            ax.annotate(f"{int(r['successes'])}/{int(r['n'])}", (min(hi, 100) + 2, y), va="center", fontsize=8)
        ax.set_yticks(range(len(arms)), [SHORT_LABELS.get(a, a) for a in arms])
        ax.set(xlim=(-3, 115), title=split.replace("_", " "), xlabel="success rate (%), Wilson 95% interval")
        ax.axvline(0, color="grey", lw=0.5)
        ax.axvline(100, color="grey", lw=0.5)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    return fig


def plot_paired(paired: pd.DataFrame, reference: str = "baseline"):
    """Each arm minus the reference arm on the same episodes, in points, with the paired bootstrap 95% interval;
    one panel per split; a dashed line at 0 (no difference)."""
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(paired["arm"]))
    splits = list(dict.fromkeys(paired["split"]))
    colours = _palette([reference] + arms)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits) + 1.6, 0.45 * len(arms) + 1.4),
                             sharey=True, squeeze=False)
    lim = max(10.0, 100 * float(np.nanmax(np.abs(paired[["diff_low", "diff_high"]].to_numpy()))) + 5)
    for ax, split in zip(axes[0], splits):
        g = paired[paired["split"] == split].set_index("arm")
        for y, arm in enumerate(arms):
            if arm not in g.index:
                continue
            r = g.loc[arm]
            ax.plot([100 * r["diff_low"], 100 * r["diff_high"]], [y, y], color=colours[arm], lw=5, alpha=0.35)
            ax.plot(100 * r["diff"], y, "D", color=colours[arm], ms=7, mec="k", mew=0.6, zorder=3)
        ax.axvline(0, color="k", ls="--", lw=1)
        ax.set_yticks(range(len(arms)), [SHORT_LABELS.get(a, a) for a in arms])
        ax.set(xlim=(-lim, lim), title=split.replace("_", " "),
               xlabel=f"arm - {SHORT_LABELS.get(reference, reference)} (points), 95% interval")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- attention
def upsample_map(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [g, g] map -> [H, W], bilinear (PIL, no torch); NaN stays NaN."""
    from PIL import Image

    grid = np.asarray(grid, np.float32)
    if grid.shape == tuple(size):
        return grid
    if not np.isfinite(grid).all():
        return np.full(size, np.nan, np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size[1], size[0]), Image.BILINEAR))


def _mask(mask):
    if mask is None:
        return None
    m = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask)
    return (m.max(-1) if m.ndim == 3 else m) > 0


def plot_attention(frames, maps_by_model: dict, titles, masks=None, notes: dict | None = None,
                   scale: int = 4, alpha: float = 0.6, cmap: str = "inferno", title: str = ""):
    """One row per frame: the raw camera frame, then each model's attention over it (its patch map upsampled
    bilinearly to ``scale`` x the frame), the target mask outlined in cyan, and a colorbar (attention relative to
    an even spread over the image, 1 = no preference) shared by the row so that the models compare.
    ``notes[model][i]`` is written under panel i (e.g. the score)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    names = list(maps_by_model)
    n = len(frames)
    if n == 0 or not names:
        raise ValueError("plot_attention needs at least one frame and one model")
    for name in names:
        if len(maps_by_model[name]) != n:
            raise ValueError(f"model {name!r} has {len(maps_by_model[name])} maps for {n} frames")
    cols = len(names) + 1
    fig, axes = plt.subplots(n, cols + 1, figsize=(2.7 * cols + 0.5, 2.9 * n + (0.4 if title else 0)),
                             squeeze=False, gridspec_kw=dict(width_ratios=[1] * cols + [0.06]))
    for i in range(n):
        frame = np.asarray(frames[i])
        h, w = frame.shape[0] * scale, frame.shape[1] * scale
        big = np.asarray(Image.fromarray(frame.astype(np.uint8)).resize((w, h), Image.NEAREST))
        ups = {}
        for name in names:
            m = np.asarray(maps_by_model[name][i], np.float32)
            ups[name] = upsample_map(m, (h, w))
            if np.isfinite(ups[name]).any():
                ups[name] = ups[name] / np.nanmean(ups[name])  # 1 = the share an even spread would give
        finite = [float(np.nanmax(u)) for u in ups.values() if np.isfinite(u).any()]
        vmax = max(finite) if finite else 1.0
        mask = _mask(masks[i]) if masks is not None else None
        if mask is not None:
            mask = np.kron(mask, np.ones((scale, scale), bool))
        axes[i, 0].imshow(big)
        axes[i, 0].set_title("camera frame", fontsize=9)
        axes[i, 0].set_ylabel(str(titles[i]) if titles is not None else "", fontsize=9)
        image = None
        for ax, name in zip(axes[i, 1:cols], names):
            ax.imshow(big)
            if np.isfinite(ups[name]).any():
                image = ax.imshow(ups[name], cmap=cmap, alpha=alpha, vmin=0.0, vmax=vmax)
            else:
                ax.text(0.5, 0.5, "undefined", ha="center", va="center", transform=ax.transAxes, color="w",
                        bbox=dict(facecolor="k", alpha=0.6))
            ax.set_title(SHORT_LABELS.get(name, name), fontsize=9)
            if notes and name in notes:
                ax.set_xlabel(str(notes[name][i]), fontsize=8)
        for ax in axes[i, :cols]:
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
        if image is not None:
            fig.colorbar(image, cax=axes[i, cols], label="attention\n(1 = even spread)")
        else:
            axes[i, cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_overlays(frames, maps_by_model: dict, titles, masks=None, notes: dict | None = None,
                  alpha: float = 0.6, cmap: str = "inferno"):
    """The attention stage's overlays.png: plot_attention at 4x the camera resolution."""
    return plot_attention(frames, maps_by_model, titles, masks=masks, notes=notes, alpha=alpha, cmap=cmap)


def plot_scores(table, metric: str = "lift"):
    """Per task, each model's mean ``metric`` with its 95% interval (a dashed line at 1 for the lift)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    t = table[table[metric].notna()]
    tasks, models = list(dict.fromkeys(t["task"])), list(dict.fromkeys(t["model"]))
    colors = _palette(models)
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * max(1, len(tasks)), 3.2), layout="constrained")
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        tm = t[t["model"] == model].set_index("task")
        xs = [tasks.index(task) + (k - (len(models) - 1) / 2) * width for task in tm.index]
        lo = (tm[metric] - tm[f"{metric}_ci_low"]).fillna(0).clip(lower=0)
        hi = (tm[f"{metric}_ci_high"] - tm[metric]).fillna(0).clip(lower=0)
        ax.errorbar(xs, tm[metric], yerr=[lo, hi], fmt="o", capsize=3, color=colors[model],
                    label=SHORT_LABELS.get(model, model))
    if metric == "lift":
        ax.axhline(1.0, ls="--", color="grey", lw=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel({"lift": "attention-on-target lift", "share": "attention-on-target share"}.get(metric, metric))
    ax.legend(fontsize=8)
    sns.despine(ax=ax)
    return fig
