"""Tables and figures for the book, read only from a run folder (every number printed comes from a run)."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

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
        ax.imshow(np.asarray(img), cmap="gray" if np.asarray(img).ndim == 2 else None)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def split_examples(ecfg, n: int = 3) -> tuple[list, list]:
    """The first frame of the first ``n`` evaluation episodes of each split (robosuite), as the policy sees them."""
    from .scenes import describe_split
    from .sim import make_task

    images, titles = [], []
    for split in ecfg.splits:
        env = make_task(ecfg.tasks[0], image_size=ecfg.image_size, segmentation=False, camera=ecfg.camera, split=split)
        for seed in ecfg.seed_list(split)[:n]:
            obs = env.reset(seed)
            images.append(obs["image"])
            titles.append(f"{split.replace('_', ' ')}, seed {seed}\n{obs['instruction']}")
        env.close()
        print(f"{split}: {describe_split(split)}")
    return images, titles


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


def plot_action_distributions(ds, max_rows: int = 5000):
    """Histograms of the 7 action dimensions per task (what the action bins must cover)."""
    import matplotlib.pyplot as plt
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


def plot_training_curves(curves: pd.DataFrame):
    """Linear axes: the action loss of every fine-tune (one colour per arm, one line style per seed; markers at the
    held-out losses), and the reasoning loss where rationales are in the target. Pre-training is drawn apart:
    its scale and length differ, and the fine-tunes all start from its end."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    styles = ["-", "--", ":", "-."]
    colours = dict(zip(curves["arm"].unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for (arm, seed), g in curves.groupby(["arm", "seed"], sort=False):
        ax = axes[0] if arm == "pretrain" else axes[1]
        kw = dict(color=colours[arm], linestyle=styles[max(seed, 0) % len(styles)], lw=1.2,
                  label=arm if seed <= 0 else f"{arm} (seed {seed})")
        ax.plot(g["step"], g["l_action"], **kw)
        if "heldout_l_action" in g:
            h = g.dropna(subset=["heldout_l_action"])
            ax.plot(h["step"], h["heldout_l_action"], "o", color=colours[arm], ms=4)
        if arm != "pretrain" and (g["l_reason"] > 0).any():
            axes[2].plot(g["step"], g["l_reason"], **kw)
    axes[0].set(title="pre-training: L_action", xlabel="step", ylabel="cross-entropy")
    axes[1].set(title="fine-tunes: L_action (dots: held-out)", xlabel="step")
    axes[2].set(title="fine-tunes: L_reasoning", xlabel="step")
    for ax in axes:
        ax.set_ylim(bottom=0)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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
                     "lambda": meta.get("lambda_reason", 0.0), "steps": m.get("step"),
                     "L_action": m.get("l_action"), "held-out L_action": m.get("heldout_l_action"),
                     "held-out L_reasoning": m.get("heldout_l_reason")})
    return pd.DataFrame(rows).set_index(["arm", "seed"])


# ---------------------------------------------------------------------------------------- evaluation
ARM_LABELS = {"base": "pre-trained base (no fine-tune)", "baseline": "baseline (lambda = 0)",
              "refinevla": "ReFineVLA (rationale, then action)", "oracle": "ReFineVLA on the teacher's rationale",
              "dropout": "reasoning dropout, acts directly", "after": "rationale after the action"}


def plot_success(table: pd.DataFrame):
    """Success rate of every arm on every split as points with Wilson 95% intervals (stats.success_table); an
    interval stays visible at 0% and 100%."""
    import matplotlib.pyplot as plt

    arms, splits = list(dict.fromkeys(table["arm"])), list(dict.fromkeys(table["split"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(arms) + 2), 3.4))
    for j, split in enumerate(splits):
        g = table[table["split"] == split].set_index("arm").reindex(arms)
        x = np.arange(len(arms)) + (j - (len(splits) - 1) / 2) * 0.25
        err = np.vstack([g["rate"] - g["ci_low"], g["ci_high"] - g["rate"]]).clip(min=0)
        ax.errorbar(x, g["rate"], yerr=err, fmt="o", capsize=4, label=split.replace("_", " "))
        for xi, (k, n) in zip(x, zip(g["successes"], g["n"])):
            if n == n:  # not NaN
                ax.annotate(f"{int(k)}/{int(n)}", (xi, -0.02), ha="center", va="top", fontsize=7)
    ax.set_xticks(np.arange(len(arms)), arms)
    ax.set(ylim=(-0.12, 1.05), ylabel="success rate", title="Closed-loop success, Wilson 95% intervals")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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


def paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons for reading: difference with its bootstrap interval, McNemar's p and the verdict."""
    out = pd.DataFrame({
        "arm": [ARM_LABELS.get(a, a) for a in paired["arm"]], "split": paired["split"].str.replace("_", " "),
        "pairs": paired["n_pairs"],
        "arm - baseline": [f"{100 * d:+.0f} points [{100 * lo:+.0f}, {100 * hi:+.0f}]"
                           for d, lo, hi in zip(paired["diff"], paired["diff_low"], paired["diff_high"])],
        "discordant (baseline only / arm only)": [f"{b} / {c}" for b, c in zip(paired["b"], paired["c"])],
        "McNemar exact p": paired["p_value"].map(lambda p: f"{p:.3f}"), "verdict": paired["verdict"]})
    return out.set_index(["arm", "split"])


def conclusion(table: pd.DataFrame, paired: pd.DataFrame, competence: float = 0.6) -> str:
    """The results in words, written from the numbers whichever way they go: whether the baseline is competent
    (in distribution >= ``competence``; on the variant split between 15% and 85%), then each arm against it."""
    rate = lambda arm, split: table[(table["arm"] == arm) & (table["split"] == split)]
    lines = []
    base_in, base_var = rate("baseline", "in_distribution"), rate("baseline", "variant")
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


