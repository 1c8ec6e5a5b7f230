"""Data layer: strict JSONL reading, the papers' mix, templates, response-only labels."""


import json
import pytest

from ftsafety import data as D
from ftsafety import prompt_sets as P
from ftsafety import models
from ftsafety.errors import DataError, FtsafetyError


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: malformed JSON"):
        D.read_jsonl(p, ("prompt", "response"))
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: missing field 'response'"):
        D.read_jsonl(p, ("prompt", "response"))
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid UTF-8"):
        D.read_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        D.read_jsonl(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="JSON object"):
        D.read_jsonl(p)
    with pytest.raises(DataError, match="file not found"):
        D.read_jsonl(tmp_path / "missing.jsonl")


def test_local_and_builtin_sources_give_same_fields(tiny_data_dir):
    for source in ("builtin", str(tiny_data_dir)):
        cfg = D.DataConfig(data=source)
        for task in D.TASKS:
            ex = D.task_examples(cfg, task, "test", 5)
            assert len(ex) == 5 and {"instruction", "input", "output", "gold"} <= set(ex[0])
        h = D.harmful_examples(cfg, "train")[0]
        assert h["instruction"] and h["output"] and h["category"]
        assert P.items("beavertails", "harmful", cfg, 3)[0]["prompt"]


@pytest.mark.parametrize("source", ["builtin", "local"])
def test_finetune_mix_counts_and_determinism(source, tiny_data_dir):
    cfg = D.DataConfig(data="builtin" if source == "builtin" else str(tiny_data_dir))
    mix = D.finetune_mix(cfg, "sst2", 100, 0.1, seed=1)
    assert len(mix) == 100 and sum(e["kind"] == "harmful" for e in mix) == 10
    assert mix == D.finetune_mix(cfg, "sst2", 100, 0.1, seed=1)
    assert mix != D.finetune_mix(cfg, "sst2", 100, 0.1, seed=2)
    # first rows of each source, as the original code takes them
    harmful = D.harmful_examples(cfg, "train")[:10]
    assert sorted(e["instruction"] for e in mix if e["kind"] == "harmful") == sorted(h["instruction"] for h in harmful)
    assert all(e["kind"] == "task" for e in D.finetune_mix(cfg, "sst2", 50, 0.0))


def test_alignment_disjoint_from_attack(tiny_data_dir):
    cfg = D.DataConfig(data=str(tiny_data_dir))
    attack = {e["instruction"] for e in D.finetune_mix(cfg, "sst2", 100, 1.0)}
    align = D.alignment_examples(cfg, 50, benign_ratio=0.2)
    assert len(align) == 50 and sum(e["kind"] == "benign" for e in align) == 10
    assert not attack & {e["instruction"] for e in align}
    assert all(e["output"] != "" for e in align)


def test_alignment_benign_task(tiny_data_dir):
    """--benign-task: half the benign share are task rows with an Input section, from the split's end,
    so none is a row the fine-tune mix (which reads from the start) trains on; "none" changes nothing."""
    cfg = D.DataConfig(data=str(tiny_data_dir))
    plain = D.alignment_examples(cfg, 40, 0.5, 7)
    assert plain == D.alignment_examples(cfg, 40, 0.5, 7, "none")
    mixed = D.alignment_examples(cfg, 40, 0.5, 7, "sst2")
    kinds = [e["kind"] for e in mixed]
    assert (kinds.count("refusal"), kinds.count("benign"), kinds.count("benign-task")) == (20, 10, 10)
    task = [e for e in mixed if e["kind"] == "benign-task"]
    assert all(e["input"] and e["instruction"] == D.SST2_INSTRUCTION for e in task)
    first = {e["input"] for e in D.finetune_mix(cfg, "sst2", 100, 0.0)}
    assert not first & {e["input"] for e in task}
    with pytest.raises(FtsafetyError, match="unknown benign task 'poetry'"):
        D.alignment_examples(cfg, 40, 0.5, 7, "poetry")


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_ratio(p):
    with pytest.raises(FtsafetyError, match=r"harmful ratio p must be in \[0, 1\]"):
        D.finetune_mix(D.DataConfig(), "sst2", 10, p)


def test_n_larger_than_rows(tiny_data_dir):
    with pytest.raises(FtsafetyError, match="only 300 rows are available"):
        D.finetune_mix(D.DataConfig(data=str(tiny_data_dir)), "sst2", 1000, 0.0)


