#!/usr/bin/env python3
"""One DPO training step in PyTorch eager fp32 on the CPU, on the shape of the CPU criterion
benchmark, for comparison with the Rust CPU engine:

    /tmp/refenv/bin/python tools/compare_torch_cpu.py [--threads 2] [--steps 20]

Model: a random LlamaForCausalLM, hidden 256, intermediate 688, 4 layers, 8 heads, 4 kv
heads, vocab 2048. Batch: 4 pairs of prompt 64 + chosen 64 + rejected 64 tokens, laid out
as TRL does: 8 sequences of 128 ([prompt | chosen] x4 then [prompt | rejected] x4; equal
lengths, so no padding). A step: forward and backward of the policy on the 8 sequences,
sigmoid DPO loss (beta 0.1) against reference log-probs computed once beforehand, AdamW
(lr 1e-6, HF Trainer's defaults otherwise; clip_grad_norm_(1.0)). Prints the median time of
a step over --steps steps after 3 warm-up steps, and the peak RSS of the process.
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
    model.train()
    n_pairs, lp, lc, lr_ = 4, 64, 64, 64
    prompt = torch.randint(0, cfg.vocab_size, (n_pairs, lp))
    chosen = torch.randint(0, cfg.vocab_size, (n_pairs, lc))
    rejected = torch.randint(0, cfg.vocab_size, (n_pairs, lr_))
    input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0)  # [8, 128]
    attention = torch.ones_like(input_ids)
    completion = torch.zeros_like(input_ids)
    completion[:, lp:] = 1
    mask = completion[:, 1:].float()

    def logps(m):
        logits = m(input_ids=input_ids, attention_mask=attention).logits
        per_tok = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        s = (per_tok * mask).sum(-1)
        return s[:n_pairs], s[n_pairs:]

    with torch.no_grad():
        ref_c, ref_r = logps(model)  # the reference: the model before training, computed once

    # HF Trainer's defaults: weight_decay 0.0, so one parameter group.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        pc, pr = logps(model)
        loss = -F.logsigmoid(0.1 * ((pc - ref_c) - (pr - ref_r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
    med = statistics.median(times) * 1e3
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = input_ids.numel()
    print(f"torch {torch.__version__} eager fp32, {args.threads} threads: DPO step (4 pairs, 8x128 tokens) "
          f"median {med:.1f} ms over {args.steps} steps (min {min(times)*1e3:.1f}, max {max(times)*1e3:.1f}); "
          f"{tokens / (med / 1e3):.0f} tokens/s; peak RSS {rss_mib:.0f} MiB; loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
