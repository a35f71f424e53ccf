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
tasks = None              # e.g. "lift,stack" (data and evaluation)
demos_per_task = None     # scripted-expert demonstrations per task
image_size = None         # camera resolution (pixels)
seed = None
teacher = None            # privileged | http (an OpenAI-compatible multimodal model)
base_url = None           # the HTTP teacher's endpoint; its API key is read from the environment only
teacher_model = None
model_size = None         # tiny | micro | bench50m (tiny scale)
checkpoint = None         # a real PaliGemma checkpoint (paper scale) instead of the tiny model
quantization = None       # none | 8bit | 4bit (the fine-tuning base)
tune_top_k_layers = None  # LoRA adapters on the top K decoder layers only
lora_r = None
pretrain_steps = None
finetune_steps = None
lambda_reason = None      # weight of L_reasoning in L = L_action + lambda * L_reasoning
episodes_per_task = None  # closed-loop evaluation episodes per task
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

ReFineVLA starts from robot demonstrations: camera frames, the robot's proprioceptive state, a language
instruction and the action taken. The paper uses BridgeData V2 and Fractal (RT-1). At the tiny scale we make our own
in [robosuite](https://robosuite.ai) (MuJoCo, rendered offscreen): a **scripted expert** per task reads the simulator's
privileged state (object poses) and drives the Panda arm with an operational-space controller. Each frame keeps

- `image`: the agent-view camera (RGB, upright), `state`: end-effector xyz + roll/pitch/yaw + gripper opening,
- `action`: the 7-D end-effector delta + gripper command (1 = open), `instruction`,
- privileged extras the teacher and the attention score use: `objects` (poses), `phase` (what the expert is doing),
  `target_mask` (where the target object is in the image, from the segmentation camera).

Only successful expert episodes become demonstrations. The same schema holds for the LeRobot copies of Bridge and
Fractal at paper scale (see *Data sources*).'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''ds = pipeline.run_data(cfg)
ds'''),
("md", '''## The experts and what they recorded
Expert success rate per task (the demonstrations are only as good as the experts), episodes kept and frames:'''),
("code", '''report.demo_stats_table(run_dir)'''),
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

updating only the upper layers ("selective transfer"). Here:

1. **The pre-trained VLA.** No model hub is reachable at the tiny scale, so our stand-in is a PaliGemma-architecture
   model (SigLIP vision tower + Gemma decoder, built from a config, random init, tokenizer trained locally) that we
   first **pre-train action-only** on the demonstrations. At paper scale this step is skipped: `checkpoint` names a
   real PaliGemma 2 model.
2. **Two fine-tunes from that base**, both with the base loaded in **4-bit** (nf4, double quantisation,
   bitsandbytes) and **LoRA adapters on the top K decoder layers only** (the vision tower and lower layers frozen):
   - *baseline*: target `ACTION: <7 action tokens>`, i.e. lambda = 0;
   - *ReFineVLA*: target `<rationale> ACTION: <7 action tokens>` with lambda > 0.

The image and prompt form PaliGemma's bidirectional prefix (`token_type_ids` = 0); every target token has
`token_type_ids` = 1, so targets are causal and never see the future (see *Method*).'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''models = pipeline.run_train(cfg)
models'''),
("md", "## The models\nParameters, what was trained, and the final losses:"),
("code", '''report.model_summary(run_dir)'''),
("md", "## Training curves\nL_action for all three runs; L_reasoning only where the rationale is in the target:"),
("code", '''curves = report.training_curves(run_dir)
report.plot_training_curves(curves);'''),
("md", '''## One prediction
The fine-tuned ReFineVLA policy on a training frame: the rationale it writes, then the action it decodes (greedy,
restricted to action-bin tokens after `ACTION:`), beside the expert's action.'''),
("code", '''import numpy as np
from refinevla.data import load_dataset_dir
from refinevla.policy import load_policy

frames = load_dataset_dir(run_dir / "annotate" / "dataset")
row = frames[len(frames) // 3]
policy = load_policy(models["refinevla"])
rationale, action = policy.predict(np.asarray(row["image"]), row["instruction"], row["state"], reasoning=True)
display(Markdown(f"**instruction:** {row['instruction']}\\n\\n**model rationale:** {rationale or '(none)'}\\n\\n"
                 f"**teacher rationale:** {row['rationale_text']}"))
print("model action :", np.round(action, 3))
print("expert action:", np.round(np.asarray(row["action"]), 3))'''),
],
"04_evaluate": [
("md", '''# Closed-loop evaluation

Success rate in closed loop is the paper's headline result (SimplerEnv). At the tiny scale both fine-tuned
policies run in robosuite on a fixed list of seeds per task that no demonstration used; success is the
environment's own check. Every episode is written to `episodes.jsonl` as it ends (a re-run skips finished ones);
rates come with Wilson 95% intervals, which are wide at these episode counts: read them before reading a
difference. At paper scale the same harness drives SimplerEnv (see *SimplerEnv*).

With `evaluate.teacher_rationale: true` (robosuite only) a third policy is run: the ReFineVLA model acting after
the **privileged teacher's rationale** for the current state instead of its own (`refinevla_teacher_rationale`).
It is an oracle, not a deployable policy: it shows in closed loop what the model's actions are worth when its
rationale is right, and so how much of any gap to the baseline the model's own rationales cause.'''),
("params", PARAMETERS), ("code", SETUP),
("code", '''summaries = pipeline.run_evaluate(cfg)'''),
("md", "## Success rates\nOne row per task and the average (the paper's table shape), per model, with 95% intervals:"),
("code", '''from refinevla.evaluate import compare_table

compare_table(summaries, ci=True)'''),
("code", '''report.plot_success(summaries);'''),
("md", "## Episode strips\nA few frames of the first evaluation episode of each task, per model:"),
("code", '''import numpy as np
from PIL import Image

for variant in summaries:
    for strip in sorted((run_dir / "evaluate" / variant / "strips").glob("*.png")):
        fig = report.plot_frames([np.asarray(Image.open(strip))], [f"{variant}: {strip.stem}"], size=6)
        plt.show()'''),
("md", "Per-episode records (the first rows):"),
("code", '''import pandas as pd
from refinevla.evaluate import read_records

pd.DataFrame(read_records(run_dir / "evaluate" / "refinevla" / "episodes.jsonl")).head(10)'''),
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
dimensions (256 bins per dimension) and how often the gripper command (open or close) agrees: the baseline acts
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

The paper's reported figures beside ours. They are not the same experiment: the paper fine-tunes a ~3.5B
pre-trained VLA on ~125k real trajectories annotated by Gemini and evaluates in SimplerEnv; this run fine-tunes a
tiny stand-in on a few dozen simulated demonstrations annotated by a privileged-state teacher and evaluates in
robosuite. What carries over is the method and the comparison *within* each setting: baseline vs ReFineVLA from the
same base, same data, same seeds.'''),
("params", PARAMETERS), ("code", SETUP),
("md", "## What the paper reports\nHeadline figures from the abstracts (per-task tables: see the paper):"),
("code", '''report.paper_results()'''),
("md", "## What this run measured"),
("code", '''import pandas as pd
from refinevla.evaluate import compare_table, read_records, summarise

summaries = {v: summarise(read_records(run_dir / "evaluate" / v / "episodes.jsonl"), tasks=list(cfg.evaluate.tasks))
             for v in pipeline.evaluated_variants(cfg)}
compare_table(summaries, ci=True)'''),
("code", '''report.plot_success(summaries);'''),
("code", '''pd.read_csv(run_dir / "attention" / "scores.csv")'''),
("md", "## Benchmarks\nSpeed and memory figures from `benchmarks/` (run by hand with `make bench`; results of the last run):"),
("code", '''bench = report.benchmark_results(".")
if not bench:
    print("No benchmark results yet: run `make bench`.")
for name, table, note in report.benchmark_tables(bench):
    display(Markdown(f"**{name}**: {note}"))
    display(table)'''),
("md", "## Reproducibility\nThe package versions, commit and machine of this run, then its full resolved configuration:"),
("code", '''report.environment_info(".")'''),
("code", '''print((run_dir / "evaluate" / "refinevla" / "config.yaml").read_text())'''),
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
