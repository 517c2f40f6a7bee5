"""Where this process stands among the processes of a run.

:func:`rank_and_world` is the one place the package asks for its rank and the number of processes: from a
Lightning Trainer when a component has one, else from ``torch.distributed``.
"""

from __future__ import annotations

import torch


def rank_and_world(trainer=None) -> tuple[int, int]:
    """This process's rank and the number of processes.

    Args:
        trainer: A Lightning Trainer: its ``global_rank`` and ``world_size``. Without one, the default
            ``torch.distributed`` process group's rank and size when it is initialized, else ``(0, 1)``.

    Example::

        >>> rank_and_world()  # no trainer, no process group
        (0, 1)
    """
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
