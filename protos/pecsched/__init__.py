"""Generated protobuf package root; see protos/README.md."""
