"""``privtune audit``: how much an attacker really learns from a run, next to what privtune promises.

The harness (``privtune simulate --canaries K``) plants secrets in one owner's data and records
which of its records were trained on; ``privtune audit`` then runs membership inference and canary
extraction against the public, plugged-in and adapter models (and, with ``--address``, the PMixED
service through its API alone) and holds every measured point against the DP limit of its claim.
"""
