"""Write notebooks/*.ipynb from the cell texts below (outputs empty; run `python scripts/make_notebooks.py`).

The notebooks are the source of truth once written; this script exists so their shared parameters cell stays
identical across stages. Edit a notebook in JupyterLab or here, then regenerate.
"""
from pathlib import Path

import nbformat as nbf

PARAMETERS = '''\
# Parameters: Papermill (and `refinevla book -p KEY VALUE`) injects new values after this cell.
# None keeps the preset's value; every key is documented in refinevla/config.py.
preset = "default"        # smoke | default | paper  (refinevla/presets/*.yaml)
run = ""                  # run folder under data/ ("" = the preset's name)
overrides = {}            # any other key as "section.field": value, e.g. {"pretrain.lr": 3e-4}
dataset = None            # robosuite (default) | a LeRobot dataset id or local path (paper scale)
tasks = None              # e.g. "pick_cube" (the fine-tuning set and the evaluation)
demos_per_task = None     # scripted-expert demonstrations per task of the fine-tuning set
image_size = None         # camera resolution (pixels)
seed = None
teacher = None            # privileged | http (an OpenAI-compatible multimodal model)
base_url = None           # the HTTP teacher's endpoint; its API key is read from the environment only
teacher_model = None
model_size = None         # tiny16 | tiny | micro | bench50m (tiny scale)
action_chunk = None       # actions decoded per step of the policy (executed one per control step)
checkpoint = None         # a real PaliGemma checkpoint (paper scale) instead of the tiny model
quantization = None       # none | 8bit | 4bit (the fine-tuning base)
tune_top_k_layers = None  # LoRA adapters on the top K decoder layers only
lora_r = None
pretrain_steps = None
finetune_steps = None
lambda_reason = None      # weight of L_reasoning in L = L_action + lambda * L_reasoning
episodes_per_task = None  # closed-loop evaluation episodes per task, split and fine-tuning seed
seeds = None              # fine-tuning seeds, e.g. [0, 1, 2] (every arm starts from the same adapters per seed)
eval_splits = None        # in_distribution and/or variant (scenes never seen in training)
workers = None            # worker processes (demonstrations, evaluation)'''

SETUP = '''\
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from refinevla import config, pipeline, report

cfg = config.notebook_config(preset, run, globals(), overrides)
run_dir = cfg.run_dir
print(f"run folder: {run_dir}")'''