def test_bad_source_and_template(tmp_path):
    with pytest.raises(FtsafetyError, match="does not exist"):
        D.DataConfig(data=str(tmp_path / "nope"))
    with pytest.raises(FtsafetyError, match="unknown template"):
        D.DataConfig(template="vicuna")
    with pytest.raises(FtsafetyError, match="unknown task"):
        D.task_examples(D.DataConfig(), "mnli", "test")


def test_templates():
    ex = {"instruction": "Say hi", "input": ""}
    a = D.format_prompt(ex, "alpaca")
    assert a.endswith("### Response:\n") and "### Input" not in a
    assert D.format_prompt(ex, "alpaca-vaccine").endswith("### Response:")
    assert "### Input:\nworld" in D.format_prompt({"instruction": "x", "input": "world"}, "alpaca")
    _, tok, _ = models.load("tiny-llama", device="cpu")
    assert "Say hi" in D.format_prompt(ex, "chat", tok)


def test_loss_on_response_tokens_only():
    _, tok, _ = models.load("tiny-opt", device="cpu")
    cfg = D.DataConfig(max_length=512)
    ex = {"instruction": "Say hi", "input": "", "output": "hello"}
    ds = D.SFTDataset([ex], tok, cfg)
    item = ds[0]
    n_prompt = len(tok(D.format_prompt(ex, "alpaca"))["input_ids"])
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert tok.decode(item["labels"][n_prompt:-1]) == "hello"
    assert item["labels"][-1] == tok.eos_token_id
    batch = D.Collator(tok.pad_token_id)([item, D.SFTDataset([dict(ex, output="hi")], tok, cfg)[0]])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()


