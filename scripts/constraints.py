"""Write constraints.txt: the exact versions of everything `pip install -e ".[all]"` installed in this environment.

    .venv/bin/python scripts/constraints.py     # after a `make test` that passed: pins the tested set

The Makefile installs with `pip install -c constraints.txt`, so a fresh machine gets the versions the tests passed
with. torch is left out (the Makefile installs the CPU or CUDA build of TORCH_VERSION itself), and so are its own
dependencies; the project's dependencies are walked from pyproject.toml (dependencies and the `all` extra) through the
installed distributions' metadata, so tools installed by hand into the environment are never pinned.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"torch", "refinevla"}


def project_requirements(extras: tuple[str, ...] = ("all",)) -> list[Requirement]:
    """pyproject.toml's dependencies plus those of ``extras`` (an extra naming refinevla[...] is expanded)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional, reqs, todo, done = project.get("optional-dependencies", {}), [], list(extras), set()
    reqs += [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for r in map(Requirement, optional.get(extra, [])):
            if canonicalize_name(r.name) == "refinevla":
                todo += sorted(r.extras)
            else:
                reqs.append(r)
    return reqs


def closure(extras: tuple[str, ...] = ("all",)) -> dict[str, str]:
    """{distribution: version} of every installed distribution the project needs, torch's subtree excluded."""
    pins, seen = {}, set()
    todo = [(r.name, set(r.extras)) for r in project_requirements(extras) if not r.marker or r.marker.evaluate()]
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), frozenset(wanted))
        if key in seen or canonicalize_name(name) in SKIP:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here (e.g. a GPU-only extra)
        pins[canonicalize_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return pins


def main() -> int:
    pins = closure()
    lines = [f"# Written by scripts/constraints.py from the environment the tests passed in (Python "
             f"{sys.version_info.major}.{sys.version_info.minor}); torch is pinned by the Makefile (TORCH_VERSION).",
             *(f"{name}=={version}" for name, version in sorted(pins.items()))]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
