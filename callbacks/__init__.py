"""Lightning callbacks of slug_lightning. Import as ``slug_lightning.callbacks``."""

from slug_lightning.callbacks.progress import SlugProgressBar
from slug_lightning.callbacks.progress_lines import ProgressLines
from slug_lightning.callbacks.step_search import StepSearch

__all__ = ["ProgressLines", "SlugProgressBar", "StepSearch"]
