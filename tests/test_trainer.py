"""FtTrainer's loss (LM head on the scored positions only) equals the stock Trainer's, loss and gradients."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ftsafety import models
from ftsafety.trainer import FtTrainer, masks_logits, scored_positions


def _batch(tok, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding in the last row
    labels = torch.full_like(ids, -100)
    labels[0, 8:] = ids[0, 8:]
    labels[1, 10:] = ids[1, 10:]
    labels[2, 6:9] = ids[2, 6:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(trainer_cls, model, batch, num_items):
    trainer = trainer_cls(model=model, args=TrainingArguments(output_dir="unused", report_to=[], use_cpu=True))
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("num_items", [None, 7])
def test_scored_positions_loss_and_grads_match_stock(alias, num_items, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok, _ = models.load(alias, device="cpu")
    model = models.attach_lora(model, models.LoraSettings(r=4, alpha=8.0, dropout=0.0, targets="attn"))
    assert masks_logits(model)
    batch = _batch(tok, model.config.vocab_size)
    sliced = scored_positions(model, batch)
    assert int(sliced["logits_to_keep"].sum()) == 4 + 2 + 3  # one kept position per labelled token
    assert sliced["shift_labels"].tolist() == batch["labels"][batch["labels"] != -100].tolist()
    stock_loss, stock_grads = _loss_and_grads(Trainer, model, batch, num_items)
    ours_loss, ours_grads = _loss_and_grads(FtTrainer, model, batch, num_items)
    torch.testing.assert_close(ours_loss, stock_loss, rtol=1e-6, atol=1e-7)
    assert stock_grads.keys() == ours_grads.keys() and stock_grads
    for name in stock_grads:
        torch.testing.assert_close(ours_grads[name], stock_grads[name], rtol=1e-5, atol=1e-7)


def test_scored_positions_leaves_unlabelled_batches_alone():
    model, _, _ = models.load("tiny-llama", device="cpu")
    ids = torch.ones(2, 5, dtype=torch.long)
    none = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    assert scored_positions(model, none) is none
    assert scored_positions(model, {"input_ids": ids}) == {"input_ids": ids}


def test_report_to_reaches_the_trainer(tmp_path, monkeypatch):
    """--report-to (issue 18): passed to TrainingArguments; 'none' (the default) reports nowhere; an
    integration whose package is missing is refused up front (the fresh venv has neither package, so
    the installed set is stood in for)."""
    import torch
    from transformers.integrations import integration_utils as iu

    from ftsafety.errors import FtsafetyError
    from ftsafety.train import TrainConfig, training_args

    monkeypatch.setattr(iu, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(FtsafetyError, match="not installed"):
        TrainConfig(report_to="tensorboard")
    monkeypatch.setattr(iu, "get_available_reporting_integrations", lambda: ["tensorboard", "wandb"])
    args = training_args(TrainConfig(report_to="tensorboard, wandb"), torch.device("cpu"), str(tmp_path))
    assert list(args.report_to) == ["tensorboard", "wandb"]
    assert list(training_args(TrainConfig(), torch.device("cpu"), str(tmp_path)).report_to) in ([], ["none"])
