"""Training loop, evaluation, checkpoints and distributed helpers."""

from vladapt.engine.evaluate import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
