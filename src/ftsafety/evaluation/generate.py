"""Greedy, batched generation: left padding, KV cache, batches sorted by prompt length, finished rows dropped.

`generate` encodes every prompt once, sorts the prompts by token length (longest first, so a batch holds
prompts of similar length and little padding), and decodes each batch greedily with the model's KV cache.
The tokens every prompt of a batch starts with (the template's header) run once per batch and their keys
and values are copied to each row. The KV cache is reserved for the whole generation (each step writes its
token in place, no concatenation). A row that has produced EOS leaves the batch at once: its KV-cache row,
mask row and position are dropped (`Cache.batch_select_indices`), so the remaining steps compute only the
rows still generating, and the batch stops when every row has finished. Under greedy decoding each row's tokens are those of
`model.generate` on that prompt alone (the pred.py way of the original repos): the same forward passes
on the same positions, with the padded positions masked. Where the model's generation config asks for
logits processors (repetition penalty, forced or suppressed tokens, ...) or the model is not a plain
decoder with a cache that can drop rows, `model.generate` decodes each batch instead, and the log says
so once. Batches of fewer than FAST_MIN_ROWS rows also go to `model.generate`: there our loop was not
1.3x faster on the embedded model (results/bench.md). `engine="hf"` forces `model.generate`,
`engine="ftsafety"` our loop; the `stats` dict names the engine that ran.

`generate_from_ids` owns what `model.generate` does not do: each prompt encoded once, prompts sorted by
length so a batch has little padding, batching, sharding over processes, and the stats.

`shard=True` with several processes (accelerate launch / torchrun): the batches are formed exactly as in
one process (same sort, same batch_size), process r decodes batches r, r + P, r + 2P, ... and every
process gets all the results back in the prompts' order (one gather): the same tokens as one process,
since every batch is the same batch. Every process must make the call.
"""

from __future__ import annotations

import inspect
import logging
import time

import torch

from ftsafety import distributed

log = logging.getLogger(__name__)
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Log a fallback once per process (not once per batch)."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)

# generation-config fields that add logits processors under greedy decoding: a non-default value sends the
# batch to model.generate, which applies them
_PROCESSOR_FIELDS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
    "renormalize_logits": (None, False), "watermarking_config": (None,), "remove_invalid_values": (None, False),
    "prefill_chunk_size": (None,), "cache_implementation": (None, "dynamic"),
}


# engine="auto" runs our loop only on batches of at least this many rows: measured on SmolLM2-135M (2 CPU
# threads, transformers 5.23 and 5.24, scripts/bench_eval.py, three runs), batched model.generate on the same
# batches took 0.96-1.23x our loop's time at 16 rows, 1.28-1.46x at 64 and 1.34-1.82x at 128 (results/bench.md);
# issue #14's rule keeps a hand-written path only where it is at least 1.3x faster.
FAST_MIN_ROWS = 64
ENGINES = ("auto", "hf", "ftsafety")


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def cache_kwarg(model, params: set[str] | None = None) -> str | None:
    """The name under which the model's forward takes its KV cache: `cache` (transformers >= 5.24),
    `past_key_values` (earlier releases), None when it takes neither. `params`: the forward's parameter
    names when the caller has them already."""
    params = _forward_params(model) if params is None else params
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _out_cache(res):
    """The cache a forward returned, under either release's field name."""
    cache = getattr(res, "cache", None)
    return cache if cache is not None else getattr(res, "past_key_values", None)


