"""Fine-tune accuracy: the scoring rules live with the task declarations (`ftsafety.tasks`)."""

from ftsafety.tasks import extract_number, is_correct

__all__ = ["extract_number", "is_correct"]
