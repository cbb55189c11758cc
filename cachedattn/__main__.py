"""Command line: `python -m cachedattn <command>`."""

from __future__ import annotations

import argparse
import json
import logging

from cachedattn import native
from cachedattn.console import example


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachedattn", description=__doc__,
                                **example("python3 -m cachedattn demo --turns 3 --user-tokens 100"))
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("demo", help="a multi-turn conversation with cachedattn vs recompute (small model, no download)",
                          **example("python3 -m cachedattn demo --turns 3 --user-tokens 100"))
    conv.add_argument("--turns", type=int, default=6)
    conv.add_argument("--user-tokens", type=int, default=300, help="new user tokens per turn")
    conv.add_argument("--answer-tokens", type=int, default=32, help="generated tokens per turn")
    conv.add_argument("--dir", default=None, help="where the disk tier lives (default: a temporary directory)")
    conv.add_argument("--host-mb", type=int, default=256, help="host-memory tier size (MiB)")
    demo_args = sub.add_parser("native-demo", help="run the native core end to end (pool, disk I/O, checks)",
                               **example("python3 -m cachedattn native-demo --total-mb 64"))
    demo_args.add_argument("--total-mb", type=int, default=256, help="bytes to write and read back (MiB)")
    demo_args.add_argument("--block-kb", type=int, default=1024, help="block size (KiB, multiple of 4)")
    demo_args.add_argument("--dir", default=None, help="directory for the scratch file (default: the system temp dir)")
    demo_args.add_argument("--backend", choices=["auto", "io_uring", "threads"], default=None)
    sub.add_parser("info", help="print what this build and machine offer, as JSON",
                   **example("python3 -m cachedattn info"))
    sub.add_parser("compat", help="check every causal-LM architecture of transformers (see --help there)", add_help=False)
    sub.add_parser("replay", help="the ShareGPT multi-turn replay: every system on one trace (see --help there)",
                   add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible server with KV reuse (see --help there)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if args.command == "compat":
        from cachedattn.hf import compat

        return compat.main(rest)
    if args.command == "replay":
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from cachedattn.replay import cli

        return cli.main(rest)
    if args.command == "serve":
        from cachedattn.server import cli as serve_cli

        return serve_cli.main(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        from cachedattn.hf import demo as conv_demo  # imports transformers and rich

        conv_demo.run(args.turns, args.user_tokens, args.answer_tokens, args.dir, args.host_mb)
    elif args.command == "native-demo":
        from cachedattn import demo  # imports rich, which `info` does not need

        demo.main(args)
    elif args.command == "info":
        print(json.dumps(native.features(), indent=2))


if __name__ == "__main__":
    main()