def fast_path_reason(model) -> str | None:
    """None when our greedy loop reproduces model.generate (a decoder-only LM that takes a KV cache and
    position ids, and a generation config that adds no logits processor); else why it does not apply."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return "not a decoder-only model"
    params = _forward_params(model)
    if cache_kwarg(model, params) is None:
        return f"{type(model).__name__}.forward takes no KV cache argument (cache / past_key_values)"
    missing = {"attention_mask", "position_ids"} - params
    if missing:
        return f"{type(model).__name__}.forward takes no {', '.join(sorted(missing))}"
    gcfg = getattr(model, "generation_config", None)
    if gcfg is not None:
        for name, defaults in _PROCESSOR_FIELDS.items():
            value = getattr(gcfg, name, None)
            if value not in defaults and not (isinstance(value, (list, tuple, dict)) and not value):
                return f"the generation config sets {name}={value!r} (a logits processor)"
    return None


def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live in a buffer reserved for the whole generation: each
        step writes its token in place instead of concatenating (copying) the whole cache. `keys`/`values`
        are views of the filled part, holding the same numbers as DynamicLayer's."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._n = 0
            self._rows: slice | None = None  # the rows the next updates write (a prefill group), None: all

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n0, n1 = self._n, self._n + key_states.shape[-2]
            if self._k is None or n1 > self._k.shape[-2]:  # first call, or past the reservation: grow
                cap = max(self.capacity, n1)
                rows = self._k.shape[0] if self._k is not None else key_states.shape[0]
                k = key_states.new_zeros((rows, *key_states.shape[1:-2], cap, key_states.shape[-1]))
                v = value_states.new_zeros((rows, *value_states.shape[1:-2], cap, value_states.shape[-1]))
                if n0:
                    k[..., :n0, :] = self._k[..., :n0, :]
                    v[..., :n0, :] = self._v[..., :n0, :]
                self._k, self._v = k, v
            k, v = (self._k, self._v) if self._rows is None else (self._k[self._rows], self._v[self._rows])
            k[..., n0:n1, :] = key_states
            v[..., n0:n1, :] = value_states
            self._n = n1
            self.keys, self.values = k[..., :n1, :], v[..., :n1, :]
            return self.keys, self.values

        def window(self, rows: slice | None, start: int) -> None:
            """Make the next updates write the batch rows `rows` from column `start` on (one group of a
            grouped prefill; the columns before `start` that the group does not fill stay zero and are
            masked); `window(None, end)` returns to the whole batch once every group has run."""
            self._rows, self._n = rows, start
            k, v = (self._k, self._v) if rows is None else (self._k[rows], self._v[rows])
            self.keys, self.values = k[..., :start, :], v[..., :start, :]

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self._k is None or self._n == 0:
                return
            n = self._n
            k = self._k.new_zeros((self._k.shape[0] * repeats, *self._k.shape[1:]))  # zeros: see window()
            v = self._v.new_zeros((self._v.shape[0] * repeats, *self._v.shape[1:]))
            k[..., :n, :] = self._k[..., :n, :].repeat_interleave(repeats, dim=0)
            v[..., :n, :] = self._v[..., :n, :].repeat_interleave(repeats, dim=0)
            self._k, self._v = k, v
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._k is None or self._n == 0:
                return
            n = self._n
            k = self._k.new_empty((len(indices), *self._k.shape[1:]))
            v = self._v.new_empty((len(indices), *self._v.shape[1:]))
            k[..., :n, :] = self._k[indices, ..., :n, :]
            v[..., :n, :] = self._v[indices, ..., :n, :]
            self._k, self._v = k, v
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

    return ReservedLayer


def _reserved_cache(model, capacity: int):
    """The DynamicCache the model would build, its full-attention layers reserving `capacity` positions;
    None (the model builds its own) where it holds any other kind of layer."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - an unusual config: let the model build its cache
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    reserved = _reserved_layer_class()
    cache.layers = [reserved(capacity) for _ in cache.layers]
    return cache


def common_prefix_len(seqs: list[list[int]], min_len: int = 8) -> int:
    """Length of the token prefix every sequence shares (each keeps at least one token after it); 0 when
    shorter than `min_len`."""
    limit = min(len(x) for x in seqs) - 1
    first, p = seqs[0], 0
    while p < limit and all(x[p] == first[p] for x in seqs):
        p += 1
    return p if p >= min_len else 0


def share_prefix_ok(model) -> bool:
    """True when `generate_from_ids` can run a batch's shared prompt prefix once (our cache fits the model)."""
    return fast_path_reason(model) is None and _reserved_cache(model, 1) is not None


def prefill_groups(mask: torch.Tensor, rows: int) -> list[tuple[slice, int]]:
    """Consecutive groups of `rows` rows of a left-padded batch sorted longest first (one group: the whole
    batch), each with the width its longest prompt needs."""
    n = mask.shape[0]
    groups = [slice(0, n)] if rows <= 0 or n <= rows else [slice(a, min(a + rows, n)) for a in range(0, n, rows)]
    return [(g, int(mask[g].sum(-1).max())) for g in groups]


def _grouped_prefill(model, cache, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, p: int,
                     groups: list[tuple[slice, int]], extra: dict, ckw: str) -> torch.Tensor:
    """The prompts' forward pass group by group, each group padded only to its own longest prompt, into
    the batch's reserved cache (every row right-aligned at column p + width, as one padded forward would
    leave it); the last position's logits of every row."""
    width = ids.shape[1]
    last = []
    for g, w in groups:
        for layer in cache.layers:
            layer.window(g, p + width - w)
        att = torch.cat([mask.new_ones((ids[g].shape[0], p)), mask[g]], dim=-1)
        res = model(input_ids=ids[g, width - w :], attention_mask=att, position_ids=pos[g, width - w :],
                    use_cache=True, return_dict=True, **{ckw: cache}, **extra)
        last.append(res.logits[:, -1])
        del res
    for layer in cache.layers:
        layer.window(None, p + width)
    return torch.cat(last)


