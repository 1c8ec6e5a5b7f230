"""Fine-tune accuracy: the scoring rules live with the task declarations (`ftsafety.tasks`)."""

from ftsafety.tasks import accuracy_by_label, extract_number, is_correct

__all__ = ["accuracy_by_label", "extract_number", "is_correct"]
