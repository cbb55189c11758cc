"""Command line: `python -m cachedattn <command>`."""

from __future__ import annotations

import argparse
import json
import logging

from cachedattn import demo, native


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachedattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="run the native core end to end (pool, disk I/O, checks)"))
    sub.add_parser("info", help="print what this build and machine offer, as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        demo.main(args)
    elif args.command == "info":
        print(json.dumps(native.features(), indent=2))


if __name__ == "__main__":
    main()
