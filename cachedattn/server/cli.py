"""`cachedattn serve`: the command line of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("cachedattn")
EVICTIONS = ("lru", "fifo", "queue", "predictive")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachedattn serve", description="An OpenAI-compatible server on cachedattn.",
                                epilog="example:\n  python3 -m cachedattn serve --port 8000 --disk-dir /tmp/kv",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="a local model directory (never downloaded), or 'tiny': a small random-weight model with a "
                        "tokenizer trained here, built once into $CACHEDATTN_SERVE_CACHE (default tiny)")
    p.add_argument("--engine", choices=("cachedattn", "vllm"), default="cachedattn",
                   help="cachedattn: the embedded server (one machine, default); vllm: vLLM's OpenAI server with "
                        "cachedattn's KV connector, for many concurrent conversations (needs setup.sh --vllm; docs/vllm.md)")
    p.add_argument("--vllm-python", default=None, help="the vLLM environment's python (default .venv-vllm/bin/python)")
    p.add_argument("--vllm-args", default="", help="more arguments for vLLM's server, one string "
                                                    "with = (e.g. --vllm-args=\"--no-enable-prefix-caching\")")
    p.add_argument("--served-model-name", default=None, help="the name clients ask for (default: the directory's name)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file overriding the model's")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host-bytes", default="1G", help="host-memory tier size (e.g. 512M, 8G)")
    p.add_argument("--disk-dir", default=None, help="directory of the disk tier (default: none)")
    p.add_argument("--disk-bytes", default="16G", help="disk tier size")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per stored chunk")
    p.add_argument("--remote", default=os.environ.get("CACHEDATTN_REMOTE"),
                   help="a Redis shared by several servers: redis://h:p, redis+cluster://h1:p1,h2:p2 "
                        "(default: $CACHEDATTN_REMOTE; none)")
    p.add_argument("--eviction", choices=EVICTIONS, default="lru", help="eviction policy (queue/predictive read "
                   "the engine's queue)")
    p.add_argument("--readahead", type=int, default=None, help="layers the store reads ahead of the one computing "
                   "(default: all)")
    p.add_argument("--no-reuse", action="store_true", help="recompute every turn (store nothing): the baseline, "
                   "same server")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="requests in flight before answering 503")
    p.add_argument("--max-batch", type=int, default=1,
                   help="queued requests run together, up to N rows per decoding step (static batching: a request "
                        "arriving meanwhile waits for the running batch to end; default 1: one at a time; "
                        "docs/server.md)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="cap on a batch's prompt + answer tokens (default: none)")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="larger request bodies get 413")
    p.add_argument("--default-max-tokens", type=int, default=256, help="answer length when a request names none")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM/Ctrl-C before they are cancelled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: as saved)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info")
    return p


def build(args):
    """Model, store, engine and server from the arguments (no HTTP yet)."""
    import torch

    import cachedattn
    from cachedattn.server import model as model_dir
    from cachedattn.server.service import Server
    from cachedattn.server.tokenizer import ChatTokenizer
    from cachedattn.serving.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    directory = model_dir.resolve(args.model)
    template = Path(args.chat_template).read_text() if args.chat_template else None
    tok = ChatTokenizer(directory, template)
    model = model_dir.load(directory, args.device, args.dtype)
    cfg = model.config.get_text_config(decoder=True)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    max_len = args.max_model_len or limit
    if max_len is None:
        raise ValueError("the model does not say its context length: pass --max-model-len")
    if limit is not None and max_len > limit:
        raise ValueError(f"--max-model-len {max_len} exceeds the model's {limit} positions")
    store = cachedattn.AttentionStore(host_bytes=args.host_bytes, disk_dir=args.disk_dir, disk_bytes=args.disk_bytes,
                                      chunk_tokens=args.chunk_tokens, eviction=args.eviction, remote=args.remote or None)
    engine = Engine(model, store, save=not args.no_reuse, readahead=args.readahead, max_batch=args.max_batch,
                    max_batch_tokens=args.max_batch_tokens)
    name = args.served_model_name or (model_dir.TINY if args.model == model_dir.TINY else directory.name)
    return Server(model, store, engine, tok, name, max_len, args.max_queue, args.default_max_tokens)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    import uvicorn

    from cachedattn.server.app import create_app

    if args.engine == "vllm":
        from cachedattn.server import model as model_dir
        from cachedattn.server import vllm_launch

        try:
            directory = model_dir.resolve(args.model)
            name = args.served_model_name or (model_dir.TINY if args.model == model_dir.TINY else directory.name)
            vllm_launch.run(args, directory, name, vars(p.parse_args([])))
        except (OSError, ValueError) as e:
            p.error(str(e))
    try:
        server = build(args)
    except (OSError, ValueError) as e:  # the caller's own options: said in one line, not a traceback
        p.error(str(e))
    log.info("cachedattn: serving %r (max_model_len %d, %s) on http://%s:%d", server.model_name,
             server.max_model_len, "no reuse" if args.no_reuse else "KV reuse", args.host, args.port)
    uvicorn.run(create_app(server, args.max_body_bytes), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)


if __name__ == "__main__":
    main()
