"""The common evaluator: harmful score (HS, HS+), fine-tune accuracy (FA), over-refusal (OR)."""

from ftsafety.evaluation.judges import JUDGES, get_judge

__all__ = ["JUDGES", "get_judge"]
