"""Lightning callbacks of slug_lightning. Import as ``slug_lightning.callbacks``."""

from slug_lightning.callbacks.step_search import StepSearch

__all__ = ["StepSearch"]
