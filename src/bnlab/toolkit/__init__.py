"""Batch-norm tools PyTorch lacks: population statistics, folding, diagnostics."""

from .diagnose import LayerDiagnosis, diagnose, format_diagnosis
from .fold import fold
from .precise_bn import precise_bn

__all__ = ["LayerDiagnosis", "diagnose", "fold", "format_diagnosis", "precise_bn"]
