"""The `transformers.Trainer` every ftsafety training stage uses: the LM head runs only on scored positions.

A causal LM's loss needs the logits of the positions whose next token is labelled, nothing else. The
stock forward projects every position onto the vocabulary (49,152 entries for SmolLM2, 32,000 for
Llama-2) and then ignores the prompt's and the padding's rows: on SST-2, where the answer is a word or
two after a 60-token prompt, that is ~95% of the LM head's work and of the cross-entropy's, about a
fifth of a LoRA training step. Here the positions are selected first, with the `logits_to_keep` boolean
mask transformers' models accept, and the loss is transformers' own `ForCausalLMLoss` on the same
labels (`shift_labels`), so the mean, the `num_items_in_batch` scaling and everything the Trainer does
around it are unchanged; only the order of floating-point sums can differ (tests/test_trainer.py
compares losses and gradients with the stock path).

Models whose forward does not slice with transformers' `slice_logits_to_keep` get the stock path, and the
trainer says so once in the log (`FtTrainer.scored_head` records which path runs); on the locked
transformers the tests fail if the tiny OPT and Llama models do not take the fast path.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as Fn
from transformers import Trainer

log = logging.getLogger(__name__)
IGNORE = -100
_SUPPORT: dict[type, bool] = {}


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / accelerate and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def masks_logits(model: torch.nn.Module) -> bool:
    """True when the model's forward takes a boolean `logits_to_keep` mask and hands `shift_labels` on
    to its loss (transformers >= 5 causal LMs)."""
    lm = _causal_lm(model)
    cls = type(lm)
    if cls not in _SUPPORT:
        try:
            src = inspect.getsource(cls.forward)
            params = inspect.signature(cls.forward).parameters
            _SUPPORT[cls] = ("slice_logits_to_keep(" in src and "logits_to_keep" in params
                             and any(p.kind is p.VAR_KEYWORD for p in params.values()))
        except (OSError, TypeError):
            _SUPPORT[cls] = False
    return _SUPPORT[cls]


def scored_positions(model: torch.nn.Module, inputs: dict) -> dict:
    """`inputs` with `logits_to_keep` (the positions whose next token is labelled) and the matching
    `shift_labels`; `inputs` itself where the model cannot take them or nothing would be saved."""
    labels = inputs.get("labels")
    if (labels is None or labels.ndim != 2 or "logits_to_keep" in inputs or "shift_labels" in inputs
            or not masks_logits(model)):
        return inputs
    shifted = Fn.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    keep = shifted != IGNORE
    if not bool(keep.any()):
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def _check_inputs(kwargs: dict) -> None:
    """What the ftsafety trainers need, said in one sentence where the stock Trainer would fail deep in a
    batch: tokenised rows (`ftsafety.data.SFTDataset`) and a padding collator (`ftsafety.data.Collator`)."""
    from ftsafety.errors import FtsafetyError

    for name in ("train_dataset", "alignment_dataset", "harmful_dataset"):
        data = kwargs.get(name)
        if data is None:
            continue
        try:
            first = data[0] if len(data) else None
        except (TypeError, KeyError, IndexError):
            continue
        if isinstance(first, dict) and "input_ids" not in first:
            raise FtsafetyError(f"{name} holds raw rows ({', '.join(map(str, list(first)[:4]))}); wrap them in "
                                "ftsafety.data.SFTDataset(rows, tokenizer, DataConfig()) to tokenise them")
    if kwargs.get("train_dataset") is not None and kwargs.get("data_collator") is None:
        raise FtsafetyError("data_collator is missing: pass data_collator=ftsafety.data.Collator(tokenizer.pad_token_id) "
                            "(the rows have different lengths and must be padded)")


class FtTrainer(Trainer):
    """`transformers.Trainer` whose loss projects only the scored positions onto the vocabulary."""

    def __init__(self, *args, **kwargs):
        _check_inputs(kwargs)
        super().__init__(*args, **kwargs)
        self.scored_head = masks_logits(self.model)
        if not self.scored_head:
            import transformers

            log.warning("training: %s's forward does not take a boolean logits_to_keep on transformers %s; the LM "
                        "head runs on every position (the stock, slower loss)", type(_causal_lm(self.model)).__name__,
                        transformers.__version__)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, scored_positions(model, inputs), return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
