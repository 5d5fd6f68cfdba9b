"""Secure aggregation: the coordinator learns the sum of the sampled sites' updates, never one site's.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning") for an
honest-but-curious server, with the pairwise masks of every pair of sampled sites (the complete graph of the paper,
not SecAgg+'s sparse one) and the paper's two secrets per site:

1. **Advertise.** Each sampled site makes two X25519 key pairs for the round (``c``: to encrypt shares to it;
   ``s``: its pairwise mask key) and a random self-mask seed ``b``, and sends the public keys signed with its
   enrolled site key (``Advertisement``); every site checks every peer's signature against the peer's certificate
   (issued by the federation CA), so a coordinator that swaps a public key is caught.
2. **Share.** Each site splits ``s``'s private key and ``b`` into ``threshold``-of-n Shamir shares, one per
   advertised site, and encrypts each share to its holder (AES-GCM under an X25519 + HKDF key of the pair, bound to
   the round and both names); the coordinator only relays the ciphertexts.
3. **Masked input.** A site encodes its update in fixed point (``encode``) and adds its self mask ``PRG(b)`` and,
   for every other site ``v`` that shared, ``+PRG(s_uv)`` if its name sorts before ``v``'s and ``-PRG(s_uv)`` after
   (``s_uv`` = the pair's X25519 secret, so the pairwise masks cancel in the sum). This is the upload.
4. **Unmask.** For each site that uploaded, the survivors reveal their share of its ``b``; for each site that shared
   but did not upload, their share of its ``s`` key (never both for one site: ``reveal``). With ``threshold`` shares
   the coordinator rebuilds them and removes the masks (``unmask``).

The round completes while at least ``threshold`` sites reveal. Fixed point: values are scaled by 2**FRACTION_BITS,
rounded to integers and added modulo 2**64; a site's values must lie within +-2**VALUE_BITS and at most
2**(62 - FRACTION_BITS - VALUE_BITS) sites may be summed, so the signed sum never wraps (``encode`` refuses larger
values). Sites weigh their update by ``weight`` before encoding (FedAvg's example share), so the sum is the weighted
sum. Every primitive is a well-kept library's (``cryptography``: X25519, HKDF-SHA256, AES-GCM, ChaCha20 as the PRG);
Shamir sharing over GF(2**521 - 1) is written here because no dependency of fedvlm provides it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 32  # resolution 2**-32 ~ 2.3e-10
VALUE_BITS = 20  # |value * weight| <= 2**20 ~ 1e6
MAX_SITES = 2 ** (62 - FRACTION_BITS - VALUE_BITS)  # 1024: the signed sum of that many stays below 2**62
PRIME = 2**521 - 1  # a Mersenne prime above every 32-byte secret
_DOMAIN = b"fedvlm-secagg-v1"


class SecAggError(ValueError):
    """A secure-aggregation message is malformed, forged, or the round cannot be unmasked."""


@dataclass(frozen=True)
class RoundContext:
    """What binds every key, share and mask to one round of one run of one federation."""

    federation_id: str
    run_id: str
    round: int

    def info(self, label: str, *names: str) -> bytes:
        return json.dumps([_DOMAIN.decode(), label, self.federation_id, self.run_id, self.round, *names],
                          separators=(",", ":")).encode()


@dataclass(frozen=True)
class Advertisement:
    """A site's public keys for one round (raw 32-byte X25519 keys); ``canonical`` is what the site signs."""

    site: str
    c_public: bytes
    s_public: bytes

    def canonical(self, ctx: RoundContext) -> bytes:
        return b"fedvlm-secagg-keys-v1\n" + ctx.info("keys", self.site, self.c_public.hex(), self.s_public.hex())

    def to_json(self) -> str:
        return json.dumps({"site": self.site, "c": self.c_public.hex(), "s": self.s_public.hex()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Advertisement:
        try:
            raw = json.loads(text)
            adv = cls(str(raw["site"]), bytes.fromhex(raw["c"]), bytes.fromhex(raw["s"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SecAggError(f"malformed key advertisement: {exc}") from None
        if len(adv.c_public) != 32 or len(adv.s_public) != 32:
            raise SecAggError(f"key advertisement of {adv.site!r}: public keys must be 32 bytes")
        return adv


class SiteSecrets:
    """One site's secrets for one round: the ``c`` and ``s`` X25519 private keys and the self-mask seed ``b``."""

    def __init__(self, site: str, ctx: RoundContext) -> None:
        self.site, self.ctx = site, ctx
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self.b = secrets.token_bytes(32)

    def advertisement(self) -> Advertisement:
        return Advertisement(self.site, _raw_public(self._c), _raw_public(self._s))

    def shares_for(self, peers: Mapping[str, Advertisement], threshold: int) -> dict[str, bytes]:
        """Encrypted shares of ``s`` and ``b`` for every advertised site (this one included), keyed by holder."""
        names = sorted(peers)
        if self.site not in peers:
            raise SecAggError(f"{self.site!r} is not among the advertised sites")
        check_threshold(threshold, len(names))
        s_shares = split(int.from_bytes(_raw_private(self._s), "big"), threshold, len(names))
        b_shares = split(int.from_bytes(self.b, "big"), threshold, len(names))
        out = {}
        for index, holder in enumerate(names):
            plain = json.dumps({"owner": self.site, "x": index + 1, "s": hex(s_shares[index]),
                                "b": hex(b_shares[index])}).encode()
            key = self._pair_key(peers[holder].c_public, "share", self.site, holder)
            nonce = secrets.token_bytes(12)
            out[holder] = nonce + AESGCM(key).encrypt(nonce, plain, self.ctx.info("share", self.site, holder))
        return out

    def open_shares(self, ciphertexts: Mapping[str, bytes], peers: Mapping[str, Advertisement]
                    ) -> dict[str, tuple[int, int, int]]:
        """Decrypt the shares the other sites sent to this one: ``{owner: (x, s_share, b_share)}``."""
        opened = {}
        for owner, blob in ciphertexts.items():
            if owner not in peers:
                raise SecAggError(f"a share from {owner!r}, which did not advertise keys")
            key = self._pair_key(peers[owner].c_public, "share", owner, self.site)
            try:
                plain = AESGCM(key).decrypt(blob[:12], blob[12:], self.ctx.info("share", owner, self.site))
                raw = json.loads(plain)
                if raw["owner"] != owner:
                    raise ValueError("owner mismatch")
                opened[owner] = (int(raw["x"]), int(raw["s"], 16), int(raw["b"], 16))
            except Exception as exc:  # InvalidTag, malformed JSON: a forged or corrupted share
                raise SecAggError(f"the share from {owner!r} does not decrypt: {type(exc).__name__}") from None
        return opened

    def mask(self, encoded: Mapping[str, np.ndarray], sharers: Iterable[str],
             peers: Mapping[str, Advertisement]) -> dict[str, np.ndarray]:
        """``encoded + PRG(b) + sum over the other sharers of +-PRG(s_uv)`` (uint64, modulo 2**64)."""
        out = {k: v.copy() for k, v in encoded.items()}
        _add_prg(out, self.b, +1)
        for peer in sorted(set(sharers) - {self.site}):
            seed = self._pair_key(peers[peer].s_public, "mask", *sorted((self.site, peer)))
            _add_prg(out, seed, +1 if self.site < peer else -1)
        return out

    def _pair_key(self, peer_public: bytes, label: str, *names: str) -> bytes:
        private = self._c if label == "share" else self._s
        return _derive(private, peer_public, self.ctx.info(label, *names))


def reveal(opened: Mapping[str, tuple[int, int, int]], survivors: Iterable[str], dropped: Iterable[str]
           ) -> dict[str, tuple[str, int, int]]:
    """What a surviving site sends to unmask: for each survivor its ``b`` share, for each dropped site its ``s`` share
    (``{owner: (kind, x, share)}``); ``SecAggError`` if a site is named both ways (that would reveal its update)."""
    survivors, dropped = set(survivors), set(dropped)
    if survivors & dropped:
        raise SecAggError(f"sites listed as both surviving and dropped: {sorted(survivors & dropped)}")
    out = {}
    for owner, (x, s_share, b_share) in opened.items():
        if owner in survivors:
            out[owner] = ("b", x, b_share)
        elif owner in dropped:
            out[owner] = ("s", x, s_share)
    return out


def unmask(masked_sum: Mapping[str, np.ndarray], peers: Mapping[str, Advertisement], survivors: Iterable[str],
           dropped: Iterable[str], revealed: Iterable[Mapping[str, tuple[str, int, int]]], threshold: int,
           ctx: RoundContext) -> dict[str, np.ndarray]:
    """The sum of the survivors' encodings from the sum of their masked inputs: rebuilds every survivor's ``b`` and
    every dropped sharer's ``s`` key from at least ``threshold`` revealed shares, then removes the self masks and
    the dropped sites' pairwise masks. ``SecAggError`` when fewer than ``threshold`` shares exist for a site."""
    survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
    shares: dict[tuple[str, str], dict[int, int]] = {}
    for reply in revealed:
        for owner, (kind, x, value) in reply.items():
            shares.setdefault((owner, kind), {})[x] = value
    out = {k: v.copy() for k, v in masked_sum.items()}
    for site in survivors:
        b = combine(shares.get((site, "b"), {}), threshold, f"the self-mask seed of {site!r}")
        _add_prg(out, b.to_bytes(32, "big"), -1)
    for gone in dropped:
        key = combine(shares.get((gone, "s"), {}), threshold, f"the mask key of {gone!r}")
        private = X25519PrivateKey.from_private_bytes(key.to_bytes(32, "big"))
        if _raw_public(private) != peers[gone].s_public:
            raise SecAggError(f"the rebuilt mask key of {gone!r} does not match its advertised key")
        for site in survivors:
            seed = _derive(private, peers[site].s_public, ctx.info("mask", *sorted((site, gone))))
            _add_prg(out, seed, -1 if site < gone else +1)
    return out


def check_threshold(threshold: int, sites: int) -> None:
    """A threshold must be a majority (Bonawitz et al.: t > n/2 keeps the two secret kinds apart) and at most n."""
    if not (sites // 2 < threshold <= sites):
        raise SecAggError(f"threshold {threshold} for {sites} sites: must be more than half and at most all of them")
    if sites > MAX_SITES:
        raise SecAggError(f"{sites} sites: at most {MAX_SITES} can be summed without overflow")


# ---- fixed point ------------------------------------------------------------------------------------------------
def encode(tensors: Mapping[str, np.ndarray], weight: float = 1.0) -> dict[str, np.ndarray]:
    """``round(value * weight * 2**FRACTION_BITS)`` as uint64 (two's complement); ``SecAggError`` for a value
    outside +-2**VALUE_BITS or not finite."""
    out = {}
    for name, value in tensors.items():
        scaled = np.asarray(value, dtype=np.float64) * weight
        if not np.all(np.isfinite(scaled)) or np.any(np.abs(scaled) > 2.0**VALUE_BITS):
            raise SecAggError(f"tensor {name!r}: values must be finite and within +-2**{VALUE_BITS}")
        out[name] = np.rint(scaled * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)
    return out


def decode(summed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float64 values of a sum of encodings."""
    return {k: v.view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS for k, v in summed.items()}


def add(into: dict[str, np.ndarray], other: Mapping[str, np.ndarray]) -> None:
    """``into += other`` modulo 2**64, in place (the coordinator's running sum of masked inputs)."""
    for name, value in other.items():
        np.add(into[name], value, out=into[name])


# ---- Shamir secret sharing over GF(PRIME) ----------------------------------------------------------------------
def split(secret: int, threshold: int, count: int) -> list[int]:
    """``count`` shares (at x = 1..count) of which any ``threshold`` rebuild ``secret``."""
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def combine(shares: Mapping[int, int], threshold: int, what: str = "a secret") -> int:
    """The secret from ``{x: share}`` (Lagrange interpolation at 0 over ``threshold`` of them)."""
    if len(shares) < threshold:
        raise SecAggError(f"cannot rebuild {what}: {len(shares)} shares revealed, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# ---- primitives -------------------------------------------------------------------------------------------------
def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


def _derive(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point: a forged key
        raise SecAggError(f"invalid public key: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _add_prg(into: dict[str, np.ndarray], seed: bytes, sign: int) -> None:
    """Add (or subtract) ChaCha20's keystream under ``seed``, read as uint64, to the tensors in sorted-name order."""
    total = sum(v.size for v in into.values())
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(bytes(8 * total))
    words = np.frombuffer(stream, dtype=np.uint64)
    offset = 0
    for name in sorted(into):
        value = into[name]
        chunk = words[offset: offset + value.size].reshape(value.shape)
        if sign > 0:
            np.add(value, chunk, out=value)
        else:
            np.subtract(value, chunk, out=value)
        offset += value.size
