"""``fedvlm bench``: the FedVLMBench study as a reproducible in-process benchmark (docs/benchmark.md).

config (experiment TOML and sweep grids) -> data (site folders per trial) -> simulate (one trial, the real
Learner, algorithm and aggregation) -> sweep (resumable trials, parallel workers) -> report (tables and plots).
"""
