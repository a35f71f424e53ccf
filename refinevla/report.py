"""Tables and figures for the book, read only from a run folder (every number printed comes from a run)."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from .competence import (base_probe_table, base_recipe_table, base_release,  # noqa: F401 (the book calls them here)
                         competence_sentence, competence_table, grounding_table)
from .config import IN_DISTRIBUTION, SPLITS, VARIANT
from .figures import ARM_LABELS, SHORT_LABELS

PAPER_RESULTS = Path(__file__).parent / "paper_results.csv"


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- data
def demo_stats_table(run_dir, folder: str = "demos") -> pd.DataFrame:
    """Per task: expert episodes, successes, success rate, frames kept (``folder``: demos = the fine-tuning set,
    demos_pretrain = the pre-training mixture)."""
    stats = read_json(Path(run_dir) / folder / "stats.json")
    if "tasks" not in stats:
        return pd.DataFrame([stats])
    return pd.DataFrame(stats["tasks"]).T.rename_axis("task")


def first_frames_per_task(ds, column: str = "image") -> tuple[list, list]:
    """The first frame of the first episode of each task (and its task name)."""
    seen, images, titles = set(), [], []
    tasks, steps = ds["task"], ds["step_index"]
    for i, (task, step) in enumerate(zip(tasks, steps)):
        if step == 0 and task not in seen:
            seen.add(task)
            images.append(np.asarray(ds[i][column]))
            titles.append(f"{task}: {ds[i]['instruction']}")
    return images, titles


# ---------------------------------------------------------------------------------------- training
def _metric_dirs(run_dir) -> list[tuple[str, int, Path]]:
    """(arm, seed, folder) of every training run with metrics: pretrain (seed -1), then train/<arm>/seed<k>."""
    train = Path(run_dir) / "train"
    found = [("pretrain", -1, train / "pretrain")] if (train / "pretrain" / "metrics.jsonl").exists() else []
    for path in sorted(train.glob("*/seed*/metrics.jsonl")):
        found.append((path.parent.parent.name, int(path.parent.name[len("seed"):]), path.parent))
    return found


def training_curves(run_dir) -> pd.DataFrame:
    """Every training run's metrics.jsonl, with its arm and seed."""
    from .train import read_metrics

    frames = [read_metrics(d).assign(arm=arm, seed=seed) for arm, seed, d in _metric_dirs(run_dir)]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise FileNotFoundError(f"no metrics.jsonl under {run_dir}/train: run the training stage first")
    return pd.concat(frames, ignore_index=True)


def model_summary(run_dir) -> pd.DataFrame:
    """Per training run: parameters, trainable share, quantisation, what the target held, and the last losses
    (training: averaged over the last logging interval; held-out: over every held-out frame)."""
    rows = []
    for arm, seed, d in _metric_dirs(run_dir):
        path = d / "model" / "vla.json"
        if not path.exists():
            continue
        meta = read_json(path)
        p, m = meta.get("parameters", {}), meta.get("final_metrics", {})
        rows.append({"arm": arm, "seed": seed if seed >= 0 else "", "parameters": p.get("total"),
                     "trainable": p.get("trainable"), "trainable %": round(p.get("trainable_pct", 0), 2),
                     "quantization": meta.get("quantization", "none (fp32)"),
                     "rationale": ("none" if not meta.get("use_rationale") else
                                   f"{meta.get('rationale_position', 'before')}, dropout {meta.get('rationale_dropout', 0)}"),
                     "lambda_reason": meta.get("lambda_reason", 0.0), "steps": m.get("step"),
                     "L_action": m.get("l_action"), "held-out L_action": m.get("heldout_l_action"),
                     "held-out L_reasoning": m.get("heldout_l_reason")})
    return pd.DataFrame(rows).set_index(["arm", "seed"])


