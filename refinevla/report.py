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
def demo_stats_table(run_dir) -> pd.DataFrame:
    """Per task: expert episodes, successes, success rate, frames kept."""
    stats = read_json(Path(run_dir) / "demos" / "stats.json")
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
def training_curves(run_dir, variants=("pretrain", "baseline", "refinevla")) -> pd.DataFrame:
    from .train import read_metrics

    frames = []
    for v in variants:
        m = read_metrics(Path(run_dir) / "train" / v)
        if len(m):
            frames.append(m.assign(variant=v))
    if not frames:
        raise FileNotFoundError(f"no metrics.jsonl under {run_dir}/train: run the fine-tune stage first")
    return pd.concat(frames, ignore_index=True)


def plot_training_curves(curves: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for variant, g in curves.groupby("variant", sort=False):
        axes[0].plot(g["step"], g["l_action"], label=variant)
        if (g["l_reason"] > 0).any():
            axes[1].plot(g["step"], g["l_reason"], label=variant)
    axes[0].set(title="L_action (cross-entropy over the 7 action tokens)", xlabel="step", yscale="log")
    axes[1].set(title="L_reasoning (cross-entropy over rationale tokens)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def model_summary(run_dir, variants=("pretrain", "baseline", "refinevla")) -> pd.DataFrame:
    """Parameters, trainable share, quantisation and final losses of each trained model."""
    rows = []
    for v in variants:
        path = Path(run_dir) / "train" / v / "model" / "vla.json"
        if not path.exists():
            continue
        meta = read_json(path)
        p, m = meta.get("parameters", {}), meta.get("final_metrics", {})
        rows.append(dict(model=v, parameters=p.get("total"), trainable=p.get("trainable"),
                         trainable_pct=round(p.get("trainable_pct", 0), 2),
                         quantization=meta.get("quantization", "none (fp32)"),
                         lambda_reason=meta.get("lambda_reason", 0.0),
                         final_l_action=m.get("l_action"), final_l_reason=m.get("l_reason"),
                         steps=m.get("step")))
    return pd.DataFrame(rows).set_index("model")


# ---------------------------------------------------------------------------------------- evaluation
def plot_success(summaries: dict):
    """Bars of success rate per task and model with Wilson 95% intervals ({model: evaluate.summarise frame})."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    models = list(summaries)
    tasks = list(next(iter(summaries.values())).index)
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        g = summaries[model].reindex(tasks)
        x = np.arange(len(tasks)) + i * width
        err = np.vstack([g["success_rate"] - g["ci_low"], g["ci_high"] - g["success_rate"]]).clip(min=0)
        ax.bar(x, g["success_rate"], width, yerr=err, capsize=3, label=model)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(models) - 1) / 2, tasks)
    ax.set(ylim=(0, 1.05), ylabel="success rate", title="Closed-loop success (Wilson 95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
