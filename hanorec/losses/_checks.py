"""Input checks shared by the loss modules: every failure is a ``ValueError("<function>: ...")``."""

from __future__ import annotations

import torch
from torch import Tensor


def _check(ok: bool, where: str, message: str) -> None:
    """Raise ``ValueError("<where>: <message>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{where}: {message}")


def _shape(value: object) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_items(where: str, name: str, items: Tensor, num_items: int) -> None:
    integral = not (items.dtype.is_floating_point or items.dtype == torch.bool)
    _check(integral, where, f"{name} must hold integer item indices, got dtype {items.dtype}")
    bad = items[(items < 0) | (items >= num_items)]
    _check(bad.numel() == 0, where, f"{name} must lie in [0, {num_items}), got {bad.tolist()}")
