"""Command line: `refinevla data|annotate|train|evaluate|attention|all|book|config`, thin over the package.

Examples:
    refinevla book                          # the embedded default, ending with the built book
    refinevla book --preset smoke -p lambda_reason 0.5
    refinevla train --preset default -p refinevla.steps 400
    refinevla annotate -p teacher http -p base_url http://localhost:8000/v1 -p teacher_model my-vlm
    refinevla config --preset paper         # print the resolved config
"""
from __future__ import annotations

import argparse
import sys

import yaml


def _params(pairs) -> dict:
    return {k: v for k, v in (pairs or [])}


def _config(args):
    from .config import resolve

    overrides = _params(args.param)
    if args.run:
        overrides["name"] = args.run
    return resolve(args.preset, overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="refinevla", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["data", "annotate", "train", "evaluate", "attention", "all", "book",
                                            "config"])
    parser.add_argument("--preset", default="default", help="smoke | default | paper (refinevla/presets/)")
    parser.add_argument("--run", default="", help="run folder name under data/ (default: the preset's name)")
    parser.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                        help="override a config key (alias like lambda_reason, or section.field)")
    parser.add_argument("--force", action="store_true", help="book: re-run every notebook")
    parser.add_argument("--only", nargs="*", help="book: run only these notebooks (e.g. 04_evaluate)")
    parser.add_argument("--no-build", action="store_true", help="book: run the notebooks, skip jupyter-book")
    args = parser.parse_args(argv)

    if args.command == "book":
        from .book import build_book, run_notebooks
        from .config import ALIASES

        params, dotted = {}, {}
        for key, value in _params(args.param).items():
            (params if key in ALIASES else dotted)[key] = value
        _config(args)  # validate every key before spending minutes
        params = {k: yaml.safe_load(v) for k, v in params.items()}
        if dotted:
            params["overrides"] = dotted
        run = args.run or args.preset
        run_notebooks(args.preset, params, run=run, only=args.only, force=args.force)
        if not args.no_build:
            index = build_book(run)
            print(f"\nThe book: {index}")
        return 0

    from . import pipeline

    cfg = _config(args)
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.command == "all":
        pipeline.run_all(cfg)
    else:
        result = pipeline.STAGES[args.command](cfg)
        if hasattr(result, "to_string"):
            print(result.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
