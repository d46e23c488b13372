"""The gRPC face of the broker: thin servicers, status mapping, server lifecycle."""
