"""What secure aggregation adds to a round: bytes on the wire and seconds of compute, at 3, 10 and 50 sites.

The protocol runs in this process (fedvlm.security.secagg, the site-side steps of fedvlm.client.secagg and the
coordinator's unmasking), one site after the other; bytes are the serialized sizes of the real protobuf messages of
proto/fedvlm/v1/secagg.proto plus the growth of the update itself (uint64 masked tensors instead of float32), and the
certificates are real ones from the federation CA. A tenth of the sites (at least one) drops after sharing, so the
unmasking also rebuilds mask keys. Seconds: per site (keys, shares, opening, encoding + masks) and on the
coordinator (summing the masked updates, rebuilding the secrets, removing the masks); GetPhase polls are left out.

    .venv/bin/python bench/secagg_cost.py [--params 1000000] [--sites 3 10 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedvlm.security import pki, secagg, signing
from fedvlm.security.secagg import RoundContext, SiteSecrets
from fedvlm.wire.v1 import secagg_pb2 as pb

CTX = RoundContext("f" * 32, "run-bench", 1)


def simulate(sites: int, params: int) -> dict[str, float]:
    """One secure round of `sites` sites over an adapter of `params` float32 values; bytes and seconds."""
    ca_key, ca_cert = pki.create_ca("bench")
    names = [f"site-{i:03d}" for i in range(sites)]
    keys = {n: pki.generate_key() for n in names}
    certs = {n: pki.cert_to_pem(pki.issue_cert_for_key(ca_key, ca_cert, keys[n].public_key(), n, "client", 3600))
             for n in names}
    threshold = sites // 2 + 1
    dropped = names[1: 1 + max(1, sites // 10)] if sites > 3 else [names[1]]
    survivors = [n for n in names if n not in dropped]
    rng = np.random.default_rng(0)
    update = {"lora.weight": rng.normal(0, 0.01, size=params).astype(np.float32)}
    wire = {"up": 0, "down": 0}
    site_seconds = 0.0

    started = time.perf_counter()
    secrets = {n: SiteSecrets(n, CTX) for n in names}
    adverts = {}
    for n in names:
        adv = secrets[n].advertisement()
        message = pb.SignedKeys(advertisement_json=adv.to_json(), signature=signing.sign(keys[n], adv.canonical(CTX)),
                                cert_pem=certs[n])
        wire["up"] += message.ByteSize() - len(certs[n])  # the certificate is added by the coordinator
        adverts[n] = adv
    keyset = pb.KeySet(threshold=threshold, keys=[pb.SignedKeys(advertisement_json=a.to_json(), signature=b"x" * 72,
                                                                cert_pem=certs[n]) for n, a in adverts.items()])
    wire["down"] += sites * keyset.ByteSize()
    inbox: dict[str, dict[str, bytes]] = {n: {} for n in names}
    for n in names:
        for cert in keyset.keys:  # what each site checks: every peer's certificate and signature
            pki.verify_issued_by(pki.load_cert_pem(cert.cert_pem), ca_cert)
        shares = secrets[n].shares_for(adverts, threshold)
        wire["up"] += pb.ShareBundle(shares=[pb.EncryptedShare(site=h, ciphertext=c) for h, c in shares.items()]
                                     ).ByteSize()
        for holder, blob in shares.items():
            inbox[holder][n] = blob
    site_seconds += time.perf_counter() - started

    opened, masked = {}, {}
    for n in survivors:
        started = time.perf_counter()
        wire["down"] += pb.ShareBundle(shares=[pb.EncryptedShare(site=o, ciphertext=c) for o, c in inbox[n].items()]
                                       ).ByteSize()
        opened[n] = secrets[n].open_shares(inbox[n], adverts)
        masked[n] = secrets[n].mask(secagg.encode(update, 10.0), names, adverts)
        site_seconds += time.perf_counter() - started
    wire["up"] += len(survivors) * params * 4  # uint64 instead of float32: 4 more bytes per value

    reveals = []
    started = time.perf_counter()
    for n in survivors:
        revealed = secagg.reveal(opened[n], survivors, dropped)
        reveals.append(revealed)
        wire["up"] += pb.Reveal(shares=[pb.RevealedShare(owner=o, kind=k, x=x, value=v.to_bytes(66, "big"))
                                        for o, (k, x, v) in revealed.items()]).ByteSize()
    site_seconds += time.perf_counter() - started

    started = time.perf_counter()
    total = {"lora.weight": np.zeros(params, dtype=np.uint64)}
    for n in survivors:
        secagg.add(total, masked[n])
    summed = secagg.decode(secagg.unmask(total, adverts, survivors, dropped, reveals, threshold, CTX))
    coordinator_seconds = time.perf_counter() - started
    expected = len(survivors) * 10.0 * update["lora.weight"].astype(np.float64)
    error = float(np.max(np.abs(summed["lora.weight"] - expected)))
    plain = sites * params * 4  # the float32 updates of a plain round
    return {"sites": sites, "dropped": len(dropped), "threshold": threshold, "params": params,
            "extra_up_mb": wire["up"] / 2**20, "extra_down_mb": wire["down"] / 2**20,
            "protocol_kb_per_site": (wire["up"] + wire["down"] - len(survivors) * params * 4) / sites / 1024,
            "plain_up_mb": plain / 2**20, "site_s": site_seconds / sites, "coordinator_s": coordinator_seconds,
            "max_abs_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 values in the adapter")
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 50])
    args = parser.parse_args()
    print("| sites | dropped | threshold | plain upload (MiB) | extra upload (MiB) | extra download (MiB) | "
          "key/share messages per site (KiB) | site s | coordinator s | max error of the sum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sites in args.sites:
        r = simulate(sites, args.params)
        print(f"| {r['sites']} | {r['dropped']} | {r['threshold']} | {r['plain_up_mb']:.1f} | "
              f"{r['extra_up_mb']:.1f} | {r['extra_down_mb']:.2f} | {r['protocol_kb_per_site']:.1f} | "
              f"{r['site_s']:.2f} | {r['coordinator_s']:.2f} | {r['max_abs_error']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
