"""Command line: `refinevla base|data|annotate|train|evaluate|attention|all|book|export|config`, thin over the package.

Examples:
    refinevla book                          # the embedded default, ending with the built book
    refinevla base --preset base            # re-make the released tiny base (models/tiny-base, ~70 min)
    refinevla base --preset vla             # then the tiny VLA the study fine-tunes (models/tiny-vla)
    refinevla book --preset smoke -p lambda_reason 0.25
    refinevla train --preset default -p finetune_steps 400
    refinevla train --help                  # the keys `train` reads, their defaults and what they accept
    refinevla evaluate --force evaluate     # evaluate again although nothing changed
    refinevla annotate -p teacher http -p base_url http://localhost:8000/v1 -p teacher_model my-vlm
    refinevla config --preset paper         # print the resolved config
    refinevla export --preset study         # a finished run's results -> results/study/ (committed, for the book)

A bad value is refused in one line naming the key, the value and what is allowed (exit status 2), before any
stage deletes or writes anything; a stage whose input was made under another config says which stage to run
first (exit status 1). Every expected runtime failure (a damaged file, damaged episode records, a damaged teacher
cache, a teacher that stopped or gave up, an unreadable checkpoint, a failed notebook) ends in one line naming the
cause and the fix (exit status 1); its traceback is appended to the run's log file, data/<run>/refinevla.log.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
import traceback
from pathlib import Path

import yaml

from . import stages
from .book import LOG
from .config import SECTIONS as ALL_SECTIONS


def commands() -> dict[str, tuple[tuple[str, ...], str]]:
    """command -> (the config sections it reads: its --help lists their keys, from the config dataclasses; what it
    does): one per declared stage (refinevla.stages), then all, book and config."""
    out = {stage.name: (stage.sections, stage.help) for stage in stages.STAGES}
    names = ", ".join(stage.name for stage in stages.run_stages())
    return out | {"all": (ALL_SECTIONS, f"every stage in order: {names}"),
                  "book": (ALL_SECTIONS, "run the notebooks (Papermill) and build the book (Jupyter Book)"),
                  "export": (ALL_SECTIONS, "copy a finished run's episodes, config and stage keys into results/<run>/ "
                                           "(small files to commit; the book's ablation page reads them)"),
                  "config": (ALL_SECTIONS, "print the resolved config")}


def _params(pairs) -> dict:
    return {k: v for k, v in (pairs or [])}


def _config(args):
    from .config import resolve

    overrides = _params(args.param)
    if args.run:
        overrides["name"] = args.run
    return resolve(args.preset, overrides)


def keys_help(sections) -> str:
    """The keys of ``sections`` with the values the default run uses (the default preset), the dataclass default
    where the preset changes it, and their descriptions, from the config dataclasses."""
    from .config import describe_keys, resolve

    bare = {key: value for key, value, _ in describe_keys(sections)}
    lines = ["keys it reads (-p KEY VALUE), with the default run's values (--preset default; other presets: "
             "`refinevla config --preset NAME`):"]
    for key, value, text in describe_keys(sections, resolve("default")):
        lines.append(f"  {key} = {value!r}" + (f"  (without a preset: {bare[key]!r})" if bare[key] != value else ""))
        lines += textwrap.wrap(text, 110, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    force_names = stages.force_names()
    parser = argparse.ArgumentParser(prog="refinevla", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default="default", help="smoke | default | study | paper | base | vla (refinevla/presets/)")
    common.add_argument("--run", default="", help="run folder name under data/ (default: the preset's name)")
    common.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                        help="override a config key (an alias like lambda_reason, or section.field; see below)")
    for name, (sections, text) in commands().items():
        stage = stages.by_name(name) if name in stages.names() else None
        sub = subparsers.add_parser(name, parents=[common], help=text, description=text, epilog=keys_help(sections),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "book":
            sub.add_argument("--force", action="store_true", help="re-run every notebook")
            sub.add_argument("--only", nargs="*", help="run only these notebooks (e.g. 04_evaluate)")
            sub.add_argument("--no-build", action="store_true", help="run the notebooks, skip jupyter-book")
            sub.add_argument("--cell-timeout", type=int, default=3600, metavar="SECONDS",
                             help="the longest a notebook cell may run (a stage's cell runs the whole stage)")
        elif stage is not None and not stage.in_run:
            sub.add_argument("--force", action="append", choices=stage.own_force, default=[], metavar="STAGE",
                             help=f"{', '.join(stage.own_force)}: {stage.force_help}")
        elif name == "export":
            sub.add_argument("--to", default=None, metavar="FOLDER", help="where to write (default: results/<run>)")
        elif name != "config":
            parts = "; ".join(f"{s.name} = {' + '.join(s.parts)}" for s in stages.run_stages() if s.parts)
            sub.add_argument("--force", action="append", choices=force_names, default=[], metavar="STAGE",
                             help="re-run STAGE from scratch even when its marker matches (repeatable; one of "
                                  f"{', '.join(force_names)}; {parts})")
    return parser


def _fail(command: str, error: BaseException, status: int) -> int:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    print(f"refinevla {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def expected_failures() -> tuple[type, ...]:
    """The runtime failures the command line ends in one line (their messages name the cause and the fix): a
    stage's (book.stage_failures), and a notebook's (book.NotebookFailed, which carries the notebook's traceback)."""
    from .book import NotebookFailed, stage_failures

    return stage_failures() + (NotebookFailed,)


def log_failure(run_dir: Path, argv, error: BaseException) -> Path | None:
    """Append the command and the traceback to the run's log file (a failed notebook's own traceback too); its
    path (None when it cannot be written)."""
    path = Path(run_dir) / LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} refinevla {' '.join(argv)}\n")
            fh.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
            if getattr(error, "details", ""):
                fh.write(f"The notebook's traceback:\n{error.details}\n")
        return path
    except OSError:
        return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)  # every key and value is checked before anything runs
    except (ValueError, KeyError, TypeError) as error:
        return _fail(args.command, error, 2)
    try:
        return _run(args, cfg)
    except expected_failures() as error:
        from .book import REPO

        run_dir = cfg.run_dir if args.command != "book" else REPO / cfg.root / (args.run or args.preset)
        log = log_failure(run_dir, argv, error)
        message = " ".join(str(error).split())
        where = f" (traceback in {log})" if log else ""
        print(f"refinevla {args.command}: error: {message}{where}", file=sys.stderr)
        return 1


