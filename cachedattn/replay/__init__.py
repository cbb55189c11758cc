"""The ShareGPT multi-turn replay (`python -m cachedattn replay`): one trace of
real conversations served by several systems side by side."""
