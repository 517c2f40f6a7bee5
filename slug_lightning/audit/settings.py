"""What an audit tries: the extra names, and the relearning budget (the same for every method)."""

from __future__ import annotations

from dataclasses import dataclass

from slug_lightning.errors import ConfigError
from slug_lightning.labelled_sets import validate_template

# lr 1e-5 is AdamW's usual fine-tuning rate for a pretrained CLIP; the forget top-1 is measured every
# RELEARN_EVERY steps, so a step count is a multiple of it.
# How many relearning pairs the audit tries (METHOD §10's relearning test), fewest first.
DEFAULT_KS = (4, 16, 64)
RELEARN_STEPS = 64
RELEARN_LR = 1e-5
RELEARN_EVERY = 4


@dataclass(frozen=True)
class AuditSettings:
    """The settings of an audit (``audit --run``, or the one at the end of ``unlearn``: ``--audit.relearn_ks``, ...).

    Args:
        templates: The held-out templates (each with one ``{}``), none of them the search's; empty: the shipped list
            (``slug_lightning/audit/templates.txt``) less any template the search used.
        paraphrases: More names to try for every concept, besides its aliases (e.g. ``"the CEO of Tesla"``).
        relearn_ks: Forget pairs to fine-tune on, one relearning run each; empty: no relearning. A ``k`` a concept's
            pairs do not allow is left out, and said so.
        relearn_steps: The relearning budget in optimizer steps (rounded down to a multiple of ``relearn_every``).
        relearn_lr: AdamW's learning rate of the relearning.
        relearn_every: Steps between two forget evaluations of the relearning.

    Raises:
        ConfigError: A malformed template, a ``k`` below 2 (a contrastive step needs two pairs), a negative budget,
            ``relearn_every`` below 1, or a learning rate that is not positive.

    Example::

        >>> AuditSettings(relearn_ks=(4,), relearn_steps=8).relearn_ks
        (4,)
    """

    templates: tuple[str, ...] = ()
    paraphrases: tuple[str, ...] = ()
    relearn_ks: tuple[int, ...] = DEFAULT_KS
    relearn_steps: int = RELEARN_STEPS
    relearn_lr: float = RELEARN_LR
    relearn_every: int = RELEARN_EVERY

    def __post_init__(self) -> None:
        # LightningCLI and YAML hand lists; a frozen settings object keeps tuples.
        object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        for template in self.templates:
            try:
                validate_template(template)
            except ValueError as error:
                raise ConfigError(f"templates: {error}", "templates", self.templates) from None
        object.__setattr__(self, "relearn_ks", tuple(self.relearn_ks))
        if any(k < 2 for k in self.relearn_ks):
            raise ConfigError(
                f"relearn_ks must be numbers of pairs >= 2, got {list(self.relearn_ks)}.", "relearn_ks", self.relearn_ks
            )
        if self.relearn_steps < 0 or self.relearn_every < 1:
            raise ConfigError(
                f"relearn_steps must be >= 0 and relearn_every >= 1, got {self.relearn_steps} and "
                f"{self.relearn_every}.",
                "relearn_steps" if self.relearn_steps < 0 else "relearn_every",
                self.relearn_steps if self.relearn_steps < 0 else self.relearn_every,
            )
        if not self.relearn_lr > 0:
            raise ConfigError(
                f"relearn_lr must be a positive learning rate, got {self.relearn_lr}.", "relearn_lr", self.relearn_lr
            )
