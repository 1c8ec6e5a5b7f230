"""What an evaluation measures, apart from which model, data and task: shared by `ftsafety evaluate`
(`EvalConfig` extends it) and a recipe's `evaluate:` section (which is exactly this)."""

from __future__ import annotations

from dataclasses import dataclass

from ftsafety import prompt_sets
from ftsafety.errors import FtsafetyError
from ftsafety.options import knob


@dataclass
class EvalSettings:
    judge: str = knob("keyword", "ftsafety-judge[:dir] (learned, offline, three classes) | keyword | compliance | "
                                 "beaver-dam[:path] | llama-guard[:path] | classifier:<id-or-path>.")
    hs_prompts: str = knob("beavertails", "Harmful prompts for HS: beavertails | advbench | hexphi | catqa | harmbench | "
                                          "strongreject | jbb | a .jsonl/.json/.csv/.parquet/.txt file.",
                           key_when_set=True)
    or_prompts: str = knob("builtin", "Benign instructions for OR: builtin | xstest | a file.", key_when_set=True)
    prompt_field: str | None = knob(None, "The prompt column of a prompt file (default: the first of prompt, goal, "
                                          "Goal, Behavior, forbidden_prompt, Question, question, instruction).",
                                    key_when_set=True)
    hs_limit: int = knob(700, "Harmful prompts to score (0 skips HS).")
    fa_limit: int = knob(872, "Task test items (0 skips FA).")
    or_limit: int = knob(100, "Benign instructions for over-refusal (0 skips OR).")
    # >= FAST_MIN_ROWS: our generation loop (1.28-1.46x model.generate at 64 rows on CPU)
    batch_size: int = knob(64, "Prompts generated together.")
    # Vaccine: 128; Lisa/Booster/Antidote: 512
    max_new_tokens: int = knob(128, "New tokens per HS and OR answer.")
    # classification answers are one word; use 200-512 for GSM8K
    fa_max_new_tokens: int = knob(32, "New tokens per FA answer.")

    def __post_init__(self):
        for name in ("hs_limit", "fa_limit", "or_limit"):
            if getattr(self, name) < 0:
                raise FtsafetyError(f"--{name.replace('_', '-')} must be >= 0 (0 skips it), got {getattr(self, name)}")
        if self.hs_limit == self.fa_limit == self.or_limit == 0:
            raise FtsafetyError("nothing to evaluate: --hs-limit, --fa-limit and --or-limit are all 0")
        for name in ("batch_size", "max_new_tokens", "fa_max_new_tokens"):
            if getattr(self, name) < 1:
                raise FtsafetyError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        prompt_sets.check_spec(self.hs_prompts, "harmful")
        prompt_sets.check_spec(self.or_prompts, "benign")
        if self.prompt_field is not None and not self.prompt_field.strip():
            raise FtsafetyError("--prompt-field must name a column, got an empty string")
