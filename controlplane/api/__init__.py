"""The gRPC edge: servicers, conversions, the error catalog, authentication."""
