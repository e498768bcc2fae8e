"""pecsched.v1: generated messages and gRPC stubs. Never edited by hand."""