def _greedy_rows(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int | None,
                 keep_logits: bool, stats: dict | None = None, prefix: list[int] | None = None,
                 prefill_rows: int = 0) -> list[list[int]]:
    """Greedy tokens of each row of a left-padded batch, EOS excluded, finished rows dropped as they finish.

    The inputs are those model.generate builds: position ids from the mask (0 on padding), no mask when the
    batch has no padding, logits of the last position only. With `prefix` (tokens every prompt of the batch
    starts with; `ids` then holds the rest of each prompt, left-padded), the prefix runs once, its keys
    and values are copied to every row, and each row's rest follows at the positions it has in the whole
    prompt: the sequence [prefix, padding, rest], the padding masked. There, `prefill_rows` > 0 runs the
    prompts' rest in groups of that many rows (`prefill_groups`), each padded to its own longest prompt
    only: the padding of the other rows is never computed, the cache ends up as one forward leaves it."""
    n = ids.shape[0]
    p = len(prefix) if prefix else 0
    cache = _reserved_cache(model, p + ids.shape[1] + max_new_tokens)
    if p and cache is None:
        raise ValueError("a shared prefix needs a cache that can copy rows (see share_prefix_ok)")
    extra = {"logits_to_keep": 1} if keep_logits else {}
    ckw = cache_kwarg(model)
    t_start = time.perf_counter()
    if p:
        pre = torch.tensor([prefix], dtype=torch.long, device=ids.device)
        model(input_ids=pre, attention_mask=None, position_ids=torch.arange(p, device=ids.device)[None],
              use_cache=True, return_dict=True, **{ckw: cache}, **extra)
        cache.batch_repeat_interleave(n)
        pos = (p + mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        full = torch.cat([mask.new_ones((n, p)), mask], dim=-1)
        att: torch.Tensor | None = None if bool((full == 1).all()) else full
    else:
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        att = None if bool((mask == 1).all()) else mask
    live = torch.arange(n, device=ids.device)  # original row of each row still in the batch
    out: list[list[int]] = [[] for _ in range(n)]
    step_ids, step_pos = ids, pos
    groups = prefill_groups(mask, prefill_rows if p else 0)
    if stats is not None:
        stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + p + sum(w * (g.stop - g.start) for g, w in groups)
    for t in range(max_new_tokens):
        if t == 0 and len(groups) > 1:
            nxt = _grouped_prefill(model, cache, ids, mask, pos, p, groups, extra, ckw).argmax(-1)
        else:
            res = model(input_ids=step_ids, attention_mask=att, position_ids=step_pos, use_cache=True,
                        return_dict=True, **{ckw: cache}, **extra)
            cache = _out_cache(res)
            nxt = res.logits[:, -1].argmax(-1)  # argmax of the fp32 copy model.generate takes is the same index
            del res
        nxt_list = nxt.tolist()
        rows = live.tolist()
        if stats is not None:
            if t == 0:
                stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - t_start
            else:
                stats["decode_row_steps"] = stats.get("decode_row_steps", 0) + len(rows)
        done = [tok == eos for tok in nxt_list]
        for r, tok, d in zip(rows, nxt_list, done):
            if not d:
                out[r].append(tok)
        if t + 1 == max_new_tokens or all(done):
            break
        if any(done):  # drop the finished rows from the batch and from the cache
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=ids.device)
            cache.batch_select_indices(keep)
            live, nxt, pos = live[keep], nxt[keep], pos[keep]
            if att is not None:
                att = att[keep]
        step_ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        step_pos = pos
        if att is not None:
            att = torch.cat([att, att.new_ones((att.shape[0], 1))], dim=-1)
    return out


def _hf_rows(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int,
             eos: int | None) -> list[list[int]]:
    """The same tokens by model.generate (EOS and what follows cut off)."""
    gen = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad, eos_token_id=eos, use_cache=True, temperature=None, top_p=None, top_k=None,
    )
    rows = []
    for row in gen[:, ids.shape[1]:].tolist():
        rows.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    return rows


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
    """The token ids `generate` feeds for each prompt (special tokens added, the tail kept when cut): encode
    prompts that are generated from again and again once, and pass the ids to `generate_from_ids`."""
    from ftsafety.data import encode_prompt

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_tokens:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    return encoded


