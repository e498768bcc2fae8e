"""Typed gRPC client (sync and asyncio) and the client-side CLI commands."""
