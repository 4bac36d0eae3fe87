"""Serving many adapters on one base: batched mixed-adapter forward (``mixed``; prompt/prefix rows in ``virtual``),
an adapter registry with LRU hot-swap and lazy loading (``registry``), per-row decoding control (``decoding``:
sampling, stop strings, streaming), micro-batching (``batcher``) and the HTTP app (``app``, needs the ``serve``
extra: fastapi, uvicorn)."""
