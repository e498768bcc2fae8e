"""The control plane: gRPC API, SQL state, the runtime loop, and the pure scheduling core."""
