"""What every benchmark script writes with its numbers: the library versions, and the JSON file itself
(benchmarks/results/*.json, which the book's benchmark tables read)."""
from __future__ import annotations

import json
import platform
from pathlib import Path


def library_versions() -> dict:
    """Python and the versions of the libraries a training benchmark measures."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)


def write_result(path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``path`` (folders created) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
