"""Throwaway certificates made with the `openssl` command: a CA, and one certificate it signs
that serves both as a server's and as a client's (mutual TLS between pagedserve's services,
and TLS to Redis in tests). For `pagedserve up --internal-tls`, not for production: the key
files are written unencrypted into the directory given.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True, slots=True)
class CertFiles:
    ca: str  # the CA certificate (PEM) every side trusts
    cert: str  # a certificate the CA signed, for serverAuth and clientAuth
    key: str  # its private key
    ca_key: str  # the CA's key, to sign more (a second, untrusted client in a test, say)


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the `openssl` command is needed to make certificates (apt-get install openssl)")
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _san(names: tuple[str, ...]) -> str:
    parts = [f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names]
    return "subjectAltName=" + ",".join(parts)


def make_ca(directory: str | Path, name: str = "pagedserve-internal-ca") -> tuple[str, str]:
    """A self-signed CA in `directory`: (certificate, key) paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.pem", d / "ca-key.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    return str(ca), str(ca_key)


def sign(directory: str | Path, ca: str, ca_key: str, stem: str, names: tuple[str, ...] = DEFAULT_NAMES) -> tuple[str, str]:  # fmt: skip
    """A certificate for `names` (server and client use) signed by the CA: (certificate, key)."""
    d = Path(directory)
    cert, key, csr, ext = d / f"{stem}.pem", d / f"{stem}-key.pem", d / f"{stem}.csr", d / f"{stem}.ext"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={names[0]}",
             "-keyout", str(key), "-out", str(csr))  # fmt: skip
    ext.write_text(f"{_san(names)}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "7",
             "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    csr.unlink()
    ext.unlink()
    return str(cert), str(key)


def make_certs(directory: str | Path, names: tuple[str, ...] = DEFAULT_NAMES) -> CertFiles:
    """A CA and one certificate for `names` it signs, in `directory`."""
    ca, ca_key = make_ca(directory)
    cert, key = sign(directory, ca, ca_key, "service", names)
    return CertFiles(ca=ca, cert=cert, key=key, ca_key=ca_key)
