"""Training passes: finetune (with distillation) and musco (compress, fine-tune, recompress in stages)."""
from .loop import FitHistory, FitOptions, Labelled

__all__ = ["FitHistory", "FitOptions", "Labelled"]
