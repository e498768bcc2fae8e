"""Typed gRPC client (sync and asyncio) and the client-side CLI commands.

Import what you use from its module (this package imports nothing, so `pecsched --help` stays
fast): `sdk.client.Client`, `sdk.aio.AsyncClient`, `sdk.types` (results and enums),
`sdk.errors` (typed exceptions and the error-detail metadata convention), `sdk.retry.RetryPolicy`.
"""
