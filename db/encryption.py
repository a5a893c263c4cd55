"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) with key rotation.

Keys come newest first: the first encrypts, every key decrypts, so rotating is "prepend a new
key, restart, run `slopbox secrets rotate`, then drop the old key". Ciphertexts are stored as
text in ordinary columns through `EncryptedText`, so no query ever sees a plaintext secret
and a forgotten `decrypt` cannot leak one into a log line.
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class SecretDecryptionError(RuntimeError):
    """No configured key opens this ciphertext (key removed too early, or data tampered)."""


class Keyring:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._fernet = MultiFernet([Fernet(k.encode() if isinstance(k, str) else k) for k in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretDecryptionError("stored secret cannot be decrypted with the configured keys") from None

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt under the newest key (no-op in meaning, new bytes on disk)."""
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretDecryptionError("stored secret cannot be decrypted with the configured keys") from None


_keyring: Keyring | None = None


def configure_keys(keys: list[str]) -> Keyring:
    """Install the process-wide keyring; called once at start by every entry point."""
    global _keyring
    _keyring = Keyring(keys)
    return _keyring


def keyring() -> Keyring:
    if _keyring is None:
        raise RuntimeError("encryption keys not configured: call db.encryption.configure_keys() at start")
    return _keyring


class Secret(str):
    """A decrypted secret whose repr never shows its value (safe in tracebacks and logs)."""

    def __repr__(self) -> str:
        return "Secret('***')"


class EncryptedText(TypeDecorator[str]):
    """A text column holding Fernet ciphertext; Python sees the plaintext as `Secret`."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return keyring().encrypt(str(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> Secret | None:
        if value is None:
            return None
        return Secret(keyring().decrypt(value))
