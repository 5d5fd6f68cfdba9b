"""Where a federation directory keeps things (created by `fedvlm-coord init`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FederationDir:
    """Paths inside a coordinator's state directory. Nothing here touches the disk."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "federation.toml"

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.pki / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.pki / "server.key"

    @property
    def admin_cert(self) -> Path:
        return self.pki / "admin.pem"

    @property
    def admin_key(self) -> Path:
        return self.pki / "admin.key"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def address_file(self) -> Path:
        """Written by `serve` with the bound addresses, so tools and tests find an ephemeral port."""
        return self.root / "serve.json"

    def exists(self) -> bool:
        return self.database.exists() and self.ca_cert.exists()
