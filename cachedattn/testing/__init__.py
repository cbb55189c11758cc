"""Test doubles and checkers for the GPU path on the CPU (never imported by production code).

- :mod:`cachedattn.testing.happens_before`: vector clocks and the access history (no torch);
- :mod:`cachedattn.testing.sim_devices`: simulated CUDA devices and streams (a provider for
  ``cachedattn.transfer.streams.use``) and the dispatch mode that records every aten op's accesses;
- :mod:`cachedattn.testing.fake_engine`: FakeCopyEngine, the native CopyEngine on the CPU with
  copies deferred (transfer/factory.py hands it out under ``CACHEDATTN_FAKE_COPY_ENGINE=1``);
- :mod:`cachedattn.testing.checkpoint_watch`: what the fake engines and the race detector hang on
  production's checkpoints (:mod:`cachedattn.transfer.checkpoints`);
- :mod:`cachedattn.testing.race`: the stream-ordering race detector tying both to the fake copy engine.

See docs/gpu-ordering.md.
"""
