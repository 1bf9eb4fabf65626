"""Key ratchet and sealing of notification content (SPEC section 4).

A device shares a 256-bit initial secret (``iss``) with the server. Each month has one key
generation: ``HKDF-SHA256(ikm, salt=None, info="YYYY-MM", length=64)``; the first 32 bytes are
the secret that feeds the next month, the last 32 bytes the AES-256-GCM key for that month.

The same module also seals the key generations the server stores (``ServerKey``): they are
encrypted at rest under a 256-bit key that lives outside the database.
"""

import base64
import hashlib
import hmac
import logging
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

BLOCK_SIZE = 1024
MAGIC = b"PNM1"
HEADER_SIZE = len(MAGIC) + 2
MAX_PAYLOAD_BYTES = BLOCK_SIZE - HEADER_SIZE
NONCE_SIZE = 12
SEALED_B64_LEN = 4 * ((NONCE_SIZE + BLOCK_SIZE + 16 + 2) // 3)

log = logging.getLogger("push")


@dataclass(frozen=True)
class Generation:
    """One month's key material: the ratchet secret and the AES-256-GCM key."""

    period: str
    secret: bytes
    aes_key: bytes


def parse_period(period):
    """Return (year, month) of a "YYYY-MM" string, or raise ValueError."""
    if len(period) != 7 or period[4] != "-" or not (period[:4] + period[5:]).isdigit():
        raise ValueError(f"not a YYYY-MM period: {period!r}")
    year, month = int(period[:4]), int(period[5:])
    if not 1 <= month <= 12 or year < 1:
        raise ValueError(f"not a YYYY-MM period: {period!r}")
    return year, month


def next_period(period):
    """The month after ``period``."""
    year, month = parse_period(period)
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def derive(ikm, period):
    """One HKDF step: the generation for ``period`` from the previous secret (or the iss)."""
    parse_period(period)
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=period.encode()).derive(ikm)
    return Generation(period, okm[:32], okm[32:])


def first_generation(iss, initial_key_period):
    """The generation of ``initial_key_period`` derived from the initial shared secret."""
    return derive(iss, initial_key_period)


def ratchet(generation, period):
    """Step ``generation`` forward month by month up to ``period``.

    A generation already at or past ``period`` (a device clock ahead of ours) is returned as is.
    """
    target = parse_period(period)
    while parse_period(generation.period) < target:
        generation = derive(generation.secret, next_period(generation.period))
    return generation


def pad(payload):
    """The 1024-byte plaintext block: PNM1, 2-byte padding length, spaces, payload."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload is {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES} fit")
    padding = BLOCK_SIZE - HEADER_SIZE - len(payload)
    return MAGIC + struct.pack(">H", padding) + b" " * padding + payload


def unpad(block):
    """The payload of a plaintext block made by ``pad``."""
    if len(block) != BLOCK_SIZE or block[:4] != MAGIC:
        raise ValueError("not a PNM1 block")
    (padding,) = struct.unpack(">H", block[4:6])
    return block[HEADER_SIZE + padding:]


def seal(aes_key, payload, nonce=None):
    """base64(nonce || AES-256-GCM(pad(payload)) || tag); a fresh random nonce unless given."""
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    return base64.b64encode(nonce + AESGCM(aes_key).encrypt(nonce, pad(payload), None)).decode()


def open_sealed(aes_key, sealed):
    """The payload of a ``seal`` result (what the app does on the phone)."""
    raw = base64.b64decode(sealed)
    nonce, ciphertext = raw[:NONCE_SIZE], raw[NONCE_SIZE:]
    return unpad(AESGCM(aes_key).decrypt(nonce, ciphertext, None))


class ServerKey:
    """The server's own 256-bit key: encrypts stored generations and fingerprints each iss."""

    def __init__(self, key):
        if len(key) != 32:
            raise ValueError("the server key must be 32 bytes")
        self._aead = AESGCM(key)
        self._mac_key = hashlib.sha256(b"push-iss-fingerprint" + key).digest()

    @classmethod
    def load(cls, configured, path):
        """Use the operator's key (hex or base64) if given, else the key file, made on first use."""
        if configured:
            try:
                raw = bytes.fromhex(configured)
            except ValueError:
                raw = base64.b64decode(configured, validate=True)
            return cls(raw)
        if not os.path.exists(path):
            # Write a complete file aside, then link it into place: a process booting at the
            # same moment sees either no key file or a whole one, and the first link wins.
            temporary = f"{path}.{os.getpid()}.{os.urandom(4).hex()}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(temporary)
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode & 0o777
            if mode & 0o044:
                log.warning("the server key %s can be read by group or others (mode %03o):"
                            " chmod 600 it", path, mode)
            return cls(bytes.fromhex(f.read().decode().strip()))

    def iss_fingerprint(self, iss):
        """A keyed digest of an iss: lets us tell "same iss" without keeping it."""
        return hmac.new(self._mac_key, iss, hashlib.sha256).hexdigest()

    def seal_generation(self, key_identifier, generation):
        """The generation encrypted at rest, bound to its key identifier and period."""
        nonce = os.urandom(NONCE_SIZE)
        aad = f"{key_identifier}|{generation.period}".encode()
        return nonce + self._aead.encrypt(nonce, generation.secret + generation.aes_key, aad)

    def open_generation(self, key_identifier, period, blob):
        """The generation that ``seal_generation`` stored."""
        aad = f"{key_identifier}|{period}".encode()
        plain = self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
        return Generation(period, plain[:32], plain[32:])
