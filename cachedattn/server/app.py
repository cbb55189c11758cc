"""The HTTP routes (FastAPI): /v1/chat/completions, /v1/completions (both
streaming with server-sent events or not), /v1/models, /health, /metrics.
Every error is answered in OpenAI's error JSON; no request can stop the server."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cachedattn.server import identity, schema
from cachedattn.server.errors import APIError, bad_request
from cachedattn.server.metrics import CONTENT_TYPE
from cachedattn.server.service import Answer, Server, Turn

log = logging.getLogger("cachedattn")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg')}" if param else str(e.get("msg"))), param


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _endpoint(request) -> str:
    """The metrics label of a request's path (a fixed set: no label per unknown path)."""
    path = request.url.path
    return path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")


class BodyLimit:
    """413 for a body declared larger than the limit. Plain ASGI: a BaseHTTPMiddleware
    would wrap `receive` and hide a client's disconnect from the routes."""

    def __init__(self, app, limit: int, server: Server):
        self.app, self.limit, self.server = app, limit, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                path = scope["path"]
                self.server.metrics.requests.labels(path if path in ENDPOINTS else "other", "413").inc()
                err = APIError(413, f"the request body is {int(length)} bytes; the limit is {self.limit}",
                               code="request_too_large")
                return await _error(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(server: Server, max_body_bytes: int = 32 << 20) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        server.shutdown()

    app = FastAPI(title="cachedattn", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        server.metrics.requests.labels(_endpoint(request), str(exc.status)).inc()
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        server.metrics.requests.labels(_endpoint(request), "400").inc()
        return _error(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        server.metrics.requests.labels(_endpoint(request), str(exc.status_code)).inc()
        return _error(APIError(exc.status_code, str(exc.detail), code=None,
                               type="invalid_request_error" if exc.status_code < 500 else "server_error"))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("cachedattn: unexpected error serving %s", request.url.path)
        server.metrics.requests.labels(_endpoint(request), "500").inc()
        return _error(APIError(500, f"internal error: {exc}", code="internal_error"))

    app.add_middleware(BodyLimit, limit=max_body_bytes, server=server)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if server.closing:
            return _error(APIError(503, "the server is shutting down", code="shutting_down"))
        return {"status": "ok"}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "cachedattn",
                "max_model_len": server.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return model_card()

    def sampling(req: schema._Sampling) -> dict:
        return dict(temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                    stops=schema.stop_list(req))

    @app.post("/v1/chat/completions")
    async def chat(req: schema.ChatRequest, request: Request):
        server.check_model(req.model)
        schema.check_supported(req)
        messages = [schema.message_text(m, i) for i, m in enumerate(req.messages)]
        tok = server.tokenizer
        try:
            prompt = tok.render(messages)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        except Exception as e:  # the template refused these messages (raise_exception) or failed on them
            raise bad_request(f"the chat template cannot render these messages: {e}", "messages") from None
        conv = identity.explicit_id(request.headers, req.conversation_id, req.user)
        if conv is None:
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            turns = ((tok.render(messages[:i]), messages[i]["content"]) for i in reversed(answers))
            conv = server.conversations.find(prompt, turns) or server.conversations.new_id()
        ids = server.conversations.token_ids(conv, prompt, tok.encode, tok.encode)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        turn = Turn(conv, prompt, ids, max_tokens, **sampling(req))
        return await respond("chat", "/v1/chat/completions", req, turn, request)

    @app.post("/v1/completions")
    async def completions(req: schema.CompletionRequest, request: Request):
        server.check_model(req.model)
        schema.check_supported(req)
        tok = server.tokenizer
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("prompt: one prompt per request is supported", "prompt", "unsupported_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not prompt or any(not 0 <= t < tok.vocab_size for t in prompt):
                raise bad_request(f"prompt: token ids must be in [0, {tok.vocab_size})", "prompt")
            text, ids = tok.decode(prompt), list(prompt)
        else:
            text, ids = prompt, None
        conv = identity.explicit_id(request.headers, req.conversation_id, req.user) or \
            server.conversations.new_id()
        if ids is None:
            ids = server.conversations.token_ids(conv, text, lambda t: tok.encode(t, add_special_tokens=True),
                                                 tok.encode)
        if not ids:
            raise bad_request("prompt: empty", "prompt")
        turn = Turn(conv, text, ids, req.max_tokens if req.max_tokens is not None else 16, **sampling(req))
        return await respond("completion", "/v1/completions", req, turn, request)

    async def respond(kind: str, endpoint: str, req, turn: Turn, request: Request):
        run = server.start(turn)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            writer = schema.ChunkWriter(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + turn.rid, turn.created,
                                        server.model_name, include_usage)
            return StreamingResponse(stream(writer, endpoint, turn, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = None
            async for item in server.pieces(turn, run, disconnected=request.is_disconnected):
                if isinstance(item, Answer):
                    answer = item
        finally:
            run.cancel.set()
        if answer is None:  # the client went away
            server.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        server.metrics.requests.labels(endpoint, "200").inc()
        build = schema.chat_response if kind == "chat" else schema.completion_response
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + turn.rid
        return build(rid, turn.created, server.model_name, answer.text, answer.finish_reason, answer.usage)

    async def stream(writer: schema.ChunkWriter, endpoint: str, turn: Turn, run):
        status = "499"  # unless the stream reaches its end
        try:
            first = writer.role()
            if first:
                yield first
            async for item in server.pieces(turn, run):
                if isinstance(item, Answer):
                    yield writer.text("", item.finish_reason)
                    usage = writer.usage(item.usage)
                    if usage:
                        yield usage
                else:
                    yield writer.text(item)
            status = "200"
        except APIError as e:  # the headers are gone: the error travels as an event, then the stream ends
            status = str(e.status)
            yield schema.sse(e.body())
        except Exception as e:
            log.exception("cachedattn: unexpected error while streaming")
            status = "500"
            yield schema.sse(APIError(500, f"internal error: {e}", code="internal_error").body())
        finally:
            if status == "499":
                server.abandon(turn, run)
            run.cancel.set()
            server.metrics.requests.labels(endpoint, status).inc()
        yield writer.done()

    return app
