"""Serving: continuous batching over a :class:`~trt_sd.runtime.Pipeline`, an HTTP layer, and
the Ray Serve application that runs them as replicas (``trt-sd serve``).

``engine`` and ``http`` need only the runtime; ``app`` imports Ray Serve (the ``serve`` extra).
"""
