"""A reverse proxy that sends each request to the next of its backends in turn.

aiperf's own round robin (``--url-strategy round_robin``) keeps a conversation on
one server, so two vLLM instances behind it never need each other's KV. Behind
this proxy, consecutive requests alternate between the instances whatever
conversation they belong to, so a turn often lands on the instance that did not
serve the conversation's previous turn: what sharing through Redis is for.
Responses (streamed or not) are passed through as they come.

    python3 bench/alternating_proxy.py --port 8100 http://127.0.0.1:8001 http://127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import threading

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade"}


def make_app(backends: list[str]) -> Starlette:
    turn = itertools.cycle(range(len(backends)))
    lock = threading.Lock()
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0))
    counts = [0] * len(backends)

    async def forward(request: Request):
        with lock:
            i = next(turn)
            counts[i] += 1
        url = backends[i] + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        upstream = client.build_request(request.method, url, headers=headers, content=await request.body())
        resp = await client.send(upstream, stream=True)

        async def body():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        return StreamingResponse(body(), status_code=resp.status_code, headers=out_headers)

    async def sent(request: Request):
        return JSONResponse({"backends": backends, "requests": counts})

    routes = [Route("/proxy/requests", sent), Route("/{path:path}", forward, methods=["GET", "POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("backends", nargs="+", help="base URLs, e.g. http://127.0.0.1:8001")
    args = p.parse_args()
    uvicorn.run(make_app([b.rstrip("/") for b in args.backends]), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
