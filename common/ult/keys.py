"""Secret keys and the keyed permutation of ranks inside frequency bands.

A frequency ranking alone is no secret: public statistics of the language predict it. A key adds
a pseudo-random permutation of ranks *within* bands ``[0, w), [w, 2w), ...``: an id still says
roughly how common its symbol is (what lets a model trained under one table be fine-tuned under
another), but not which symbol it is. Everything is derived from one 32-byte
secret with domain-separated HMAC-SHA256 / SHAKE-256, so the permutation and the stored check
value reveal nothing about each other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from privtune.common.errors import PrivtuneError, WrongKeyError
from privtune.common.ult.config import UltConfig
from privtune.common.ult.table import KEY_CHECK_BYTES, LookupTable

KEY_BYTES = 32
_KEY_FILE_HEADER = "# privtune ULT key v1: keep secret; whoever holds it can read data encoded with it"
_PASSPHRASE_SALT = b"privtune-ult passphrase v1"


@dataclass(frozen=True)
class UltKey:
    """A 32-byte secret. Its repr never shows the secret."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise PrivtuneError(f"a ULT key is {KEY_BYTES} bytes, got {len(self.secret)}")

    def __repr__(self) -> str:
        return "UltKey(<secret>)"

    def _derive(self, purpose: bytes) -> bytes:
        return hmac.new(self.secret, b"privtune-ult " + purpose, hashlib.sha256).digest()


def new_key_file(path: str | os.PathLike[str], *, overwrite: bool = False, secret: bytes | None = None) -> UltKey:
    """Write a fresh random key (from ``secrets``; ``secret`` only for tests) readable by the owner only."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PrivtuneError(
            f"{path} exists; refusing to overwrite a key (data encoded with it would become unreadable)"
        )
    key = UltKey(secrets.token_bytes(KEY_BYTES) if secret is None else secret)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{_KEY_FILE_HEADER}\n{key.secret.hex()}\n")
    except OSError as err:
        raise PrivtuneError(f"cannot write key file {path}: {err.strerror or err}") from err
    return key


def load_key_file(path: str | os.PathLike[str]) -> UltKey:
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PrivtuneError(f"cannot read key file {path}: {err}") from err
    body = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    try:
        if len(body) != 1:
            raise ValueError
        return UltKey(bytes.fromhex(body[0]))
    except (ValueError, PrivtuneError):
        raise PrivtuneError(
            f"{path} is not a ULT key file (expected one line of {2 * KEY_BYTES} hex digits); "
            "make one with 'privtune ult new-key'"
        ) from None


def key_from_passphrase(passphrase: str) -> UltKey:
    """Derive a key with scrypt, so that federation members sharing a passphrase share the key.

    The salt is fixed (all members must derive the same key); scrypt's cost is what slows down
    guessing a weak passphrase against a stored key check value.
    """
    if not passphrase:
        raise PrivtuneError("the ULT passphrase is empty; set a long random passphrase or use a key file")
    secret = hashlib.scrypt(passphrase.encode("utf-8"), salt=_PASSPHRASE_SALT, n=2**14, r=8, p=1, dklen=KEY_BYTES)
    return UltKey(secret)


def key_check_value(key: UltKey) -> bytes:
    return key._derive(b"key check v1")[:KEY_CHECK_BYTES]


def bind_key(table: LookupTable, key: UltKey) -> LookupTable:
    """The same table, recording ``key``'s check value so that a wrong key is refused later."""
    return replace(table, key_check=key_check_value(key))


def verify_key(table: LookupTable, key: UltKey | None) -> None:
    """Raise :class:`WrongKeyError` unless ``key`` matches the key ``table`` is bound to (if any)."""
    if table.key_check is None:
        return
    if key is None:
        raise WrongKeyError(
            "this ULT table is bound to a secret key; give the key file (or passphrase) it was made with"
        )
    if not hmac.compare_digest(key_check_value(key), table.key_check):
        raise WrongKeyError(
            "wrong ULT key: it does not match the key this table was bound to "
            "(decoding with it would give garbage); use the key file or passphrase the data was encoded with"
        )


def band_permutation(key: UltKey | None, config: UltConfig) -> np.ndarray:
    """``perm[r]``: the keyed rank of rank ``r``, a uniform random permutation inside each band.

    Each band is ordered by 64-bit values from SHAKE-256 keyed with a subkey; ties have
    probability ~w^2/2^64, and argsort is deterministic even then. Identity without a key.
    """
    capacity, width = config.capacity, config.band_width
    if key is None:
        return np.arange(capacity, dtype=np.int64)
    seed = key._derive(b"permutation v1") + struct.pack("<QQ", capacity, width)
    values = np.frombuffer(hashlib.shake_256(seed).digest(8 * capacity), dtype="<u8")
    perm = np.empty(capacity, dtype=np.int64)
    full = capacity - capacity % width
    bands = values[:full].reshape(-1, width)
    starts = np.arange(0, full, width, dtype=np.int64)[:, None]
    perm[:full] = (np.argsort(bands, axis=1, kind="stable") + starts).ravel()
    if full < capacity:
        perm[full:] = full + np.argsort(values[full:], kind="stable")
    return perm


def permuted_rows(table: LookupTable, key: UltKey | None) -> np.ndarray:
    """Row index ``rows`` (length V) with ``keyed_weight = public_weight[rows]``.

    A model owner's embedding (and LM head) rows are indexed by public ids ``base + r``; under the
    key, rank ``r`` has id ``base + perm[r]``, so ``rows[base + perm[r]] = base + r``. Reserved ids
    map to themselves. A data owner applies this to warm-start from the public model without the
    model owner learning the key.
    """
    verify_key(table, key)
    config = table.config
    rows = np.arange(config.vocab_size, dtype=np.int64)
    rows[config.base + band_permutation(key, config)] = config.base + np.arange(config.capacity, dtype=np.int64)
    return rows
