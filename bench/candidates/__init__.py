"""Candidate proxies that pick keybroker's upstream client and serving shape.

Measurements, not product code: each forwards ``/v1/proxy/anthropic/{path}`` to the fake
upstream chunk by chunk, swapping the credential the way keybroker's proxy does. Chosen by
environment variables so that one module serves every combination under uvicorn:

- ``BENCH_UPSTREAM_URL``: where to forward (``http://127.0.0.1:PORT``)
- ``BENCH_CLIENT``: ``httpx``, ``httpx-aiohttp`` or ``aiohttp``
- ``BENCH_UPSTREAM_KEY``: the key put on upstream requests
- ``BENCH_DJANGO_MIDDLEWARE``: ``none`` or ``project`` (keybroker's middleware list)

``bench.candidates.django_asgi:application`` is a Django 5.2 async view returning a
``StreamingHttpResponse``; ``bench.candidates.raw_asgi:application`` is the same proxy as a
bare ASGI callable, to see what Django's request cycle costs.
"""
