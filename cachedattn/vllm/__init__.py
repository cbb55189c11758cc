"""cachedattn under vLLM: the KV connector (`CachedAttnConnector`).

The only package that imports vllm. ``kv_connector_module_path:
"cachedattn.vllm"`` finds the connector here; the rest of the package
(keys, plans, transfers) runs without vLLM, which is how the main test suite
checks it.
"""


def __getattr__(name):
    if name in ("CachedAttnConnector", "CachedAttnMetadata"):
        from cachedattn.vllm import connector

        return getattr(connector, name)
    raise AttributeError(name)