# ---------------------------------------------------------------------------------------- benchmarks
def benchmark_results(repo_dir) -> dict:
    """Every benchmarks/results/*.json present (benchmarks are run by hand: `make bench`)."""
    out = {}
    for path in sorted((Path(repo_dir) / "benchmarks" / "results").glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def benchmark_tables(results: dict) -> list[tuple[str, pd.DataFrame, str]]:
    """(title, table, note) for each benchmark result: the measured figures beside their targets, in words a
    reader can check; a benchmark this function does not know is shown as its flattened JSON."""
    out = []
    for name, r in results.items():
        when = f"measured {r.get('when', '?')} on {_machine(r.get('machine'))}"
        if name == "annotate_throughput":
            rows = pd.DataFrame(r["cold"] + r.get("cold_realistic_latency", []))
            cols = {"latency_s": "latency (s)", "concurrency": "concurrency", "requests": "requests",
                    "requests_per_s": "requests/s", "ideal_per_s": "ideal/s", "ratio": "ratio to ideal",
                    "client_cpu_ms_per_request": "client CPU ms/request",
                    "server_cpu_ms_per_request": "server CPU ms/request", "cpu_ceiling_per_s": "CPU ceiling/s"}
            table = rows[[c for c in cols if c in rows]].rename(columns=cols)
            note = (f"HTTP teacher against a local server with a fixed latency; target ratio >= {r['target_ratio']}. "
                    f"CPU ceiling = cores x 1000 / (client + server CPU ms per request)."
                    + (f" Bare openai SDK call: {r['cached']['sdk_cpu_ms_per_request']} ms CPU per request."
                       if "sdk_cpu_ms_per_request" in r.get("cached", {}) else "")
                    + f" Cached re-run: {r['cached']['rows_per_s']:.0f} rows/s (0 requests); privileged teacher: "
                    f"{r['privileged']['rows_per_s']:.0f} rows/s"
                    + (f"; Batch API path, client side: {r['batch_api']['rows_per_s']:.0f} rows/s"
                       if "batch_api" in r else "") + f". {when}.")
        elif name == "train_memory_speed" and "summary" in r:
            table = pd.DataFrame(r["summary"])
            note = (f"LoRA on an fp32 base vs on the same base in 4-bit (nf4), {r['model']['parameters'] / 1e6:.0f}M "
                    f"parameters, CPU; peak = resident memory above the pre-load baseline; target 4-bit peak <= "
                    f"{r.get('target_peak_ratio', 0.4)} x fp32. {when}.")
        elif name == "eval_overhead":
            table = pd.DataFrame({"value": {
                "bare step + render loop (steps/s)": round(r["raw_steps_per_s"], 1),
                "evaluation harness (steps/s)": round(r["harness_steps_per_s"], 1),
                "harness overhead (wall)": f"{r['overhead']:+.1%}",
                "harness overhead (CPU)": f"{r['overhead_cpu']:+.1%}"}})
            note = (f"Closed-loop harness vs a bare robosuite loop, {r['task']}, {r['episodes']} episodes x "
                    f"{r['repeats']} repeats at {r['image_size']} px; target overhead <= 10%. {when}.")
        elif name == "finetune_cache":
            m = r["summary"]
            table = pd.DataFrame({"value": {
                "uncached step (s)": m["uncached_step_s"], "cached step (s)": m["cached_step_s"],
                "cached / uncached": m["ratio_cached_over_uncached"],
                "previous tied-head step (s)": m.get("tied_uncached_step_s"),
                "cache build (ms per row)": m["cache_build_ms_per_row"], "break-even (steps)": m["break_even_steps"]}})
            note = (f"Fine-tune step with the frozen part cached vs computed at every step ({r['size']}, "
                    f"{r['quantization']}, top {r['settings']['top_k_layers']} of {r['settings']['decoder_layers']} "
                    f"layers, batch {r['settings']['batch']}); target cached / uncached <= {m['target_ratio']}. "
                    f"Measured {r.get('date', '?')}.")
        elif name == "eval_throughput":
            rows = {k: {"env steps/s in episodes": round(v["in_episode_steps_per_s"], 1),
                        "ratio to the bare loop": round(v["ratio_in_episode"], 2),
                        "env steps/s, whole run": round(v["steps_per_s"], 1),
                        "envs per worker": v.get("envs_per_worker", 1)} for k, v in r["runs"].items()}
            table = pd.DataFrame(rows).T
            note = (f"Closed-loop throughput on {r['task']} ({r['workers']} workers, {r['image_size']} px, "
                    f"{r['episodes']} episodes x {r['max_steps']} steps, an untrained {r['model']['size']} VLA): "
                    f"the bare step + render loop against the harness with the baseline (acts directly) and a reasoning "
                    f"policy, one or four environments per worker; target >= 0.7 of the bare loop for the baseline. "
                    f"Measured {r.get('when', '?')}.")
        elif name == "threads":
            table = pd.DataFrame(r["rows"]).set_index("setting")
            note = (f"Pre-training step ({r['model']}) per torch thread setting, idle and beside one busy process "
                    f"(normal priority and nice 19); target: contended / idle <= {r['target_ratio']}. {when}.")
        else:
            table = pd.json_normalize(r, sep=".").T.rename(columns={0: "value"})
            note = when
        out.append((name, table, note))
    return out


def _machine(m) -> str:
    if not isinstance(m, dict):
        return "an unrecorded machine"
    cpus = m.get("cpus") or m.get("cpu_count")
    return f"{cpus} CPU cores" if cpus else "this machine"


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
