"""The teacher: a four-part rationale for every robot frame (the paper's first stage, `annotate`).

ReFineVLA asks a teacher (the paper: Gemini 2.0 Flash) for a structured chain of thought per trajectory frame:
observation, situation analysis, spatial reasoning, task planning. Two teachers here:

- ``privileged`` (default, offline): a fixed template filled from the simulator state (privileged.py).
- ``http``: any OpenAI-compatible chat endpoint (OpenAI, Gemini's compatibility endpoint, vLLM, Ollama), online
  with retries, bounded concurrency and a preflight (online.py, remote.py) or through the provider's Batch API
  (batch.py), every answer in a cache (cache.py), with the cost estimated before (cost.py).

The modules import one way, bottom to top:

    rationale.py   the Rationale schema, its text form (render / parse), Annotation
    frames.py      key frames, input hashes, reading rows and images
    cache.py       the SQLite answer cache and its JSONL ledger (check / rebuild)
    faithfulness.py, privileged.py      the privileged teacher and the faithfulness check
    request.py     the prompt, the request body, the cache key;  cost.py: prices, image tokens, the dry run
    online.py      the HTTP client that runs a frame to its answer;  batch.py: the Batch API
    remote.py      one HTTP run: cache hits, preflight, online or batch, early stop, summary
    annotate.py    the stage: key frames -> a teacher -> the annotated dataset

This file only re-exports what other modules use (no torch, no openai at import).
"""
from ..config import AnnotateConfig
from . import cache
from .annotate import add_rationale_columns, annotate, examples
from .cache import AnswerCache, CacheError
from .cost import estimate, format_estimate
from .faithfulness import agreement_rate, check_faithfulness, summarise_faithfulness
from .frames import hash_inputs, key_frame_sources, load_objects, object_name, read_rows
from .privileged import TEMPLATE_VERSION, describe_offset, privileged_rationale, run_privileged
from .rationale import PART_LABELS, Annotation, Rationale, as_rationale, parse_rationale_text, render_rationale
from .request import PROMPT_VERSION

__all__ = ["AnnotateConfig", "Annotation", "AnswerCache", "CacheError", "PART_LABELS", "PROMPT_VERSION", "Rationale",
           "TEMPLATE_VERSION", "add_rationale_columns", "agreement_rate", "annotate", "as_rationale", "cache",
           "check_faithfulness", "describe_offset", "estimate", "examples", "format_estimate", "hash_inputs",
           "key_frame_sources", "load_objects", "object_name", "parse_rationale_text", "privileged_rationale",
           "read_rows", "render_rationale", "run_privileged", "summarise_faithfulness"]
