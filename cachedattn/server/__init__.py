"""`cachedattn serve`: an OpenAI-compatible HTTP server on the engine.

Modules, one job each: cli (command line, uvicorn), app (routes), schema
(OpenAI request/response shapes and server-sent events), errors (OpenAI error
JSON), identity (which conversation a request belongs to), generation (one
request through the engine: sampling, streaming, cancellation), tokenizer
(tokenizer and chat template without transformers), model (loading a local
model directory, building the tiny default one), metrics (Prometheus).
"""
