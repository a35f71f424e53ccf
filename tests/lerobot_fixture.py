"""A tiny dataset in LeRobotDataset v2.x layout, and a local stand-in for the hub that serves it.

``write_lerobot_fixture`` writes 3 short episodes (meta/, parquet per episode, one mp4 per camera per
episode) whose frames are solid colours that encode (episode, frame), so a decoded frame can be checked
against what was written within codec tolerance. Two flavours mimic the two datasets the paper uses:
"bridge" (bridge_orig_lerobot: 8-D Euler state, camera image_0 in AV1 as the re-host stores it, 5 fps) and
"fractal" (fractal20220817_data_lerobot: 8-D quaternion state with a 1 = closed gripper, camera image, 3 fps).

``serve_hub`` answers the two requests ``huggingface_hub.hf_hub_download`` makes, HEAD then GET of
``{endpoint}/datasets/{repo_id}/resolve/{revision}/{filename}``, with the headers it requires (X-Repo-Commit,
ETag, Content-Length) and the X-Error-Code values it maps to its exceptions, and logs every request.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BRIDGE_TASKS = ["put the carrot on the plate", "stack the green block on the yellow block",
                "put the spoon on the towel"]
FRACTAL_TASKS = ["pick coke can", "move the apple near the sponge", "open the top drawer"]
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def frame_colour(episode: int, frame: int, camera: int = 0) -> tuple[int, int, int]:
    """The solid RGB colour of one frame: R and B move with the frame, G encodes the episode."""
    r, g, b = 12 + 17 * frame, 40 + 70 * episode, 220 - 13 * frame
    return (r, g, b) if camera == 0 else (255 - r, g, 255 - b)


def rpy_to_quat_xyzw(rpy: np.ndarray) -> np.ndarray:
    """Roll, pitch, yaw (extrinsic x-y-z) -> quaternion (x, y, z, w); the inverse of lerobot.quat_to_rpy."""
    r, p, y = (rpy[:, i] / 2 for i in range(3))
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.stack([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy], axis=1)


@dataclass
class Fixture:
    """What was written, for the tests to compare against (raw source values, before any conversion)."""

    root: Path
    flavour: str
    fps: float
    cameras: list
    lengths: list
    tasks: list                                       # instruction of each episode
    state: dict = field(default_factory=dict)         # episode -> (n, 8) as stored
    action: dict = field(default_factory=dict)        # episode -> (n, 7) as stored
    rpy: dict = field(default_factory=dict)           # episode -> (n, 3) orientation the state encodes
    stats: dict | None = None                         # action stats written to meta/, if any


def _episode_arrays(flavour: str, episode: int, n: int):
    """State (as the dataset stores it), action and the true roll/pitch/yaw of one episode."""
    t = np.arange(n, dtype=np.float64)
    xyz = np.stack([0.30 + 0.01 * t, -0.05 * episode + 0.002 * t, 0.10 + 0.005 * t], axis=1)
    rpy = np.stack([0.02 * t - 0.1, -0.3 + 0.01 * episode + 0.015 * t, 0.5 - 0.03 * t], axis=1)
    opened = (t < n // 2).astype(np.float64)            # open for the first half, closed after
    if flavour == "bridge":
        state = np.concatenate([xyz, rpy, np.zeros((n, 1)), (0.05 + 0.9 * opened)[:, None]], axis=1)
    else:  # fractal: quaternion xyzw and RT-1's gripper_closed (1 = closed)
        state = np.concatenate([xyz, rpy_to_quat_xyzw(rpy), (1.0 - opened)[:, None]], axis=1)
    deltas = np.zeros((n, 6))
    deltas[:-1, :3] = xyz[1:] - xyz[:-1]
    deltas[:-1, 3:] = rpy[1:] - rpy[:-1]
    command = (t < n // 2 - 1).astype(np.float64)       # the open/close command precedes the state by a step
    action = np.concatenate([deltas, command[:, None]], axis=1)
    return state.astype(np.float32), action.astype(np.float32), rpy


ENCODE_TIMEOUT_S = 120
# SVT-AV1 (libsvtav1), run as root, moves the calling thread and every encoder thread it creates to the
# real-time policy SCHED_FIFO, and they stay there after the encoder closes: a test process that encoded
# one AV1 video then starves a 2-core machine whenever it spins (measured: the browser check hung 60 min).
# So AV1 is encoded in a short-lived child process with a timeout; the test process never runs SVT.
ISOLATED_CODECS = ("libsvtav1",)


def write_video(path: Path, frames: list[np.ndarray], fps: float, codec: str) -> None:
    """Encode RGB frames to an mp4 with PyAV (yuv420p, high quality so solid colours survive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec in ISOLATED_CODECS:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "frames.npy", np.stack(frames))
            subprocess.run([sys.executable, __file__, str(Path(tmp) / "frames.npy"), str(path), str(fps), codec],
                           check=True, timeout=ENCODE_TIMEOUT_S, capture_output=True)
        return
    _encode(path, frames, fps, codec)


