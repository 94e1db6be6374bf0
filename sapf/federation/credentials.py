"""TLS certificates and SuperNode keys for an on-premise federation (`sapf certs`).

A small private CA signs the SuperLink's server certificate; sites verify the SuperLink with
the CA certificate (``ca.crt``), which is public. SuperNode authentication uses one EC key pair
per site in OpenSSH format (what Flower's ``--auth-supernode-private-key`` and
``flwr supernode register`` read): the site keeps ``<name>`` (private), the operator registers
``<name>.pub``.

For production, certificates from the organisation's own CA work the same way; this helper is
for pilots and tests. It writes every file atomically and refuses to overwrite.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sapf.errors import SapfError
from sapf.outputs import atomic_path

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"


def _write_atomic(path: Path, data: bytes, private: bool = False) -> None:
    with atomic_path(path, private=private) as tmp:  # a private file is 0600 from its creation
        tmp.write_bytes(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sapf"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


CA_KEY_DIR = "offline"


def make_certificates(out: Path, hosts: list[str], days: int = 365, force: bool = False) -> dict[str, Path]:
    """A CA and a server certificate valid for `hosts` (names or IPs the sites dial) and loopback."""
    if days < 1:
        raise SapfError(f"--days must be at least 1, got {days}")
    # `sapf serve` itself reaches its SuperLink on the loopback address.
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    # The CA's key signs server certificates only: it goes in a folder of its own, to be moved offline,
    # never beside server.key (which the SuperLink's machine must hold).
    paths = {"ca": out / CA_CERT, "cert": out / SERVER_CERT, "key": out / SERVER_KEY,
             "ca_key": out / CA_KEY_DIR / "ca.key"}
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not force:
        raise SapfError(f"{clash[0]} already exists (use --force to replace the certificates)")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("sapf federation CA"))
               .issuer_name(_name("sapf federation CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                 encryption_algorithm=serialization.NoEncryption())
    _write_atomic(paths["ca_key"], ca_key.private_bytes(**pkcs8), private=True)
    _write_atomic(paths["key"], key.private_bytes(**pkcs8), private=True)
    _write_atomic(paths["ca"], ca_cert.public_bytes(pem))
    _write_atomic(paths["cert"], cert.public_bytes(pem))
    return paths


def make_supernode_keys(out: Path, names: list[str], force: bool = False) -> list[tuple[Path, Path]]:
    """One EC (NIST P-384) key pair per site, OpenSSH format: (private, public) paths."""
    pairs = [(out / n, out / f"{n}.pub") for n in names]
    clash = [str(p) for pair in pairs for p in pair if p.exists()]
    if clash and not force:
        raise SapfError(f"{clash[0]} already exists (use --force to replace the keys)")
    out.mkdir(parents=True, exist_ok=True)
    for private_path, public_path in pairs:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_atomic(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()), private=True)
        _write_atomic(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return pairs
