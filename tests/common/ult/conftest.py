"""Shared ULT test material: a small English corpus (public-domain Hamlet lines) and tables."""

from __future__ import annotations

import functools

import pytest

from privtune.common.ult import UltConfig, UltKey, UltTokenizer, bind_key, build_table

ENGLISH = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die—to sleep,
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream—ay, there's the rub:
For in that sleep of death what dreams may come,
When we have shuffled off this mortal coil,
Must give us pause—there's the respect
That makes calamity of so long life.
"""

KEY = UltKey(bytes(range(32)))
OTHER_KEY = UltKey(bytes(range(1, 33)))


@functools.cache
def english_table(patch_size: int = 8, vocab_size: int = 512, band_width: int = 16):
    return build_table([ENGLISH * 3], UltConfig(vocab_size=vocab_size, patch_size=patch_size, band_width=band_width))


@functools.cache
def tokenizer(patch_size: int = 8, keyed: bool = False, vocab_size: int = 512) -> UltTokenizer:
    table = english_table(patch_size, vocab_size)
    return UltTokenizer(bind_key(table, KEY), KEY) if keyed else UltTokenizer(table)


@pytest.fixture
def english() -> str:
    return ENGLISH
