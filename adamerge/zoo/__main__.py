"""``python -m adamerge.zoo build [--out DIR] [--force] [--text]``: build an offline zoo.

The repository ships the LM zoo (``data/zoo``), so nobody needs this to run the quickstart; it is
for whoever changes the recipe or wants to see a build on their own machine (whose weights, and
so whose tables, depend on torch's CPU kernel path). Point the quickstart at a build with
``ADAMERGE_ZOO=DIR`` (``ADAMERGE_ZOO_TEXT=DIR`` for ``--text``). Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adamerge.errors import AdamergeError
from adamerge.zoo.build import build_text_zoo, build_zoo, default_root, default_text_root


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adamerge.zoo", description="Build an offline expert zoo.")
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train the zoo into DIR (reused as is if already complete there)")
    build.add_argument("--out", metavar="DIR", help="where to build (default: $ADAMERGE_ZOO, else the shipped zoo)")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is already at DIR")
    build.add_argument("--text", action="store_true", help="the MiniLM text zoo instead of the LM zoo")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    builder, variable = (build_text_zoo, "ADAMERGE_ZOO_TEXT") if args.text else (build_zoo, "ADAMERGE_ZOO")
    root = args.out or (default_text_root() if args.text else default_root())
    try:
        zoo = builder(root, force=args.force)
    except AdamergeError as e:
        print(f"adamerge: error: {e}", file=sys.stderr)
        return 2
    print(f"use it with {variable}={zoo.root.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