# ---------------------------------------------------------------------------------------- evaluation
def success_display(table: pd.DataFrame) -> pd.DataFrame:
    """The success table for reading: one row per arm, one column per split, "57% [42, 71] (29/50)"."""
    cell = lambda r: f"{100 * r.rate:.0f}% [{100 * r.ci_low:.0f}, {100 * r.ci_high:.0f}] ({r.successes}/{r.n})"
    wide = table.assign(cell=[cell(r) for r in table.itertuples()]).pivot(index="arm", columns="split", values="cell")
    wide = wide.reindex(list(dict.fromkeys(table["arm"])))
    seeds = table.groupby("arm", sort=False)["train_seeds"].max()
    wide.insert(0, "fine-tuning seeds", seeds.reindex(wide.index))
    wide.index = pd.Index([ARM_LABELS.get(a, a) for a in wide.index], name="arm")
    wide.columns.name = None
    return wide.fillna("")


def paired_display(paired: pd.DataFrame, reference: str = "baseline") -> pd.DataFrame:
    """The paired comparisons for reading: difference with its bootstrap interval, McNemar's p and the verdict."""
    ref = SHORT_LABELS.get(reference, reference)
    out = pd.DataFrame({
        "arm": [ARM_LABELS.get(a, a) for a in paired["arm"]], "split": paired["split"].str.replace("_", " "),
        "pairs": paired["n_pairs"],
        f"arm - {ref}": [f"{100 * d:+.0f} points [{100 * lo:+.0f}, {100 * hi:+.0f}]"
                           for d, lo, hi in zip(paired["diff"], paired["diff_low"], paired["diff_high"])],
        f"discordant ({ref} only / arm only)": [f"{b} / {c}" for b, c in zip(paired["b"], paired["c"])],
        "McNemar exact p": paired["p_value"].map(lambda p: f"{p:.3f}"), "verdict": paired["verdict"]})
    return out.set_index(["arm", "split"])


def conclusion(table: pd.DataFrame, paired: pd.DataFrame, competence: float = 0.6) -> str:
    """The results in words, written from the numbers whichever way they go: whether the baseline is competent
    (in distribution >= ``competence``; on the variant split between 15% and 85%), then each arm against it."""
    rate = lambda arm, split: table[(table["arm"] == arm) & (table["split"] == split)]
    lines = []
    base_in, base_var = rate("baseline", IN_DISTRIBUTION), rate("baseline", VARIANT)
    if len(base_in):
        r = base_in.iloc[0]
        ok = r.rate >= competence
        lines.append(f"The fine-tuned baseline succeeds in {100 * r.rate:.0f}% of in-distribution episodes "
                     f"({r.successes}/{r.n}, 95% interval {100 * r.ci_low:.0f}-{100 * r.ci_high:.0f}%): "
                     + ("competent, so a difference can show." if ok else
                        f"below the {100 * competence:.0f}% bar this study sets, so differences between arms are "
                        "not evidence about reasoning: read them as a diagnostic of this run only."))
    if len(base_var):
        r = base_var.iloc[0]
        inside = 0.15 <= r.rate <= 0.85
        lines.append(f"On the variant scenes it succeeds in {100 * r.rate:.0f}% ({r.successes}/{r.n}): "
                     + ("room for a difference either way." if inside else
                        "at a floor or ceiling, where a difference cannot show."))
    for row in paired.itertuples():
        what = ARM_LABELS.get(row.arm, row.arm)
        where = row.split.replace("_", " ")
        if row.verdict == "no resolvable difference":
            lines.append(f"{what} vs baseline, {where}: {100 * row.diff:+.0f} points (95% interval "
                         f"{100 * row.diff_low:+.0f} to {100 * row.diff_high:+.0f}, McNemar p = {row.p_value:.2f}): "
                         "no difference this run can resolve.")
        else:
            lines.append(f"{what} vs baseline, {where}: {100 * row.diff:+.0f} points (95% interval "
                         f"{100 * row.diff_low:+.0f} to {100 * row.diff_high:+.0f}, McNemar p = {row.p_value:.3f}): "
                         f"{row.verdict} than the baseline on the same episodes.")
    return "\n\n".join(f"- {x}" for x in lines)


