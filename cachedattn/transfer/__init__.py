"""Moving KV between host memory and the GPU: the copy engine (native or the
CPU fake that proves the wiring), segment planning from the chunk layout and
the GPU load path."""
