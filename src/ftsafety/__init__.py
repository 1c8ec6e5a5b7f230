"""ftsafety: defenses against harmful fine-tuning of LLMs behind one CLI and one evaluator.

The library the CLI is built on (imported lazily, so `import ftsafety` stays light):

    from ftsafety import VaccineTrainer, VaccineConfig, load_model, alignment_examples, SFTDataset
    from ftsafety import run_antidote, recover_rollback, evaluate, EvalConfig, DEFENSES

The trainers are `transformers.Trainer` subclasses; the post-fine-tuning functions and `evaluate`
take model specs (aliases, directories, run directories) and write run directories.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "VaccineTrainer": "ftsafety.defenses.vaccine", "VaccineConfig": "ftsafety.defenses.vaccine",
    "VaccineTrainingArguments": "ftsafety.defenses.vaccine",
    "BoosterTrainer": "ftsafety.defenses.booster", "BoosterConfig": "ftsafety.defenses.booster",
    "BoosterTrainingArguments": "ftsafety.defenses.booster",
    "LisaTrainer": "ftsafety.defenses.lisa", "LisaConfig": "ftsafety.defenses.lisa",
    "LisaTrainingArguments": "ftsafety.defenses.lisa", "FtTrainer": "ftsafety.trainer",
    "attach_lora": "ftsafety.models", "harmful_examples": "ftsafety.data",
    "AntidoteConfig": "ftsafety.defenses.antidote", "run_antidote": "ftsafety.defenses.antidote",
    "prune_antidote": "ftsafety.defenses.antidote",
    "RollbackConfig": "ftsafety.defenses.rollback",
    "DEFENSES": "ftsafety.defenses", "Defense": "ftsafety.defenses",
    "EvalConfig": "ftsafety.evaluation.evaluate", "evaluate": "ftsafety.evaluation.evaluate",
    "TrainConfig": "ftsafety.train", "train_lora": "ftsafety.train",
    "DataConfig": "ftsafety.data", "SFTDataset": "ftsafety.data", "Collator": "ftsafety.data",
    "alignment_examples": "ftsafety.data", "finetune_mix": "ftsafety.data",
    "LoraSettings": "ftsafety.models",
}
_RENAMED = {"recover_rollback": ("ftsafety.defenses.rollback", "run"), "load_model": ("ftsafety.models", "load")}

__all__ = ["__version__", *_EXPORTS, *_RENAMED]


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ftsafety' has no attribute {name!r}")
