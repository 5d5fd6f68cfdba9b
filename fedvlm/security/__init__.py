"""Security primitives of a federation.

- :mod:`fedvlm.security.pki`: the CA, server / client / admin certificates, CSRs, fingerprints, key files, and
  reading a gRPC caller's verified identity.
- :mod:`fedvlm.security.tokens`: one-time join tokens and the enrollment proof that binds a token to a CSR.
- :mod:`fedvlm.security.signing`: ECDSA signatures over update manifests and global-version records.

Nothing here imports gRPC.
"""
