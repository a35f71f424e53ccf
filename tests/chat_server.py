"""A fake OpenAI chat-completions server on 127.0.0.1 for the teacher tests and the throughput benchmark.

It speaks the wire format the `openai` SDK reads (POST /v1/chat/completions -> id, object, created, model,
choices[0].message.content, usage), records every request it sees, and injects faults either from a scripted
queue (served to the next requests in order) or from a rule (a function of the request number and body):

    {"status": 429, "retry_after": 1}   an error status, with an optional Retry-After header (seconds)
    {"status": 500}
    {"status": 400, "message": "..."}   an error whose body says this (e.g. echoing what the client sent)
    {"delay": 2.0}                      sleep before answering (beyond the client's timeout)
    {"content": "not json"}             this message content instead of a valid rationale
    {"empty_choices": True}             a 200 with "choices": []

    with ChatServer(latency_s=0.1) as server:   # server.url -> "http://127.0.0.1:<port>/v1"
        ...

Standalone (the benchmark runs it in its own process so that it does not share the client's GIL):
    python tests/chat_server.py --latency 0.1      # prints the URL, serves until killed
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PARTS = ("observation", "situation_analysis", "spatial_reasoning", "task_planning")


def instruction_of(body: dict) -> str:
    """The `Instruction: ...` line of the last user text in a request (what the teacher sends)."""
    for message in reversed(body.get("messages", [])):
        content = message.get("content")
        texts = [content] if isinstance(content, str) else [c.get("text", "") for c in content or []]
        for text in texts:
            m = re.search(r"^Instruction: (.*)$", text or "", flags=re.M)
            if m:
                return m.group(1)
    return ""


def default_answer(body: dict) -> str:
    """A valid rationale that echoes the instruction (so tests can tell every row got its own answer)."""
    return json.dumps({"observation": f"i see the cube for {instruction_of(body)}",
                       "situation_analysis": "the gripper is open and moving toward the cube",
                       "spatial_reasoning": "the cube is 4 cm left of and 9 cm below the gripper",
                       "task_planning": "move above the cube then descend"})


class ChatServer:
    """Threaded HTTP server with a fault script, a fault rule, a fixed latency and a request log."""

    def __init__(self, latency_s: float = 0.0, answer=default_answer):
        self.latency_s, self.answer = latency_s, answer
        self.script: deque[dict] = deque()  # faults for the next requests, in order
        self.rule = None                     # rule(n, body) -> fault dict or None, used when script is empty
        self.requests: list[dict] = []       # {"n", "path", "headers", "body", "time"} per request
        self.lock = threading.Lock()
        self.httpd = None

    # -- life cycle
    def start(self) -> "ChatServer":
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256
        self.httpd.chat = self
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    # -- what tests read
    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def bodies(self) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.script.clear()
            self.rule = None

    # -- called by the handler
    def admit(self, path: str, headers: dict, body: dict) -> dict:
        """Log the request and pick its fault ({} = answer normally)."""
        with self.lock:
            n = len(self.requests)
            self.requests.append({"n": n, "path": path, "headers": headers, "body": body, "time": time.time()})
            if self.script:
                return self.script.popleft()
            rule = self.rule
        return (rule(n, body) if rule else None) or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses connections
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms (delayed ACK)

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_raw": raw.decode(errors="replace")}
        chat = self.server.chat
        fault = chat.admit(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        time.sleep(chat.latency_s + fault.get("delay", 0.0))
        if "status" in fault:
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            message = fault.get("message", f"injected {fault['status']}")
            return self.reply(fault["status"], {"error": {"message": message, "type": "injected"}}, headers)
        content = fault["content"] if "content" in fault else chat.answer(body)
        choices = [] if fault.get("empty_choices") else [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]
        self.reply(200, {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion",
                         "created": int(time.time()), "model": body.get("model", "fake"), "choices": choices,
                         "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

    def reply(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): fine
            pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    args = parser.parse_args()
    server = ChatServer(latency_s=args.latency).start()
    print(server.url, flush=True)
    threading.Event().wait()
