"""A real headless Chromium (Debian's chromium + chromium-driver, installed by `make browser`, part of `make test`),
driven through selenium, for the dashboard's browser test."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedvlm.security import pki

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000")


def spki_pin(cert_pem: bytes) -> str:
    """Chromium's pin of a certificate's key: base64 of the SHA-256 of its SubjectPublicKeyInfo."""
    der = pki.load_cert_pem(cert_pem).public_key().public_bytes(serialization.Encoding.DER,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def chromium(server_cert: Path):
    """A headless Chromium that trusts exactly the coordinator's server key (pinned, no other TLS error ignored).
    Fails, rather than skips, when the browser is not installed: `make test` installs it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists() and not shutil.which(Path(p).name)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make browser` (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--ignore-certificate-errors-spki-list={spki_pin(server_cert.read_bytes())}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
