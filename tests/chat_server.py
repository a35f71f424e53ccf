"""A fake OpenAI chat-completions server on 127.0.0.1 for the teacher tests and the throughput benchmark.

It speaks the wire format the `openai` SDK reads (POST /v1/chat/completions -> id, object, created, model,
choices[0].message.content, usage), records every request it sees, and injects faults either from a scripted
queue (served to the next requests in order) or from a rule (a function of the request number and body):

    {"status": 429, "retry_after": 1}   an error status, with an optional Retry-After header (seconds)
    {"status": 500}
    {"status": 400, "message": "..."}   an error whose body says this (e.g. echoing what the client sent)
    {"delay": 2.0}                      sleep before answering (beyond the client's timeout)
    {"content": "not json"}             this message content instead of a valid rationale
    {"content": "", "finish_reason": "length"}   what a thinking model answers when thinking used the token limit
    {"empty_choices": True}             a 200 with "choices": []

and refuses what a real endpoint refuses, with its status and message (checked before any fault):

    server.api_key = "sk-..."             401 for any other Authorization header
    server.models = {"gpt-5-mini"}        404 "model ... does not exist" for any other model
    server.token_param = "max_completion_tokens"   400 for a body with max_tokens (OpenAI's gpt-5 / o-series text)
    server.refused_fields = {"reasoning_effort"}   400 naming the first refused field present in the body
    server.refuse_batch_metadata = True   400 for POST /v1/batches with metadata (as Gemini may)
    server.refuse_batch_list = True       400 for GET /v1/batches (as Gemini may)

    with ChatServer(latency_s=0.1) as server:   # server.url -> "http://127.0.0.1:<port>/v1"
        ...

It also speaks the Batch API (POST /v1/files multipart upload with purpose=batch, GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches): a batch stays `in_progress` for `batch_polls`
retrieves, then runs each line through the same answer and fault machinery (one logged request per line, with
the header "x-batch-id"), writing the 200 answers to its output file and the others to its error file. Faults
for a whole batch come from `batch_script` (one per created batch, in order):

    {"status": "expired", "after": 3}   only the first 3 lines are answered, then the window ends
    {"status": "failed", "message": "..."}   validation fails: no line is answered

Standalone (the benchmark runs it in its own process so that it does not share the client's GIL):
    python tests/chat_server.py --latency 0.1      # prints the URL, serves until killed
"""
from __future__ import annotations

