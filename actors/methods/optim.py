"""The optimiser MaskInversion's ``optimizer`` setting names (every family's MaskInversion builds it here).

Upstream ``maskinversion-torch`` takes any ``torch.optim`` optimiser object; a job spec names one and its settings
(:class:`clipmaps.actors.params.OptimizerSettings`), fingerprinted like every setting.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..params import OptimizerSettings

#: The optimiser classes ``OptimizerSettings.name`` selects.
OPTIMIZER_CLASSES = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def make_optimizer(
    params_list: Iterable[Tensor], settings: str | OptimizerSettings, *, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimiser MaskInversion's ``optimizer`` setting names, over ``params_list``.

    Args:
        params_list: the tensors to optimise (the mask embeddings).
        settings: a name (``"adamw"``, ``"adam"``, ``"sgd"``) or :class:`OptimizerSettings`.
        lr: learning rate (``MaskInversionParams.lr``).
        weight_decay: ``MaskInversionParams.wd``; an ``OptimizerSettings.weight_decay`` that is set wins.

    Returns:
        a ``torch.optim`` optimiser; torch's own defaults for every field left unset (AdamW: betas (0.9, 0.999),
        eps 1e-8, as upstream, which passes only ``lr`` and ``weight_decay``).

    Raises:
        ValueError: an unknown name, or a field the named optimiser does not take (``betas`` for SGD).
    """
    if isinstance(settings, str):
        settings = OptimizerSettings(name=settings)
    cls = OPTIMIZER_CLASSES[settings.name]
    kwargs = settings.torch_kwargs()
    kwargs.setdefault("weight_decay", weight_decay)
    return cls(list(params_list), lr=lr, **kwargs)


__all__ = ["OPTIMIZER_CLASSES", "make_optimizer"]
