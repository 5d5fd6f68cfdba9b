"""The hard cap on an adapter's safetensors header, in a module of its own so that configuration code (the
coordinator's `[limits]` validation, which read-only commands load) can name it without importing torch, which
`fedvlm.adapters` needs."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
