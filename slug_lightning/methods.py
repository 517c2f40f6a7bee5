"""The unlearning methods a run can use: SLUG, and the baselines it is compared with (:mod:`slug_lightning.baselines`).

Kept apart from the methods themselves so that the command line can list them without importing torch.
"""

METHODS = ("slug", "ft", "ga", "gaft", "salun", "ssd")
ITERATIVE = ("ft", "ga", "gaft", "salun")  # the baselines that take optimiser steps
