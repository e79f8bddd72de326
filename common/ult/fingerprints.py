"""What a leaked table or key would look like on the wire, so the federation can test for it.

Tables and keys stay on the data owner's site. :func:`table_fingerprints` lists byte strings that
any leak worth worrying about would contain (the leading symbols in rank order in the encodings
this package writes, the key check value, the key itself, the keyed ids of the leading ranks);
a test can assert that none occurs in any message a client sends.
"""

from __future__ import annotations

import json

import numpy as np

from privtune.common.ult.keys import UltKey, band_permutation, key_check_value, verify_key
from privtune.common.ult.table import LookupTable

_LEADING = 16


def table_fingerprints(table: LookupTable, key: UltKey | None = None) -> list[bytes]:
    """Byte strings (each >= 16 bytes unless the table is tiny) that must not leave the site."""
    top = list(table.symbols[:_LEADING])
    prints: list[bytes] = []
    if top:
        prints += [
            json.dumps(top, separators=(",", ":"))[:-1].encode(),  # as save_table writes it
            json.dumps(top)[:-1].encode(),
            *_int_bytes(np.asarray(top, dtype=np.int64)),
        ]
    if table.key_check is not None:
        prints += [table.key_check, table.key_check.hex().encode()]
    if key is not None:
        verify_key(table, key)
        prints += [key.secret, key.secret.hex().encode(), key_check_value(key)]
        keyed = band_permutation(key, table.config)[:_LEADING]
        if (keyed != np.arange(keyed.size)).any():  # an identity permutation (band width 1) is no secret
            prints += _int_bytes(table.config.base + keyed)
    return list(dict.fromkeys(p for p in prints if p))


def _int_bytes(values: np.ndarray) -> list[bytes]:
    out = [values.astype("<i8").tobytes()]
    if values.max(initial=0) < 2**31:
        out.append(values.astype("<i4").tobytes())
    return out
