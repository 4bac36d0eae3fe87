"""Serving many adapters on one base: batched mixed-adapter forward (``mixed``), an adapter registry with LRU
hot-swap and lazy loading (``registry``), micro-batching (``batcher``) and the HTTP app (``app``, needs the
``serve`` extra: fastapi, uvicorn)."""