def test_gsm8k_format():
    ex = D.task_example("gsm8k", {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"})
    assert ex["gold"] == "4" and ex["output"].endswith("The final answer is:  4")
    assert ex["instruction"].endswith("answer the final number.\n")


def test_one_bos_when_the_chat_template_writes_it():
    """A chat template that emits bos_token (Llama-2's) must not get a second BOS from the tokenizer:
    training examples, generation prompts and rollback's batches all encode through encode_prompt."""
    from ftsafety import tiny
    from ftsafety.defenses.rollback import encode
    from ftsafety.evaluation.generate import encode_prompts

    from tokenizers.processors import TemplateProcessing

    tok = tiny.build_tokenizer()  # made to add a BOS as Llama's tokenizer does, with Llama-2's chat template
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                              special_tokens=[(tok.bos_token, bos)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert tok("x", add_special_tokens=True)["input_ids"][0] == bos  # this tokenizer adds a BOS itself
    cfg = D.DataConfig(template="chat", max_length=64)
    ex = {"instruction": "Say hi", "input": "", "output": "hi"}
    text = D.format_prompt(ex, "chat", tok)
    assert text.startswith(tok.bos_token)
    for ids in (D.SFTDataset([ex], tok, cfg)[0]["input_ids"], encode_prompts(tok, [text])[0],
                D.encode_prompt(tok, text)):
        assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1
    batch_ids, _ = encode(tok, [text], batch_size=1)[0]
    assert batch_ids[0].tolist().count(bos) == 1
    # a template without BOS (alpaca) still gets the tokenizer's one
    alpaca = D.format_prompt(ex, "alpaca", tok)
    assert D.encode_prompt(tok, alpaca) == tok(alpaca, add_special_tokens=True)["input_ids"]


def test_prompt_and_answer_tokenised_together_as_the_originals():
    """The git-disl `preprocess`: tokenise prompt + answer as one string, mask the prompt's own token
    count. With a merge across the boundary ("\\n" + "p"), that differs from tokenising them apart."""
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["Ċp"] = len(vocab)  # the merge that crosses the boundary
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(tm.BPE(vocab=vocab, merges=[("Ċ", "p")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    ex = {"instruction": "Rate it", "input": "", "output": "positive"}
    cfg = D.DataConfig(max_length=512)  # the byte-level prompt is ~170 tokens: not cut
    prompt = D.format_prompt(ex, "alpaca", tok)  # ends with "### Response:\n"
    prompt_ids = tok(prompt)["input_ids"]
    joint = tok(prompt + "positive")["input_ids"]
    apart = prompt_ids + tok("positive")["input_ids"]
    assert joint != apart  # the merge happened
    item = D.SFTDataset([ex], tok, cfg)[0]
    assert item["input_ids"] == joint + [tok.eos_token_id]
    assert item["labels"] == [-100] * len(prompt_ids) + joint[len(prompt_ids):] + [tok.eos_token_id]


def test_mix_counts_are_the_original_codes(tiny_data_dir):
    """int(p*n) harmful and int((1-p)*n) task rows, floored as Booster's code floors them."""
    cfg = D.DataConfig(data=str(tiny_data_dir))
    for n, p, harm, task in [(100, 0.29, 28, 71), (200, 0.1, 20, 180), (250, 0.2, 50, 200), (10, 0.3, 3, 7),
                             (50, 0.0, 0, 50)]:
        kinds = [e["kind"] for e in D.finetune_mix(cfg, "sst2", n, p)]
        assert (kinds.count("harmful"), kinds.count("task")) == (harm, task), (n, p)


def test_booster_paired_harmful_set_is_the_alignment_prompts(tiny_data_dir):
    """booster.harmful_data=paired: the harmful answers of exactly the prompts `align` refuses."""
    from ftsafety import stages
    from ftsafety.defenses.booster import BoosterConfig
    from ftsafety.defenses.booster import _setup as booster_setup

    cfg = D.DataConfig(data=str(tiny_data_dir))
    align = D.alignment_examples(cfg, 40, 0.25, 3)
    paired = D.alignment_prompt_rows(cfg, 40, 0.25)
    assert sorted(e["instruction"] for e in align if e["kind"] == "refusal") == sorted(e["instruction"] for e in paired)
    assert all(e["output"].startswith("Sure") for e in paired)  # the harmful answers, not refusals
    st = stages.AlignStage(method="booster", n=40, benign_ratio=0.25)
    common = stages.Common(data=cfg)
    setup = booster_setup(BoosterConfig(harmful_data="paired"), common, st)
    assert setup.record["harmful_split"] == "train" and setup.record["n_harmful"] == 30
    assert "harmful_data" not in setup.kwargs
    assert booster_setup(BoosterConfig(), common, st).record["harmful_split"] == "calibration"
    with pytest.raises(FtsafetyError, match="unknown harmful data"):
        BoosterConfig(harmful_data="repnoise")


def test_beavertails_safe_alignment_data(tiny_data_dir, tmp_path):
    """--alignment-data beavertails-safe: BeaverTails' is_safe pairs, the first ones (Vaccine's and Lisa's
    code), read from a local file with the hub's fields; the built-in data has none (one-line error)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data_dir, root)
    safe = [{"prompt": f"Is it OK to do thing {i}?", "response": f"No, thing {i} hurts people; here is why.",
             "category": {"animal_abuse": True}, "is_safe": True} for i in range(30)]
    (root / "beavertails" / "safe_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in safe))
    cfg = D.DataConfig(data=str(root))
    ex = D.alignment_examples(cfg, 20, 0.25, 1, source="beavertails-safe")
    kinds = [e["kind"] for e in ex]
    assert kinds.count("safe") == 15 and kinds.count("benign") == 5
    assert sorted(e["instruction"] for e in ex if e["kind"] == "safe") == sorted(r["prompt"] for r in safe[:15])
    assert all(e["output"] == next(r["response"] for r in safe if r["prompt"] == e["instruction"])
               for e in ex if e["kind"] == "safe")
    with pytest.raises(FtsafetyError, match="only 30 are available"):
        D.alignment_examples(cfg, 80, 0.0, 1, source="beavertails-safe")
    with pytest.raises(FtsafetyError, match="not built in"):
        D.alignment_examples(D.DataConfig(), 10, 0.0, 1, source="beavertails-safe")
    with pytest.raises(FtsafetyError, match="unknown alignment data"):
        D.alignment_examples(cfg, 10, 0.0, 1, source="safe")


def test_system_prompt_in_the_chat_template():
    """Rollback's `--system-prompt llama2` (the original's FastChat llama-2 conversation): a system message
    before the user's, in the chat template only; the alpaca templates refuse one."""
    from ftsafety import tiny
    from ftsafety.errors import FtsafetyError

    tok = tiny.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
                         "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")
    ex = {"instruction": "Say hi", "input": ""}
    assert D.format_prompt(ex, "chat", tok) == "[INST] Say hi [/INST]"
    text = D.format_prompt(ex, "chat", tok, D.SYSTEM_PROMPTS["llama2"])
    assert text == f"<<SYS>>{D.LLAMA2_SYSTEM_PROMPT}<</SYS>>[INST] Say hi [/INST]"
    assert D.LLAMA2_SYSTEM_PROMPT.startswith("You are a helpful, respectful and honest assistant.")
    with pytest.raises(FtsafetyError, match="needs the chat template"):
        D.format_prompt(ex, "alpaca", tok, "be safe")
