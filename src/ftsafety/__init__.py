"""ftsafety: defenses against harmful fine-tuning of LLMs behind one CLI and one evaluator."""

__version__ = "0.1.0"
