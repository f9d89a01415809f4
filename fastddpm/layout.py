"""Memory-layout helpers shared by the eager fused loop (`fastddpm.sampler`) and the
captured loop (`fastddpm.graphs`); a module below both, so neither imports the other back."""
from __future__ import annotations

import torch


def follow_layout(x, mo):
    """x in the model output's layout when that is channels_last (else x itself): the fused
    step kernel then walks both in memory order and never copies the output."""
    if x.ndim == 4 and mo.ndim == 4 and not mo.is_contiguous() and \
            mo.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x