NOTEBOOKS = {
"01_data": [
("md", '''# Demonstrations

ReFineVLA fine-tunes a VLA that was pre-trained on a broad mixture (SpatialVLA: Open X-Embodiment) on a target set
annotated with rationales (BridgeData V2 and Fractal), and evaluates on the target tasks (SimplerEnv). The tiny
scale keeps that shape, with demonstrations we record in [robosuite](https://robosuite.ai) (MuJoCo, rendered
offscreen) from **scripted experts** that read the simulator's privileged state (object poses):

- **pre-training mixture** (the role of Open X-Embodiment): `pick_cube`, `lift` and `stack` episodes
  (`data.pretrain_mix`), action-only, on their own seeds;
- **fine-tuning set** (the role of Bridge / Fractal): `pick_cube` episodes on other seeds, which the teacher annotates;
  every tenth episode is held out of training to score a held-out loss;
- **evaluation** (the role of SimplerEnv): `pick_cube` on seeds no demonstration used, in the default scene and in
  *variant* scenes (other textures, lighting and a shifted camera) never seen in training.

`pick_cube` puts a red and a green cube anywhere within 8 cm; the instruction names the one to lift ("pick up the
green cube"), the other is a distractor, so what the instruction and the image say must reach the action. Each
frame keeps the wrist camera's `image`, the `state` (end-effector xyz, roll/pitch/yaw, gripper opening), the
7-D `action` (end-effector delta + gripper, 1 = open), the `instruction`, and privileged extras for the teacher
and the attention score: `objects` (poses), `phase` (what the expert was doing; the teacher does not read it) and
`target_mask` (where the named cube is in the image). Only successful expert episodes become demonstrations; the
same schema holds for the LeRobot copies of Bridge and Fractal at paper scale (see *Data sources*).'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''ds = pipeline.run_data(cfg)
ds'''),
("md", '''## The experts and what they recorded
Expert success rate per task (the demonstrations are only as good as the experts), episodes kept and frames:'''),
("code", '''report.demo_stats_table(run_dir)'''),
("md", "The pre-training mixture, on its own seeds:"),
("code", '''report.demo_stats_table(run_dir, "demos_pretrain") if (run_dir / "demos_pretrain").exists() else None'''),
("md", '''## The evaluation scenes
Fixed before any training: the first evaluation episodes of each split as the policy sees them. Variant scenes
change the table, floor and wall textures, the light and the camera pose (robosuite's texture, lighting and camera
modders), never the cubes.'''),
("code", '''images, titles = report.split_examples(cfg.evaluate, n=4)
report.plot_frames(images, titles, ncols=4, size=2.4);'''),
("md", "## What the policy sees\nThe first frame of each task, then (robosuite) the target-object mask the attention score uses:"),
("code", '''images, titles = report.first_frames_per_task(ds)
report.plot_frames(images, titles);
plt.show()
if "target_mask" in ds.column_names:  # robosuite only: a LeRobot dataset has no segmentation
    masks, _ = report.first_frames_per_task(ds, column="target_mask")
    report.plot_frames(masks, [f"target mask: {t.split(':')[0]}" for t in titles]);'''),
("md", '''## Actions
The action bins of the tokenizer (next stages) are cut between the 1st and 99th percentile of each dimension, so the
spread of each dimension matters. The experts do not rotate the gripper (roll, pitch, yaw stay 0).'''),
("code", '''report.plot_action_distributions(ds);'''),
],
"02_annotate": [
("md", '''# Teacher rationales

ReFineVLA's first stage asks an expert **teacher** to explain each action with a structured rationale in four
parts: *observation* (what is in the scene), *situation analysis* (where the task stands), *spatial reasoning*
(where things are relative to the gripper) and *task planning* (the next sub-goals). The paper used Gemini 2.0 on
~125k trajectories.

Two teachers are implemented behind one interface:
- the **privileged-state teacher** (default here, offline): writes the rationale from simulator state, so it is
  faithful by construction and deterministic;
- the **HTTP teacher**: any OpenAI-compatible multimodal endpoint (OpenAI, Gemini's compatible endpoint, vLLM,
  Ollama) via `base_url`, with a persistent cache, bounded concurrency, retries that honour `Retry-After`, cost
  accounting and a faithfulness check against privileged state. Its API key is read from an environment variable
  whose *name* is configured; the key never appears in a notebook, cache or this book. At paper scale
  (`annotate.batch: true`) the same requests go through the provider's **Batch API** instead (OpenAI, and Gemini
  through its OpenAI-compatible endpoint): JSONL files answered within a day at half the price, collected by the
  next run if this one stops waiting, into the same cache.'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''annotated = pipeline.run_annotate(cfg)
print(f"{len(annotated)} frames annotated by the {cfg.annotate.teacher} teacher")'''),
("md", "## Examples\nA few frames and the rationale the teacher wrote for them:"),
("code", '''from refinevla import teacher

for ex in teacher.examples(annotated, n=4):
    display(Markdown(f"**{ex['instruction']}** (task `{ex.get('task', '')}`, step {ex.get('step_index', '')})\\n\\n"
                     f"> {ex['rationale_text']}"))'''),
("md", "## Cost and provenance\nEvery annotation records its teacher, model, prompt version and input hash:"),
("code", '''import pandas as pd

cost = report.read_json(run_dir / "annotate" / "cost.json")
display(pd.Series({k: v for k, v in cost.items() if not isinstance(v, (dict, list))}, name="value").to_frame())
annotated.select_columns(["task", "step_index", "teacher", "teacher_model", "prompt_version", "input_hash"]).to_pandas().head()'''),
("code", '''lengths = pd.Series([len(t.split()) for t in annotated["rationale_text"]], name="words per rationale")
lengths.describe().to_frame()'''),
],
"03_finetune": [
("md", '''# Reasoning-aware fine-tuning

The paper fine-tunes a pre-trained VLA on the reasoning-enriched data with

$$\\mathcal{L} = \\mathcal{L}_{\\text{action}} + \\lambda\\,\\mathcal{L}_{\\text{reasoning}}$$

updating only the upper layers and the policy head ("selective transfer"). Here:

1. **The pre-trained VLA.** No model hub is reachable at the tiny scale, so our stand-in is a PaliGemma-architecture
   model (SigLIP vision tower + Gemma decoder, built from a config, tokenizer trained locally) **pre-trained
   action-only on the pre-training mixture**. At paper scale this step is skipped: `checkpoint` names a real model.
2. **Fine-tunes from that base on the annotated fine-tuning set**, each with the base in **4-bit** (nf4, bitsandbytes)
   and **LoRA adapters on the top K decoder layers** plus the policy-head rows of the target tokens:
   - *baseline*: target `ACTION: <actions>` (lambda = 0);
   - *ReFineVLA*: target `<rationale> ACTION: <actions>` with lambda > 0; it writes its rationale before acting;
   - two variants from ECoT-Lite (Chen et al., 2025, arXiv 2505.08243) that the paper does not run: *dropout*
     (half of the samples without their rationale; the policy acts without writing one) and *after* (the rationale
     follows the actions, so it only shapes the representation).

Each frame's target holds a chunk of the next `action_chunk` actions (SpatialVLA decodes chunks of 4), executed one
per control step. Every arm is fine-tuned on each seed in `study.seeds` (the extra arms on the first
`study.arm_seeds`); the same seed gives every arm the same adapter initialisation and the same frames in the same
order, so arms differ only in what they are trained on. Every tenth episode is held out: its loss is averaged over
all its frames.'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''models = pipeline.run_train(cfg)
print(f"{len(models)} fine-tunes: " + ", ".join(f"{arm} (seed {seed})" for arm, seed in models))'''),
("md", "## The models\nParameters, what was trained, and the last losses (training: averaged over the last logging interval):"),
("code", '''report.model_summary(run_dir)'''),
("md", "## Training curves"),
("code", '''curves = report.training_curves(run_dir)
report.plot_training_curves(curves);'''),
("md", '''## One prediction
The ReFineVLA policy (first seed) on a held-out frame: the rationale it writes, then its action, beside the teacher's
rationale and the expert's action.'''),
("code", '''import numpy as np
from refinevla.data import load_dataset_dir
from refinevla.policy import load_policy
from refinevla.train import split_heldout

frames = split_heldout(load_dataset_dir(run_dir / "annotate" / "dataset"), cfg.data.heldout_every)[1]
row = frames[len(frames) // 3]
policy = load_policy(models[("refinevla", cfg.study.seeds[0])])
rationale, action = policy.predict(np.asarray(row["image"]), row["instruction"], row["state"], reasoning=True)
display(Markdown(f"**instruction:** {row['instruction']}\\n\\n**model rationale:** {rationale or '(none)'}\\n\\n"
                 f"**teacher rationale:** {row['rationale_text']}"))
print("model action :", np.round(np.asarray(action).reshape(-1, 7)[0], 3))
print("expert action:", np.round(np.asarray(row["action"]), 3))'''),
],
"04_evaluate": [
("md", '''# Closed-loop evaluation

Closed-loop success is the paper's headline result (SimplerEnv). Here every arm runs `pick_cube` in robosuite on
fixed seeds that no demonstration used, on two splits fixed before training: **in distribution** (the default scene)
and **variant** (textures, lighting and camera pose never seen in training; SimplerEnv's "variant aggregation"
plays this role for the paper). Success is the named cube 4 cm above the table. All arms run the same episodes, so
they can be compared pair by pair. The arms:

- the **pre-trained base**, not fine-tuned (the first row: what fine-tuning adds);
- the **baseline** and **ReFineVLA** on every fine-tuning seed, pooled;
- **oracle**: the ReFineVLA model acting after the privileged teacher's rationale for the current state instead of its
  own (not deployable: it reads the simulator), i.e. what its actions are worth when its rationale is right;
- the ECoT-Lite variants **dropout** and **after**, which act without writing a rationale.

Episodes run in lockstep batches (several environments per worker, one batched forward pass per decoded token);
each episode is written as it ends, so a killed run resumes.'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''success = pipeline.run_evaluate(cfg)'''),
("md", "## Success rates\nPooled over fine-tuning seeds, with Wilson 95% intervals:"),
("code", '''report.success_display(success)'''),
("code", '''report.plot_success(success);'''),
("md", "## Episode strips\nA few frames of the first episode of each split, per arm (first seed):"),
("code", '''import numpy as np
from PIL import Image

for strip in sorted((run_dir / "evaluate").glob("*/seed*/strips/*.png"))[:8] + sorted((run_dir / "evaluate").glob("base/strips/*.png")):
    arm = strip.parts[-4] if strip.parts[-3].startswith("seed") else strip.parts[-3]
    report.plot_frames([np.asarray(Image.open(strip))], [f"{arm}: {strip.stem}"], size=6)
    plt.show()'''),
("md", "Every episode, with its arm and seeds (`evaluate/records.csv`; the first rows):"),
("code", '''import pandas as pd

pd.read_csv(run_dir / "evaluate" / "records.csv").head(8)'''),
],
"05_attention": [
("md", '''# Where the model looks

The paper argues that reasoning-aware fine-tuning shifts the policy's attention toward the objects the task is about,
and shows it as pictures. We show the pictures and measure it. For a fixed set of frames per task, each model
decodes its action; one teacher-forced forward pass then reads the attention from the positions that predict the
action tokens to the image patches (eager attention, averaged over heads, or rolled out across layers), reshaped to
the patch grid and upsampled to the frame.

The **attention-on-target score** is the share of that image attention falling inside the target object's
segmentation mask, and its lift over the mask's share of the image (1.0 = no preference).'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''import pandas as pd

scores = pipeline.run_attention(cfg)'''),
("md", "## Baseline vs ReFineVLA over the same frames"),
("code", '''from PIL import Image

plt.figure(figsize=(12, 8))
plt.imshow(Image.open(run_dir / "attention" / "overlays.png"))
plt.axis("off");'''),
("md", "## Attention-on-target score\nMean over frames with a 95% interval; frames where the target is not visible are counted as undefined:"),
("code", '''scores'''),
("md", '''## Open loop: the action after the model's own rationale vs after the teacher's

Over the same frames (taken from the training demonstrations, so this measures what was learned, not how it
generalises), each decoded action is compared with the expert's: the mean distance in bins over the six arm
dimensions (255 bins per dimension) and how often the gripper command (open or close) agrees: the baseline acts
directly, the ReFineVLA model after the rationale it writes itself. The ReFineVLA model is then also made to act
after the *teacher's* rationale instead of its own (the last two columns). If its actions are much closer to the expert's
after the teacher's rationale than after its own, it is the rationale the model writes, not its action head, that
costs it in closed loop: the policy then acts on its own imperfect explanations (exposure bias).'''),
("code", '''from refinevla.attention import open_loop_table

open_loop_table(pd.read_csv(run_dir / "attention" / "frames.csv")).rename(columns={
    "arm_bin_error": "arm error (bins)", "gripper_agrees": "gripper agrees",
    "teacher_rationale_arm_bin_error": "arm error after the teacher's rationale",
    "teacher_rationale_gripper_agrees": "gripper agrees after the teacher's rationale"})'''),
("code", '''frames = pd.read_csv(run_dir / "attention" / "frames.csv", keep_default_na=False)
own = frames[frames["model"] == "refinevla"].head(3)
for _, f in own.iterrows():
    display(Markdown(f"**{f['instruction']}** (step {f['step_index']}): the model wrote *{f['rationale'] or '(nothing)'}*"))'''),
],
"06_results": [
("md", '''# Results

Does reasoning-aware fine-tuning help? The paper says yes, most in visually varied settings. This chapter answers at
the tiny scale, with the numbers of this run only. It is not the paper's experiment: a ~2M-parameter stand-in
pre-trained here, a privileged-state teacher, robosuite instead of SimplerEnv. What carries over is the method and
the comparison *within* the setting: every arm from the same base, on the same data, from the same initialisation
per seed, on the same evaluation episodes.'''),
("params", PARAMETERS), ("code", SETUP),
("md", "## What the run could resolve, stated before its numbers\nFrom the configuration alone: episodes per arm and split, and the smallest difference in success rate a two-sided test at 5% detects with 80% power (unpaired normal approximation, worst case p = 0.5; the paired test does at least as well):"),
("code", '''import pandas as pd
from refinevla.stats import detectable_difference

n_main = cfg.evaluate.episodes_per_task * len(cfg.evaluate.tasks) * len(cfg.study.seeds)
n_extra = cfg.evaluate.episodes_per_task * len(cfg.evaluate.tasks) * max(1, cfg.study.arm_seeds)
pd.DataFrame({"episodes per split": [n_main, n_extra],
              "detectable difference": [f"{100 * detectable_difference(n):.0f} points" for n in (n_main, n_extra)]},
             index=["baseline, ReFineVLA", "base, oracle, other arms"])'''),
("md", "## The gate: can the reasoning policy write its rationale?\nBefore reading its closed-loop result: the ReFineVLA model's greedy rationale on held-out frames, part by part, against the teacher's:"),
("code", '''from refinevla import diagnostics

path = run_dir / "evaluate" / "rationale_accuracy.csv"
if path.exists():
    checks = pd.read_csv(path)
    display(checks.groupby("train_seed").apply(diagnostics.accuracy_summary).round(2))
    display(Markdown(diagnostics.gate(checks)[1]))
    display(checks[["model", "teacher"]].head(3))
else:
    print("No reasoning arm was evaluated in this run.")'''),
("md", "## Success per arm and split"),
("code", '''success = pd.read_csv(run_dir / "evaluate" / "success.csv")
report.success_display(success)'''),
("code", '''report.plot_success(success);'''),
("md", "## Each arm against the baseline, episode by episode\nSame fine-tuning seed, split, task and episode seed; the difference with a paired bootstrap 95% interval, and McNemar's exact test on the episodes where exactly one of the two succeeded:"),
("code", '''paired = pd.read_csv(run_dir / "evaluate" / "paired.csv")
report.paired_display(paired)'''),
("md", "## Conclusion\nWritten from the tables above by `report.conclusion` (the same sentences whichever way the numbers go):"),
("code", '''display(Markdown(report.conclusion(success, paired)))'''),
("md", "## What the paper reports\nHeadline figures from the abstracts (per-task tables: see the paper):"),
("code", '''report.paper_results()'''),
("md", "## Attention on the target\nShare of image attention on the named cube, over the same frames (see the attention chapter):"),
("code", '''pd.read_csv(run_dir / "attention" / "scores.csv")'''),
("md", "## Where the time went\nWall time of every stage of this run (from its completion marker; a stage skipped as up to date keeps the time it took when it ran):"),
("code", '''pipeline.stage_times(cfg)'''),
("md", "## Benchmarks\nSpeed and memory figures from `benchmarks/` (run by hand with `make bench`; results of the last run):"),
("code", '''bench = report.benchmark_results(".")
if not bench:
    print("No benchmark results yet: run `make bench`.")
for name, table, note in report.benchmark_tables(bench):
    display(Markdown(f"**{name}**: {note}"))
    display(table)'''),
("md", "## Reproducibility\nThe package versions, commit and machine of this run, then its full resolved configuration:"),
("code", '''report.environment_info(".")'''),
("code", '''import yaml

print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))'''),
],
}


def cell(kind, text):
    if kind == "md":
        return nbf.v4.new_markdown_cell(text)
    c = nbf.v4.new_code_cell(text)
    if kind == "params":
        c.metadata["tags"] = ["parameters"]
    return c


def main():
    out = Path(__file__).resolve().parent.parent / "notebooks"
    out.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = nbf.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (refinevla)", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nb.cells = [cell(k, t) for k, t in cells]
        for i, c in enumerate(nb.cells):
            c["id"] = f"{name}-{i:02d}"
        nbf.write(nb, out / f"{name}.ipynb")
    print(f"wrote {len(NOTEBOOKS)} notebooks to {out}")


if __name__ == "__main__":
    main()
