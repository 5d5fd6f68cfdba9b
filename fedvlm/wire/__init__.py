"""The wire: generated gRPC stubs (fedvlm.wire.v1), chunked transfers and TLS credentials."""