def paper_results() -> pd.DataFrame:
    """The paper's reported figures (one row each, with their source)."""
    return pd.read_csv(PAPER_RESULTS)


# ---------------------------------------------------------------------------------------- reproducibility
def environment_info(repo_dir) -> pd.DataFrame:
    """Package versions, git commit and machine: what a reader needs to re-run this exact book."""
    from importlib.metadata import PackageNotFoundError, version

    rows = {}
    for pkg in ["refinevla", "torch", "transformers", "peft", "bitsandbytes", "robosuite", "mujoco", "datasets",
                "openai", "papermill", "jupyter-book", "numpy"]:
        try:
            rows[pkg] = version(pkg)
        except PackageNotFoundError:
            rows[pkg] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True).stdout.strip()
        rows["git commit"] = (commit or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        rows["git commit"] = "unknown"
    import os

    rows["python"] = platform.python_version()
    rows["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    try:
        import torch
        rows["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    except ImportError:
        pass
    return pd.DataFrame({"value": rows}).rename_axis("what")


# ---------------------------------------------------------------------------------------- pages
def tidy(df: pd.DataFrame, digits: int = 3, percent=()) -> pd.DataFrame:
    """A table for reading: float columns that hold whole numbers become integers (2, not 2.0), other floats are
    rounded to ``digits`` decimals, the ``percent`` columns (shares in [0, 1]) read "83%", and missing values are
    left blank; booleans and text stay as they are."""
    out = df.copy()
    for col in out.columns:
        values = out[col]
        if col in percent:
            out[col] = [f"{100 * float(v):.0f}%" if pd.notna(v) else "" for v in values]
        elif pd.api.types.is_float_dtype(values):
            finite = values.dropna()
            if len(finite) and np.isfinite(finite).all() and (finite == finite.round()).all():
                out[col] = values.round().astype("Int64")
            else:
                out[col] = values.round(digits)
    return out.astype(object).where(out.notna(), "")


def _interval(rate, lo, hi) -> str:
    return f"{100 * rate:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def headline_table(success: pd.DataFrame, paired: pd.DataFrame) -> pd.DataFrame:
    """Arms x splits: the success rate with its Wilson 95% interval and count, and the paired difference from the
    baseline on the same episodes (bootstrap 95% interval, McNemar's exact p)."""
    arms = list(dict.fromkeys(success["arm"]))
    splits = list(dict.fromkeys(success["split"]))
    rows = {}
    for arm in arms:
        row = {}
        for split in splits:
            where = split.replace("_", " ")
            s = success[(success["arm"] == arm) & (success["split"] == split)]
            p = paired[(paired["arm"] == arm) & (paired["split"] == split)]
            row[(where, "success [95% interval]")] = (
                f"{_interval(*s.iloc[0][['rate', 'ci_low', 'ci_high']])} ({s.iloc[0]['successes']}/{s.iloc[0]['n']})"
                if len(s) else "")
            row[(where, "minus baseline [95% interval], p")] = (
                f"{100 * p.iloc[0]['diff']:+.0f} [{100 * p.iloc[0]['diff_low']:+.0f}, "
                f"{100 * p.iloc[0]['diff_high']:+.0f}], p = {p.iloc[0]['p_value']:.2f}" if len(p) else
                ("(reference)" if arm == "baseline" else ""))
        rows[ARM_LABELS.get(arm, arm)] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out.rename_axis("arm")


def resolution_table(success: pd.DataFrame) -> pd.DataFrame:
    """Per arm: the episodes behind each of its rates and the smallest difference from another arm with as many
    episodes that a two-sided 5% test detects with 80% power (stats.detectable_difference)."""
    from .stats import detectable_difference

    n = success.groupby("arm", sort=False)["n"].min()
    return pd.DataFrame({"episodes per split": n.astype(int).to_numpy(),
                         "detectable difference (points)": [_points(detectable_difference(int(k))) for k in n]},
                        index=pd.Index([ARM_LABELS.get(a, a) for a in n.index], name="arm"))


def _points(d: float) -> str:
    return f"{100 * d:.0f}" if d <= 1 else "over 100: none"


def paper_claims() -> pd.DataFrame:
    """The paper's cited figures (refinevla/paper_results.csv), one readable row each."""
    p = paper_results()
    return pd.DataFrame({"benchmark": p["benchmark"], "setting": p["setting"], "claim": p["metric"],
                         "value": [f"{v:g}{'%' if u == 'percent' else ' ' + str(u)}" for v, u in
                                   zip(p["value"], p["unit"])],
                         "source": p["source"]}).set_index("benchmark")


def config_table(cfg) -> pd.DataFrame:
    """The resolved run config as one row per section: "field: value" pairs, compact enough to read at once."""
    def show(v):
        return json.dumps(v, separators=(", ", ": ")) if isinstance(v, (dict, list)) else str(v)

    rows = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            rows[section] = "; ".join(f"{k}: {show(v)}" for k, v in values.items())
        else:
            rows[section] = show(values)
    return pd.DataFrame({"settings": rows}).rename_axis("section")


def _png_tag(image, scale: int = 3, alt: str = "") -> str:
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(np.asarray(image, np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return (f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="{alt}" '
            f'width="{img.width}" height="{img.height}">')


def teacher_examples(ds, n: int = 4) -> str:
    """HTML: ``n`` key frames (where the teacher wrote a new rationale), spread over the dataset, each as the frame
    the teacher saw beside the four parts of its rationale."""
    import html

    from .schema import RATIONALE_PARTS

    cols = ds.select_columns(["task", "episode_index", "step_index", "rationale_source_step"])[:]
    keys = [i for i, (s, src) in enumerate(zip(cols["step_index"], cols["rationale_source_step"])) if s == src]
    picked = [keys[int(j)] for j in np.linspace(0, len(keys) - 1, min(n, len(keys)))] if keys else []
    blocks = []
    for i in picked:
        row = ds[i]
        try:
            parts = json.loads(row["rationale"]) if isinstance(row.get("rationale"), str) else dict(row["rationale"])
        except (TypeError, ValueError):
            parts = {}
        items = "".join(f"<dt>{p.replace('_', ' ')}</dt><dd>{html.escape(str(parts.get(p, '')))}</dd>"
                        for p in RATIONALE_PARTS) if parts else f"<dd>{html.escape(row['rationale_text'])}</dd>"
        image = np.asarray(row["image"].convert("RGB") if hasattr(row["image"], "convert") else row["image"])
        blocks.append(
            '<div class="rv-example">'
            f'<figure>{_png_tag(image, alt=row["instruction"])}<figcaption>{html.escape(row["task"])}, episode '
            f'{row["episode_index"]}, step {row["step_index"]}</figcaption></figure>'
            f'<div><p><strong>{html.escape(row["instruction"])}</strong></p><dl>{items}</dl></div></div>')
    return "".join(blocks) or "<p><em>No annotated frames.</em></p>"


#: Arms whose episodes the book shows first.
VIDEO_ARMS = ["refinevla", "baseline", "base", "oracle", "dropout", "after"]


def episode_videos(run_dir, max_bytes: int = 4_000_000) -> str:
    """HTML: one success and one failure per split (first fine-tuning seed, ReFineVLA first, then the baseline),
    from the GIFs the evaluation writes (evaluate/<arm>[/seed<k>]/videos/<task>_<split>_<success|failure>.gif);
    "" when the run has none."""
    import base64
    import html

    root = Path(run_dir) / "evaluate"
    found = sorted(root.glob("*/seed*/videos/*.gif")) + sorted(root.glob("*/videos/*.gif"))
    order = lambda p: (VIDEO_ARMS.index(_arm_of(p)) if _arm_of(p) in VIDEO_ARMS else 99, str(p))
    chosen: dict = {}
    for path in sorted(found, key=order):
        stem = path.stem
        outcome = stem.rsplit("_", 1)[-1]
        split = next((s for s in SPLITS if f"_{s}_" in f"_{stem}"), "")
        if outcome in ("success", "failure") and path.stat().st_size <= max_bytes:
            chosen.setdefault((split, outcome), path)
    cells = []
    for (split, outcome), path in sorted(chosen.items(), key=lambda kv: (kv[0][0], kv[0][1] != "success")):
        seed = path.parent.parent.name if path.parent.parent.name.startswith("seed") else ""
        caption = f"{_arm_of(path)}{', ' + seed if seed else ''}: {split.replace('_', ' ')}, {outcome}"
        data = base64.b64encode(path.read_bytes()).decode()
        cells.append(f'<figure class="rv-video"><img src="data:image/gif;base64,{data}" alt="{html.escape(caption)}">'
                     f'<figcaption>{html.escape(caption)}</figcaption></figure>')
    return f'<div class="rv-videos">{"".join(cells)}</div>' if cells else ""


def _arm_of(path: Path) -> str:
    return path.parent.parent.parent.name if path.parent.parent.name.startswith("seed") else path.parent.parent.name


def attention_views(run_dir, n: int = 4) -> dict:
    """What figures.plot_attention needs, from the attention stage's maps.npz and frames.csv and the annotated
    frames: {query: (frames, maps by model, titles, masks, notes)} for the stage's query (action tokens by
    default; the scores are of this one), then "rationale" (the rationale tokens' maps of the models that wrote
    one) when the stage kept them. The ``n`` frames are the first whose score is defined for every model."""
    import datasets

    from .attention import load_maps

    run_dir = Path(run_dir)
    saved = load_maps(run_dir / "attention" / "maps.npz")
    per_frame = pd.read_csv(run_dir / "attention" / "frames.csv", keep_default_na=False)
    defined = per_frame.groupby("frame_index", sort=False)["reason"].apply(lambda r: (r == "").all())
    index = list(saved["frame_index"])
    picks = [k for k, f in enumerate(index) if defined.get(f, False)][:n] or list(range(min(n, len(index))))
    ds = datasets.load_from_disk(str(run_dir / "annotate" / "dataset")).select([int(index[k]) for k in picks])
    frames = [np.asarray(r["image"].convert("RGB")) for r in ds]
    masks = [r.get("target_mask") for r in ds]
    titles = [f"{saved['instructions'][k]}\n(frame {index[k]})" for k in picks]
    lookup = per_frame.set_index(["model", "frame_index"])

    def note(model, k):
        rec = lookup.loc[(model, index[k])]
        return f"share {rec['share']:.2f}, lift {rec['lift']:.2f}" if rec["reason"] == "" else "undefined"

    query = saved["config"].get("query", "action")
    views = {query: (frames, {m: saved["maps"][m][picks] for m in saved["maps"]}, titles, masks,
                     {m: [note(m, k) for k in picks] for m in saved["maps"]})}
    rationale = {m: v[picks] for m, v in saved.get("rationale_maps", {}).items() if np.isfinite(v[picks]).any()}
    if rationale and query != "rationale":
        views["rationale"] = (frames, rationale, titles, masks, None)
    return views


def attention_table(scores: pd.DataFrame) -> pd.DataFrame:
    """The attention-on-target scores for reading: share and lift with their 95% intervals."""
    fmt = lambda v, lo, hi, pct: (("{:.1f}% [{:.1f}, {:.1f}]" if pct else "{:.2f} [{:.2f}, {:.2f}]")
                                  .format(*(x * (100 if pct else 1) for x in (v, lo, hi))) if v == v else "undefined")
    return pd.DataFrame({
        "model": scores["model"], "task": scores["task"], "frames": scores["n_frames"].astype(int),
        "undefined": scores["n_undefined"].astype(int),
        "share on target [95% interval]": [fmt(*r, True) for r in
                                           scores[["share", "share_ci_low", "share_ci_high"]].to_numpy()],
        "lift [95% interval]": [fmt(*r, False) for r in scores[["lift", "lift_ci_low", "lift_ci_high"]].to_numpy()],
        "target's share of the image": [f"{100 * v:.1f}%" if v == v else "" for v in scores["mask_share"]],
    }).set_index(["model", "task"])
