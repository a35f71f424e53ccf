"""The book's benchmark tables: every ``benchmarks/results/*.json`` (written by the scripts in ``benchmarks/``, run by
hand with ``make bench``) as a table of its measured figures beside their targets, with a note saying what was
measured, how and when."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def read_results(repo_dir) -> dict:
    """Every benchmarks/results/*.json present (benchmarks are run by hand: `make bench`)."""
    out = {}
    for path in sorted((Path(repo_dir) / "benchmarks" / "results").glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def tables(results: dict) -> list[tuple[str, pd.DataFrame, str]]:
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
                    f"policy, with {' / '.join(str(n) for n in sorted({v.get('envs_per_worker', 1) for v in r['runs'].values()}))} "
                    f"environments per worker; target >= 0.7 of the bare loop for the baseline. "
                    f"Measured {r.get('when', '?')}.")
        elif name == "threads":
            table = pd.DataFrame(r["rows"]).set_index("setting")
            note = (f"Pre-training step ({r['model']}) per torch thread setting, idle and beside one busy process "
                    f"(normal priority and nice 19); target: contended / idle <= {r['target_ratio']}. {when}.")
        elif name == "grounding":
            rows = [{"mode": "readout", "model": x["checkpoint"], "question": x["question"], "steps": 0,
                     "accuracy": x["side_accuracy"], "pairs right": x["pair_side_consistency"],
                     "within 1 cm": x["within_1cm"], "MAE x / y / z (cm)": " / ".join(f"{v:.2f}" for v in x["mae_cm"]),
                     "spread": f"{x['spread']:.3f}",
                     "accuracy by distance to the side": _by_distance(x.get("by_distance", {})),
                     "image features, linear probe": (
                         f"{x['feature_probe']['side_accuracy']:.2f} ({_by_distance(x['feature_probe']['by_distance'])})"
                         if x.get("feature_probe") else ""),
                     "with another frame's state": ", ".join(f"{k} {v['side_accuracy']:.2f}" for k, v in
                                                            x.get("state_swaps", {}).items() if k != "true")}
                    for x in r.get("readout", [])]
            rows += [{"mode": "train", "model": x["init"], "question": x["question"], "steps": x["steps"],
                      "accuracy": x["accuracy"], "pairs right": x["pairs_right"], "within 1 cm": None,
                      "MAE x / y / z (cm)": "", "spread": f"{x['spread_start']:.3f} -> {x['spread_end']:.3f}",
                      "accuracy by step": ", ".join(f"{c['step']}: {c['accuracy']:.2f}" for c in x["curve"])}
                     for x in r.get("train", [])]
            ceiling = r.get("ceiling") or {}
            rows += [{"mode": "ceiling", "model": f"no model: {x['inputs']}", "question": "side", "steps": 0,
                      "accuracy": x["side_accuracy"], "accuracy by distance to the side": _by_distance(x["by_distance"])}
                     for x in ceiling.get("fits", {}).values()]
            table = pd.DataFrame(rows)
            s, held = r["settings"], r["frames"]["heldout"]
            note = (f"Grounding on {held['usable']} held-out {r['task']} frames (seeds {held['seeds'][0]}-"
                    f"{held['seeds'][1]}, arm moved by N(0, {s['arm_noise_rad']}) rad), each asked about both cubes "
                    f"(pairs right: both answers of a frame right; the cubes lie on different sides of the gripper "
                    f"in {held['cubes_on_different_sides']:.0%} of them). Readout: greedy answers to 'where is the "
                    f"<object>', accuracy = the side (left / right of the gripper), also per distance of the object to the "
                    f"side (questions in brackets), MAE per axis; image features, linear probe: a logistic regression per cube on "
                    f"the image features the decoder reads, fitted on the training frames (is the side in the features "
                    f"at all?); with another frame's state: the accuracy when each frame is asked about with the "
                    f"position, the orientation or the whole state of another frame (does the model read them?). "
                    f"Train: the whole "
                    f"model, {s['steps']} steps at lr {s['lr']:g} on one-word answers to '{s['prompt']}' about "
                    f"{s['frames']} other frames; task = the named cube's side, text_only = the colour named, "
                    f"vision_only = the red cube's side; accuracy between the two words (chance 0.5). Spread: std over "
                    f"frames of the image features / their mean magnitude."
                    + (f" Ceiling: what a perfect localiser could say, a logistic regression (cubic features) from the "
                       f"cube's true pixel position, with or without the gripper's orientation, to its side; the wrist "
                       f"camera turns with the arm, so next to the gripper the pixels alone do not tell the side. The "
                       f"gripper's orientation lies outside the range of the release's state tokens (clipped to the "
                       f"end bin) in {ceiling['outside_any']:.0%} of the held-out frames." if ceiling else "")
                    + "".join(f" Paired on the same questions: {p['checkpoint']} alone right on {p['c']}, "
                              f"{p['reference']} alone on {p['b']} (McNemar exact p = {p['p_value']:.2f})."
                              for p in r.get("paired", []))
                    + f" {when}; {r['wall_s'] / 60:.1f} min ({r.get('cpu_s', r['wall_s']) / 60:.1f} min of CPU time).")
        else:
            table = pd.json_normalize(r, sep=".").T.rename(columns={0: "value"})
            note = when
        out.append((name, table, note))
    return out


def _by_distance(bins: dict) -> str:
    """"1-2 cm: 0.82 (50), 3-5 cm: 0.88 (73), ..." (side accuracy per distance bin, questions in brackets)."""
    return ", ".join(f"{b}: {v['side_accuracy']:.2f} ({v['n']})" for b, v in bins.items() if v["n"])


def _machine(m) -> str:
    if not isinstance(m, dict):
        return "an unrecorded machine"
    cpus = m.get("cpus") or m.get("cpu_count")
    return f"{cpus} CPU cores" if cpus else "this machine"
