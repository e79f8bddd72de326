"""privtune: federated, privacy-preserving fine-tuning and private inference for language models.

Layers, each importing only the ones below it:

- ``privtune`` (this folder, ``orchestration/``): the ``privtune`` command, ``simulate``, ``demo``
  and the run reports. It drives both parties, so it is the only layer that may import both.
- ``privtune.server`` (the model owner's Flower ServerApp, preparation, the PMixED service) and
  ``privtune.client`` (a data owner's Flower ClientApp and the query client). They never import
  each other: in a deployment they run on different machines of parties that do not trust each other.
- ``privtune.common``: what both parties use. It never imports upward.
"""