import argparse
import email.parser
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
        # the Batch API
        self.files: dict[str, dict] = {}     # id -> {"data": bytes, "filename", "purpose"}
        self.batches: dict[str, dict] = {}   # id -> the batch object (+ "_polls": retrieves left before it runs)
        self.batch_polls = 1                 # retrieves a batch stays in_progress for
        self.batch_script: deque[dict] = deque()
        # what the endpoint refuses (see the module docstring)
        self.api_key: str | None = None
        self.models: set[str] | None = None
        self.token_param: str | None = None
        self.refused_fields: set[str] = set()
        self.refuse_batch_metadata = False
        self.refuse_batch_list = False

    # -- life cycle
    def start(self) -> "ChatServer":
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
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
            self.batch_script.clear()

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

    def refusal(self, headers: dict | None, body: dict) -> dict | None:
        """The error a real endpoint would answer this chat request with, as a fault ({"status", "message"});
        headers None: a batch line (its key was checked with the upload)."""
        if self.api_key is not None and headers is not None and \
                headers.get("authorization") != f"Bearer {self.api_key}":
            return {"status": 401, "message": "Incorrect API key provided."}
        if self.models is not None and body.get("model") not in self.models:
            return {"status": 404, "message": f"The model `{body.get('model')}` does not exist or you do not have "
                                               "access to it."}
        if self.token_param == "max_completion_tokens" and "max_tokens" in body:
            return {"status": 400, "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                              "Use 'max_completion_tokens' instead."}
        if self.token_param == "max_tokens" and "max_completion_tokens" in body:
            return {"status": 400, "message": "Unrecognized request argument supplied: max_completion_tokens"}
        for name in sorted(self.refused_fields):
            if name in body:
                return {"status": 400, "message": f'Invalid JSON payload received. Unknown name "{name}": '
                                                  "Cannot find field."}
        return None

    def completion(self, body: dict, fault: dict) -> tuple[int, dict]:
        """(status, JSON body) of one chat completion under `fault` (the latency is the caller's)."""
        if "status" in fault:
            return fault["status"], {"error": {"message": fault.get("message", f"injected {fault['status']}"),
                                               "type": "injected"}}
        content = fault["content"] if "content" in fault else self.answer(body)
        choices = [] if fault.get("empty_choices") else [
            {"index": 0, "finish_reason": fault.get("finish_reason", "stop"),
             "message": {"role": "assistant", "content": content}}]
        return 200, {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion",
                     "created": int(time.time()), "model": body.get("model", "fake"), "choices": choices,
                     "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    # -- the Batch API
    def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        with self.lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = {"data": data, "filename": filename, "purpose": purpose}
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    def create_batch(self, req: dict) -> dict:
        with self.lock:
            batch_id = f"batch_{len(self.batches)}"
            fault = self.batch_script.popleft() if self.batch_script else {}
            batch = {"id": batch_id, "object": "batch", "endpoint": req["endpoint"], "errors": None,
                     "input_file_id": req["input_file_id"], "completion_window": req["completion_window"],
                     "status": "validating", "output_file_id": None, "error_file_id": None,
                     "created_at": int(time.time()), "metadata": req.get("metadata"),
                     "request_counts": {"total": 0, "completed": 0, "failed": 0},
                     "_polls": self.batch_polls, "_fault": fault}
            self.batches[batch_id] = batch
        return public(batch)

    def retrieve_batch(self, batch_id: str) -> dict | None:
        with self.lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            batch["_polls"] -= 1
            due = batch["status"] in ("validating", "in_progress") and batch["_polls"] < 0
            if not due and batch["status"] == "validating":
                batch["status"] = "in_progress"
        if due:
            self.run_batch(batch)
        return public(batch)

    def run_batch(self, batch: dict) -> None:
        """Answer the batch's lines (each one logged like an online request) and write its result files."""
        fault = batch["_fault"]
        if fault.get("status") == "failed":
            batch.update(status="failed", errors={"object": "list", "data": [
                {"code": "invalid_request", "message": fault.get("message", "injected failure"), "line": 1}]})
            return
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["data"].decode().splitlines() if x]
        answered = lines[:fault["after"]] if fault.get("status") == "expired" else lines
        out, err = [], []
        for line in answered:
            body = line["body"]
            line_fault = self.admit(line["url"], {"x-batch-id": batch["id"]}, body)
            line_fault = self.refusal(None, body) or line_fault
            status, obj = self.completion(body, line_fault)
            record = {"id": f"batch_req_{time.monotonic_ns()}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": "req", "body": obj}, "error": None}
            (out if status == 200 else err).append(json.dumps(record))
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                batch[name] = self.add_file(("\n".join(rows) + "\n").encode(), f"{batch['id']}_{name}.jsonl",
                                            "batch_output")["id"]
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        batch["status"] = fault.get("status", "completed")


def public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def multipart_fields(content_type: str, raw: bytes) -> dict:
    """name -> (filename, bytes) of a multipart/form-data body (what the SDK's file upload sends)."""
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.get_payload()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: read when the socket is bound, so a class attribute


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses connections
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms (delayed ACK)

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chat, path = self.server.chat, self.path.rstrip("/")
        if path == "/v1/files":
            fields = multipart_fields(self.headers.get("Content-Type", ""), raw)
            filename, data = fields["file"]
            return self.reply(200, chat.add_file(data, filename, fields["purpose"][1].decode()))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_raw": raw.decode(errors="replace")}
        if path == "/v1/batches":
            if chat.refuse_batch_metadata and body.get("metadata"):
                return self.reply(400, {"error": {"message": 'Invalid JSON payload received. Unknown name "metadata"',
                                                  "type": "invalid_request"}})
            if body.get("input_file_id") not in chat.files:
                return self.reply(400, {"error": {"message": "no such input file", "type": "invalid_request"}})
            return self.reply(200, chat.create_batch(body))
        headers = {k.lower(): v for k, v in self.headers.items()}
        fault = chat.admit(self.path, headers, body)
        if path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        fault = chat.refusal(headers, body) or fault
        time.sleep(chat.latency_s + fault.get("delay", 0.0))
        status, obj = chat.completion(body, fault)
        headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
        self.reply(status, obj, headers)

    def do_GET(self) -> None:
        chat, path = self.server.chat, self.path.split("?")[0].rstrip("/")
        m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
        if m and m.group(1) in chat.files:
            return self.reply_bytes(200, chat.files[m.group(1)]["data"], "application/octet-stream")
        m = re.fullmatch(r"/v1/batches/([^/]+)", path)
        if m and (batch := chat.retrieve_batch(m.group(1))) is not None:
            return self.reply(200, batch)
        if path == "/v1/batches":
            if chat.refuse_batch_list:
                return self.reply(400, {"error": {"message": "listing batches is not supported",
                                                  "type": "invalid_request"}})
            with chat.lock:
                data = [public(b) for b in reversed(chat.batches.values())]  # newest first, like the API
            return self.reply(200, {"object": "list", "data": data, "has_more": False,
                                    "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None})
        self.reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def reply(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self.reply_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def reply_bytes(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
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
