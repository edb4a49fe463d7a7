"""`privface certs`: a private CA and one certificate per role, plus the pins the parties must be given.

Roles: ``gateway`` (TLS client of both parties), ``party0`` / ``party1`` (servers of the gateway; also
clients, for the MPC links), ``dealer`` (server and client of the MPC links). Each certificate names its
role as CN and as a DNS name (the compose service names), plus localhost and the loopback addresses, plus
any ``extra_hosts``. Keys are ECDSA P-256, written with mode 0600; the CA key is needed only to issue
more certificates and should leave the machine that ran this command.

Why pins as well as a CA: with mTLS alone a party accepts any certificate of the CA (the dealer's, the
other party's); the pin (SHA-256 of the gateway's certificate, DER) makes the gateway the only client.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("gateway", "party0", "party1", "dealer")
_SERVER, _CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
USAGES = {"gateway": [_CLIENT], "party0": [_SERVER, _CLIENT], "party1": [_SERVER, _CLIENT],
          "dealer": [_SERVER, _CLIENT]}


@dataclass(frozen=True)
class Issued:
    role: str
    cert: Path
    key: Path
    sha256: str  # the pin: SHA-256 of the certificate's DER, lowercase hex


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privface"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _alt_names(role: str, extra_hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([role, "localhost", "127.0.0.1", "::1", *extra_hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("privface CA")).issuer_name(_name("privface CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", key)
    return cert, key


def issue(out: Path, role: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int,
          extra_hosts: list[str] | None = None, cn: str | None = None) -> Issued:
    """One role's key and certificate, signed by the CA, written as ``<role>.pem`` / ``<role>.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn or role)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(USAGES.get(role, [_SERVER, _CLIENT])), critical=False)
            .add_extension(x509.SubjectAlternativeName(_alt_names(role, extra_hosts or [])), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = out / f"{role}.pem", out / f"{role}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return Issued(role, cert_path, key_path, fingerprint(cert))


def pins_env(issued: dict[str, Issued]) -> str:
    """The pin to hand out: each party serves only the gateway's client certificate."""
    return ("# privface certs: the gateway's pin (SHA-256 of its certificate's DER), for party0 and party1\n"
            f"PRIVFACE_PARTY_GATEWAY_CERT_SHA256={issued['gateway'].sha256}\n")


SECRETS = {  # name -> who gets it
    "PRIVFACE_SECRET_KEY": "gateway, worker",
    "PRIVFACE_PARTY0_TOKEN": "gateway, worker, party0",
    "PRIVFACE_PARTY1_TOKEN": "gateway, worker, party1",
    "PRIVFACE_MPC_SECRET_P0_DEALER": "party0, dealer",
    "PRIVFACE_MPC_SECRET_P1_DEALER": "party1, dealer",
    "PRIVFACE_MPC_SECRET_P0_P1": "party0, party1",
}


def secrets_env() -> str:
    """Fresh random credentials, one per link (``os.urandom`` via ``secrets``); each line says who gets it."""
    lines = ["# privface certs: one credential per link. Give each process ONLY the lines that name it."]
    for name, holders in SECRETS.items():
        lines += [f"# {holders}", f"{name}={secrets.token_urlsafe(32)}"]
    return "\n".join(lines) + "\n"


def make_all(out: Path, days: int = 825, extra_hosts: list[str] | None = None, force: bool = False) -> dict[str, Issued]:
    """CA + every role's certificate in ``out`` (refuses to overwrite a CA unless ``force``), pins.env and
    secrets.env (fresh per-link credentials, mode 0600)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.pem").exists() and not force:
        raise FileExistsError(f"{out / 'ca.pem'} exists (use --force to replace every certificate)")
    ca, ca_key = make_ca(out, days)
    issued = {role: issue(out, role, ca, ca_key, days, extra_hosts) for role in ROLES}
    (out / "pins.env").write_text(pins_env(issued))
    secrets_path = out / "secrets.env"
    secrets_path.write_text(secrets_env())
    secrets_path.chmod(0o600)
    return issued
