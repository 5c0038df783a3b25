"""Score any model directory on both tasks (ShapesQA, ShapesGenEval) with one evaluator."""

from .runner import EVAL_DEFAULTS, evaluate_model, evaluate_model_dir

__all__ = ["EVAL_DEFAULTS", "evaluate_model", "evaluate_model_dir"]
