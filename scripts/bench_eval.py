"""Benchmark: batched evaluation generation against one prompt at a time (the original pred.py way).

Run as:  python scripts/bench_eval.py [--model smollm2-135m] [--n 128] [--max-new-tokens 64]
         [--batch-sizes 32,64] [--single-n N] [--threads 1] [--data builtin]

One run, one model, the same N BeaverTails evaluation prompts (Alpaca template) for every way:
  * one at a time, as the original repos' pred.py does it: the prompt tokenised alone and one
    `model.generate` call per prompt (greedy, the same max_new_tokens, stopping at EOS);
  * batched, our `generate` for each batch size: every prompt encoded once, batches of similar length
    (sorted), the prompt prefix a batch shares (the template's header) run once per batch, KV cache
    reserved for the whole generation, rows that produced EOS dropped from the batch.
Throughput is generated tokens (EOS excluded) per second of wall time; the speed-up is the ratio of
the two throughputs. With --single-n below N the one-at-a-time way runs on every (N/single-n)-th prompt
only (its tokens/s barely depends on which prompts). Greedy outputs of both ways are compared prompt
by prompt where both ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ftsafety import data as D
from ftsafety import models
from ftsafety.evaluation.generate import encode_prompts, generate_from_ids


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.inference_mode()
def pred_py_generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The original repos' loop: tokenise one prompt, one model.generate call, keep the new tokens up to EOS."""
    dev = next(model.parameters()).device
    eos, pad = tok.eos_token_id, (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=True)
        gen = model.generate(
            input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
            temperature=None, top_p=None, top_k=None,
        )
        row = gen[0, enc["input_ids"].shape[1]:].tolist()
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def run(model: str = "smollm2-135m", data: str = "builtin", n: int = 128, max_new_tokens: int = 64,
        batch_sizes: tuple[int, ...] = (32, 64), single_n: int | None = None, device: str = "auto",
        threads: int = 0, loaded=None) -> dict:
    """Time both ways on the same prompts; returns the measurements (see the module docstring)."""
    if threads > 0:
        torch.set_num_threads(threads)
    if loaded is None:
        net, tok, _ = models.load(model, device=device)
    else:
        net, tok = loaded
    dev = next(net.parameters()).device
    cfg = D.DataConfig(data=data)
    items = D.harmful_eval_prompts(cfg, n)
    prompts = [D.format_prompt({"instruction": p["prompt"]}, cfg.template, tok) for p in items]
    n = len(prompts)
    single_n = n if not single_n or single_n >= n else single_n
    stride = n / single_n
    single_idx = sorted({int(i * stride) for i in range(single_n)})
    generate_from_ids(net, tok, encode_prompts(tok, prompts[:2]), 4, 2)  # warm-up
    pred_py_generate(net, tok, prompts[:1], 4)

    _sync(dev)
    t0 = time.perf_counter()
    single = pred_py_generate(net, tok, [prompts[i] for i in single_idx], max_new_tokens)
    _sync(dev)
    single_s = time.perf_counter() - t0
    single_tokens = sum(map(len, single))
    rows = {"one_at_a_time": {"prompts": len(single_idx), "seconds": round(single_s, 3),
                              "generated_tokens": single_tokens, "tokens_per_s": round(single_tokens / single_s, 2)}}
    batched = {}
    for bs in batch_sizes:
        _sync(dev)
        t0 = time.perf_counter()
        encoded = encode_prompts(tok, prompts)  # part of the batched way's cost
        stats: dict = {}
        toks = generate_from_ids(net, tok, encoded, max_new_tokens, bs, stats=stats)
        _sync(dev)
        secs = time.perf_counter() - t0
        total = sum(map(len, toks))
        same = sum(toks[i] == s for i, s in zip(single_idx, single))
        batched[bs] = {"prompts": n, "batch_size": bs, "seconds": round(secs, 3), "generated_tokens": total,
                       "tokens_per_s": round(total / secs, 2), "identical_to_one_at_a_time": f"{same}/{len(single)}",
                       "speedup": round((total / secs) / (single_tokens / single_s), 3),
                       "prefill_share": round(stats.get("prefill_s", 0.0) / secs, 4),
                       # prompt tokens the prefills computed (their padding in, the shared template prefix once
                       # per batch) and those one padded forward per batch would have computed
                       "prefill_tokens_over_prompt_tokens": round(
                           stats.get("prefill_tokens", stats["padded_prompt_tokens"]) / stats["prompt_tokens"], 4),
                       "batch_padded_tokens_over_prompt_tokens": round(
                           stats["padded_prompt_tokens"] / stats["prompt_tokens"], 4),
                       "decode_row_steps": stats.get("decode_row_steps")}
        lengths = [len(t) for t in toks]
    rows["batched"] = {str(bs): v for bs, v in batched.items()}
    prompt_lens = [len(e) for e in encode_prompts(tok, prompts)]
    return {
        "model": model, "device": str(dev), "threads": torch.get_num_threads(), "prompts": n,
        "max_new_tokens": max_new_tokens, "batch_sizes": list(batch_sizes), **rows,
        "prompt_tokens_median": statistics.median(prompt_lens),
        "response_tokens_mean": round(statistics.fmean(lengths), 1),
        "responses_at_max_new_tokens": round(sum(x >= max_new_tokens for x in lengths) / len(lengths), 3),
        "speedup": {str(bs): v["speedup"] for bs, v in batched.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--single-n", type=int, default=0, help="prompts for the one-at-a-time way (0: all N)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="32,64")
    ap.add_argument("--batch-size", type=int, default=0, help="one batch size (overrides --batch-sizes)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = ap.parse_args(argv)
    sizes = (args.batch_size,) if args.batch_size else tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
    report = run(args.model, args.data, args.n, args.max_new_tokens, sizes, args.single_n, args.device, args.threads)
    print(json.dumps(report, indent=2))
    one = report["one_at_a_time"]["tokens_per_s"]
    for bs, row in report["batched"].items():
        print(f"batch {bs}: {row['speedup']:.1f}x the generated tokens/s of one prompt at a time "
              f"({row['tokens_per_s']} vs {one}); identical outputs {row['identical_to_one_at_a_time']}")
    return report


if __name__ == "__main__":
    main()
