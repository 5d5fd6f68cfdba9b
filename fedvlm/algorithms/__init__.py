"""Federated optimisation algorithms: one module per algorithm, pure tensor math, no I/O and no gRPC."""
