"""Node identities: Ed25519 keys stored with mode 0600 under the node's home.

The private key never leaves the home; the public key (32 bytes, shown as hex) names
the node in every signature, and its fingerprint (the first 16 hex characters of its
SHA-256) is the short name users see.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hivemerge.protocol.content import sha256_hex
from hivemerge.protocol.errors import UserInputError

KEY_FILE = "identity.key"
HOME_ENV = "HIVEMERGE_HOME"


def default_home(home: str | Path | None = None) -> Path:
    """``--home`` if given, else ``$HIVEMERGE_HOME``, else ``~/.hivemerge``."""
    if home is not None:
        return Path(home).expanduser()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    return Path.home() / ".hivemerge"


def fingerprint(public_key: bytes) -> str:
    return sha256_hex(public_key)[:16]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def check_private_file(path: Path) -> None:
    """A file that holds a private key must be readable by its owner alone (mode 0600):
    one that others can read may already have leaked, and the user should know."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserInputError(
            f"{path}: permissions {mode:04o} are too open; the key must be private (chmod 600 {path})"
        )


class Identity:
    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    # -- storage --------------------------------------------------------------------
    def save(self, home: Path) -> Path:
        """Write the key to ``home/identity.key``, created with mode 0600 (never overwritten)."""
        home.mkdir(parents=True, exist_ok=True)
        path = home / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UserInputError(f"{path}: an identity already exists; refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as f:
            f.write(self.private_bytes())
        os.chmod(path, 0o600)  # in case the umask was stricter than needed, or looser
        return path

    @classmethod
    def load(cls, home: Path) -> "Identity":
        path = home / KEY_FILE
        if not path.is_file():
            raise UserInputError(f"{home}: no identity (create one with `hivemerge identity new --home {home}`)")
        check_private_file(path)
        raw = path.read_bytes()
        if len(raw) != 32:
            raise UserInputError(f"{path}: not an Ed25519 private key ({len(raw)} bytes, expected 32)")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load_or_create(cls, home: Path) -> "Identity":
        if (home / KEY_FILE).exists():
            return cls.load(home)
        identity = cls.generate()
        identity.save(home)
        return identity
