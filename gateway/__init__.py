"""The OpenAI-compatible HTTP front end of a PecSched cluster.

`/v1/models`, `/v1/completions` and `/v1/chat/completions` (streamed as server-sent events or
not) on Starlette + uvicorn, talking to the control plane only through the SDK's asyncio client
(`sdk.aio.AsyncClient`): each HTTP caller's bearer token is forwarded as its API key, so HTTP
callers are the control plane's tenants. Modules: `schemas.py` (request bodies), `errors.py`
(OpenAI's error shape), `generation.py` (submit, stream, stop strings, cancel), `app.py`
(routes), `cli.py` (`pecsched gateway`). Imports only the SDK of this project.
"""