@torch.inference_mode()
def generate_from_ids(
    model,
    tokenizer,
    encoded: list[list[int]],
    max_new_tokens: int = 128,
    batch_size: int = 64,
    progress=None,
    description: str = "generating",
    engine: str = "auto",
    shard: bool = False,
    stats: dict | None = None,
    share_prefix: bool = True,
    prefill_rows: int = 16,
) -> list[list[int]]:
    """Generated token ids (EOS excluded) for each encoded prompt, in their order. engine: auto (our loop
    where it reproduces model.generate and batches hold at least FAST_MIN_ROWS rows, else model.generate),
    hf (model.generate always) or ftsafety (our loop always; an error where it cannot apply). shard: split
    the batches over the processes of a multi-process launch (see the module doc). A `stats` dict gets
    (added to it) batches, prompt_tokens, padded_prompt_tokens and, on our loop, prefill_s and
    decode_row_steps (rows computed by the decoding steps after the first): this process's batches.
    share_prefix (our loop): the prompt tokens every prompt of a batch starts with (a template's header)
    run once per batch; the rest of each prompt follows at its own positions (see `_greedy_rows`), its
    forward pass run in groups of `prefill_rows` prompts of similar length (0: the whole batch at once)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not encoded:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    reason = fast_path_reason(model) if engine != "hf" else None
    if engine == "ftsafety" and reason is not None:
        raise ValueError(f"engine ftsafety cannot run this model: {reason}")
    rows_per_batch = min(batch_size, len(encoded))
    fast = engine == "ftsafety" or (engine == "auto" and reason is None and rows_per_batch >= FAST_MIN_ROWS)
    if engine == "auto" and reason is not None:
        _say_once(f"generation: model.generate decodes each batch ({reason}); our faster loop does not apply")
    keep_logits = fast and "logits_to_keep" in _forward_params(model)
    share = share_prefix and fast and share_prefix_ok(model)
    if share_prefix and fast and not share:
        _say_once("generation: the shared prompt prefix is not run once per batch (the model's KV cache is not "
                  "a plain DynamicCache of full-attention layers)")
    if stats is not None:
        stats["engine"] = "ftsafety" if fast else "hf"
        stats["shared_prefix"] = share
        if reason is not None:
            stats["fallback_reason"] = reason
        elif engine == "auto" and not fast:
            stats["engine_reason"] = (f"batches of {rows_per_batch} rows: below {FAST_MIN_ROWS} our loop is not "
                                      f"1.3x faster than model.generate (results/bench.md)")
    out: list[list[int] | None] = [None] * len(encoded)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    sharded = shard and distributed.world_size() > 1
    if sharded:  # whole batches, round robin: each is the batch one process would decode
        batches = batches[distributed.rank() :: distributed.world_size()]
    total = sum(len(b) for b in batches)
    task = progress.add_task(description, total=total, info="") if progress is not None else None
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            p = common_prefix_len([encoded[i] for i in idx]) if share and len(idx) > 1 else 0
            width = max(len(encoded[i]) for i in idx) - p
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                e = encoded[i][p:]
                ids[row, width - len(e) :] = torch.tensor(e, dtype=torch.long)
                mask[row, width - len(e) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            if stats is not None:
                stats["batches"] = stats.get("batches", 0) + 1
                stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + sum(len(encoded[i]) for i in idx)
                stats["padded_prompt_tokens"] = stats.get("padded_prompt_tokens", 0) + p + width * len(idx)
                stats["shared_prefix_tokens"] = stats.get("shared_prefix_tokens", 0) + p
            if fast:
                prefix = encoded[idx[0]][:p] if p else None
                rows = _greedy_rows(model, ids, mask, max_new_tokens, eos, keep_logits, stats, prefix, prefill_rows)
            else:
                rows = _hf_rows(model, ids, mask, max_new_tokens, pad, eos)
            for row, i in enumerate(idx):
                out[i] = rows[row]
            if task is not None:
                progress.advance(task, len(idx))
    finally:
        if was_training:
            model.train()
    if sharded:
        for part in distributed.gather_objects({i: out[i] for idx in batches for i in idx}):
            for i, tokens in part.items():
                out[i] = tokens
    return out  # type: ignore[return-value]


def generate_tokens(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 64,
    progress=None,
    description: str = "generating",
    max_prompt_tokens: int | None = None,
    engine: str = "auto",
    shard: bool = False,
    stats: dict | None = None,
) -> list[list[int]]:
    """Generated token ids of each prompt (EOS excluded), in the prompts' order; each prompt encoded once."""
    return generate_from_ids(model, tokenizer, encode_prompts(tokenizer, prompts, max_prompt_tokens),
                             max_new_tokens, batch_size, progress, description, engine, shard, stats)


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def generate_with_counts(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 64,
                         progress=None, description: str = "generating", max_prompt_tokens: int | None = None,
                         engine: str = "auto", shard: bool = False,
                         stats: dict | None = None) -> tuple[list[str], list[int]]:
    """Completions and the number of tokens generated for each (EOS excluded): no re-tokenising to count."""
    toks = generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, progress, description,
                           max_prompt_tokens, engine, shard, stats)
    return [decode(tokenizer, t) for t in toks], [len(t) for t in toks]


def generate(model, tokenizer, prompts: list[str], *args, **kwargs) -> list[str]:
    """Return one completion per prompt, in the prompts' order (the arguments of `generate_tokens`).
    batch_size=1 is the one-prompt-at-a-time way of the original repos' pred.py."""
    return generate_with_counts(model, tokenizer, prompts, *args, **kwargs)[0]
