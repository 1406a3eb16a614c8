"""The synthetic-scene kit: generated scenes with exact ground truth, no photos shipped.

* :mod:`.scenes`: draw a scene (coloured, textured shapes on a textured background) from a seed, at any size;
* :mod:`.scene_set`: write a set of scenes as pipeline input (JPEGs, a JSON-lines manifest with masks and prompts)
  with its ground truth;
* :mod:`.truth`: the ground-truth table (``truth.parquet``) written beside that manifest and read back by
  ``clipmaps eval``.

Used by ``clipmaps demo``, ``train``, ``eval``, ``figures``, ``k8s sample-input`` and the tests. Imports no torch.
"""