def _run(args, cfg) -> int:
    if args.command == "book":
        from .book import REPO, build_book, run_notebooks
        from .config import ALIASES

        params, dotted = {}, {}
        for key, value in _params(args.param).items():
            (params if key in ALIASES else dotted)[key] = value
        params = {k: yaml.safe_load(v) for k, v in params.items()}
        if dotted:
            params["overrides"] = dotted
        run = args.run or args.preset
        if not args.no_build and not (REPO / cfg.root).resolve().is_relative_to(REPO):
            return _fail("book", ValueError(f"root {cfg.root} is outside the repository, and the book is built "
                                            f"from run folders inside it ({REPO}); use --no-build, or a root "
                                            "under the repository"), 2)
        run_notebooks(args.preset, params, run=run, only=args.only, force=args.force, timeout_s=args.cell_timeout,
                      root=cfg.root)
        if not args.no_build:
            index = build_book(run, root=cfg.root)
            print(f"\nThe book: {index}")
        return 0
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.command == "export":
        from .archive import check, export

        folder = export(cfg, args.preset, _params(args.param), args.to)
        check(folder)
        print(f"exported {cfg.run_dir} -> {folder} (checked against the {args.preset} preset)")
        return 0

    from . import pipeline
    from .config import ConfigError

    try:
        if args.command == "all":
            pipeline.run_all(cfg, force=args.force)
        else:
            stage = stages.by_name(args.command)
            result = pipeline.runner(stage)(cfg, force=args.force)
            if stage.result_line:
                print(stage.result_line.format(result))
            elif hasattr(result, "to_string"):
                print(result.to_string())
    except ConfigError as error:
        return _fail(args.command, error, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