def _encode(path: Path, frames, fps: float, codec: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"} if codec in ("libx264", "libsvtav1") else {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _png_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _stats_block(values: np.ndarray, quantiles: bool = True) -> dict:
    block = {"mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0)}
    if quantiles:
        block["q01"], block["q99"] = np.quantile(values, [0.01, 0.99], axis=0)
    return {k: v.astype(np.float64).tolist() for k, v in block.items()}


def write_lerobot_fixture(parent: Path, flavour: str = "bridge", lengths=(10, 8, 12), tasks=None,
                          chunks_size: int = 2, stats: str | None = "quantiles", name: str | None = None,
                          version: str = "v2.0", video: bool = True) -> Fixture:
    """Write a dataset folder ``parent/<name>`` in LeRobotDataset v2.x layout and return what it holds.

    ``stats``: "quantiles" (meta/stats.json with q01/q99), "plain" (stats.json with mean/std/min/max only,
    as LeRobot v2.0 writes it), "episodes" (meta/episodes_stats.jsonl with per-episode stats) or None.
    ``chunks_size=2`` puts episode 2 in chunk-001, so the chunk arithmetic is exercised.
    ``video=False`` stores the cameras as PNG images inside the parquet (feature dtype "image") instead.
    """
    bridge = flavour == "bridge"
    name = name or ("bridge_orig_lerobot" if bridge else "fractal20220817_data_lerobot")
    root = Path(parent) / name
    fps = 5.0 if bridge else 3.0
    size = (64, 64) if bridge else (64, 80)
    cameras = (["observation.images.image_0", "observation.images.image_1"] if bridge
               else ["observation.images.image"])
    codecs = ["libsvtav1", "libx264"] if bridge else ["libx264"]
    tasks = list(tasks if tasks is not None else (BRIDGE_TASKS if bridge else FRACTAL_TASKS))[:len(lengths)]
    fx = Fixture(root=root, flavour=flavour, fps=fps, cameras=cameras, lengths=list(lengths), tasks=tasks)

    task_index = {t: k for k, t in enumerate(dict.fromkeys(tasks))}
    global_index = 0
    episodes_stats = []
    for ep, n in enumerate(lengths):
        state, action, rpy = _episode_arrays(flavour, ep, n)
        fx.state[ep], fx.action[ep], fx.rpy[ep] = state, action, rpy
        chunk = ep // chunks_size
        table = pa.table({
            "observation.state": pa.array(state.tolist(), type=pa.list_(pa.float32())),
            "action": pa.array(action.tolist(), type=pa.list_(pa.float32())),
            "timestamp": pa.array(np.arange(n) / fps, type=pa.float32()),
            "frame_index": pa.array(np.arange(n), type=pa.int64()),
            "episode_index": pa.array([ep] * n, type=pa.int64()),
            "index": pa.array(np.arange(global_index, global_index + n), type=pa.int64()),
            "task_index": pa.array([task_index[tasks[ep]]] * n, type=pa.int64()),
        })
        global_index += n
        for cam, key in enumerate(cameras if not video else []):
            cells = [{"bytes": _png_bytes(np.full((*size, 3), frame_colour(ep, t, cam), np.uint8)), "path": None}
                     for t in range(n)]
            table = table.append_column(key, pa.array(cells, type=pa.struct([("bytes", pa.binary()),
                                                                             ("path", pa.string())])))
        path = root / DATA_PATH.format(episode_chunk=chunk, episode_index=ep)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for cam, (key, codec) in enumerate(zip(cameras if video else [], codecs)):
            frames = [np.full((*size, 3), frame_colour(ep, t, cam), np.uint8) for t in range(n)]
            write_video(root / VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=ep),
                        frames, fps, codec)
        block = _stats_block(action) | {"count": [n]}
        episodes_stats.append({"episode_index": ep, "stats": {"action": block}})

    video_info = {"video.fps": fps, "video.codec": "av1" if bridge else "h264", "video.pix_fmt": "yuv420p",
                  "video.is_depth_map": False, "video.channels": 3, "has_audio": False}
    state_names = (["x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper"] if bridge
                   else ["x", "y", "z", "rx", "ry", "rz", "rw", "gripper"])
    features = {key: {"dtype": "video" if video else "image", "shape": [*size, 3],
                      "names": ["height", "width", "rgb"]} | ({"info": video_info} if video else {})
                for key in cameras}
    features |= {
        "observation.state": {"dtype": "float32", "shape": [8], "names": {"motors": state_names}},
        "action": {"dtype": "float32", "shape": [7],
                   "names": {"motors": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]}},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {
        "codebase_version": version, "robot_type": "widowx" if bridge else "google_robot",
        "total_episodes": len(lengths), "total_frames": int(sum(lengths)), "total_tasks": len(task_index),
        "total_videos": len(lengths) * len(cameras) if video else 0, "total_chunks": (len(lengths) - 1) // chunks_size + 1,
        "chunks_size": chunks_size, "fps": fps, "splits": {"train": f"0:{len(lengths)}"},
        "data_path": DATA_PATH, "video_path": VIDEO_PATH, "features": features,
    }
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "info.json").write_text(json.dumps(info, indent=2))
    (meta / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": ep, "tasks": [tasks[ep]], "length": n}) + "\n" for ep, n in enumerate(lengths)))
    (meta / "tasks.jsonl").write_text("".join(
        json.dumps({"task_index": k, "task": t}) + "\n" for t, k in task_index.items()))
    all_actions = np.concatenate([fx.action[ep] for ep in range(len(lengths))])
    if stats in ("quantiles", "plain"):
        fx.stats = _stats_block(all_actions, quantiles=stats == "quantiles")
        (meta / "stats.json").write_text(json.dumps({"action": fx.stats}))
    elif stats == "episodes":
        fx.stats = {"episodes": episodes_stats}
        (meta / "episodes_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in episodes_stats))
    return fx


# ----------------------------------------------------------------------------------------------------------
# A local stand-in for the hub's file endpoint

class _HubHandler(http.server.BaseHTTPRequestHandler):
    repos: dict = {}          # repo_id -> local folder (set per server)
    log: list = []            # (method, repo_id, revision, filename)
    commit: str = COMMIT      # the one commit every repository is at (set per server)

    def log_message(self, *args):  # keep test output quiet
        pass

    def _route(self):
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).split("/")
        # "", "datasets", owner, name, "resolve", revision, *filename
        if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
            return 404, {}, None, None
        repo_id, revision, filename = f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:])
        self.log.append((self.command, repo_id, revision, filename))
        if repo_id not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound"}, None, filename
        if revision not in ("main", self.commit):
            return 404, {"X-Error-Code": "RevisionNotFound"}, None, filename
        path = self.repos[repo_id] / filename
        if not path.is_file():
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit}, None, filename
        body = path.read_bytes()
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                   "Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
        return 200, headers, body, filename

    def _respond(self, send_body: bool):
        status, headers, body, _ = self._route()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if body is None:
            self.send_header("Content-Length", "0")
        self.end_headers()
        if send_body and body is not None:
            self.wfile.write(body)

    def do_HEAD(self):
        self._respond(send_body=False)

    def do_GET(self):
        self._respond(send_body=True)


@contextlib.contextmanager
def serve_hub(repos: dict, commit: str = COMMIT):
    """Serve ``{repo_id: folder}`` on 127.0.0.1, "main" being ``commit``; yields (endpoint url, request log)."""
    log: list = []
    handler = type("Handler", (_HubHandler,), {"repos": {k: Path(v) for k, v in repos.items()}, "log": log,
                                               "commit": commit})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":   # the child process of write_video: frames.npy, output path, fps, codec
    _encode(Path(sys.argv[2]), list(np.load(sys.argv[1])), float(sys.argv[3]), sys.argv[4])
