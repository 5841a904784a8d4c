"""A device's own identity: a private key that never leaves it, and a signing request for the
fleet CA (``cogbert pki sign-csr``)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cogbert_edge._internal.fs import atomic_write
from cogbert_edge.wire.topics import check_device_id

__all__ = ["make_key_and_csr"]


def make_key_and_csr(device_id: str, directory: Path) -> tuple[Path, Path]:
    """Write ``directory/key.pem`` (0600, ECDSA P-256) and ``directory/csr.pem``; return both."""
    check_device_id(device_id)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    key_path, csr_path = directory / "key.pem", directory / "csr.pem"
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path
