"""The one TLS profile of every connection the node makes or takes: DICOM associations in both
directions, STOW-RS and the audit repository.

TLS 1.2 or later. For TLS 1.2 only cipher suites with an ephemeral elliptic-curve key exchange
(forward secrecy) and authenticated encryption (AES-GCM, ChaCha20-Poly1305) are offered, as
BCP 195 recommends (RFC 9325, section 4.2); the CBC suites with SHA-2 that Python's default
context keeps, and the finite-field DHE suites, are not. TLS 1.3 suites are all AEAD and are
left as OpenSSL offers them."""

from __future__ import annotations

import ssl

#: the TLS 1.2 cipher suites offered and accepted (OpenSSL cipher-list syntax)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def new_context(purpose: ssl.Purpose, cafile: str | None = None) -> ssl.SSLContext:
    """A context for ``purpose`` (``SERVER_AUTH``: the node connects; ``CLIENT_AUTH``: it is
    connected to) with the profile above, trusting ``cafile`` (the system's CAs when None)."""
    context = ssl.create_default_context(purpose, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context
