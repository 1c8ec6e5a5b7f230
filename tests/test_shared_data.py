"""The ../shared/data copies read through the local loader (skipped where ../shared is absent)."""

from ftsafety import data as D
from ftsafety import prompt_sets as P


def test_shared_copies_load_with_hub_fields(shared_data):
    cfg = D.DataConfig(data=str(shared_data))
    assert len(D.harmful_examples(cfg, "train")) == 1500
    assert len(D.harmful_examples(cfg, "calibration")) == 500
    ev = P.items("beavertails", "harmful", cfg)
    assert len(ev) == 700 and len({e["category"] for e in ev}) == 14
    assert len(D.task_examples(cfg, "sst2", "test")) == 872
    assert {e["gold"] for e in D.task_examples(cfg, "ag_news", "test")} == set(D.AG_NEWS_LABELS)
    g = D.task_examples(cfg, "gsm8k", "test", 3)
    assert all("The final answer is: " in e["output"] for e in g)


def test_shared_splits_disjoint(shared_data):
    cfg = D.DataConfig(data=str(shared_data))
    train = {e["instruction"] for e in D.harmful_examples(cfg, "train")}
    calib = {e["instruction"] for e in D.harmful_examples(cfg, "calibration")}
    ev = {e["prompt"] for e in P.items("beavertails", "harmful", cfg)}
    assert not (ev & train) and not (ev & calib)
    mix = D.finetune_mix(cfg, "sst2", 1000, 0.1)
    align = D.alignment_examples(cfg, 300, 0.3)
    assert not {e["instruction"] for e in mix} & {e["instruction"] for e in align}
