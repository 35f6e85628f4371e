"""Training loop, evaluation, checkpoints and distributed helpers."""

from vladapt.engine.evaluate import EvalResult, evaluate, evaluate_many, predict_many, prefix_plan

__all__ = ["EvalResult", "evaluate", "evaluate_many", "predict_many", "prefix_plan"]
