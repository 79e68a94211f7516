#!/usr/bin/env python3
"""Checks that a model folder written by sdpo's `save_model` loads in transformers unchanged
and computes what the Rust side computes on it.

    cargo build --bin sdpo-run
    /tmp/refenv/bin/python tools/check_checkpoint.py                  # f32 and bf16, made from a fixture
    /tmp/refenv/bin/python tools/check_checkpoint.py --dtype bf16     # only bf16
    /tmp/refenv/bin/python tools/check_checkpoint.py --checkpoint DIR --data PAIRS.jsonl   # a folder you have

Without --checkpoint it first makes one: `sdpo-run debug-step --model MODEL ... --save-model
DIR --save-dtype DTYPE` loads MODEL with sdpo's loader and writes it back with `save_model`.
Then, on the checkpoint:
1. transformers loads it with `from_pretrained` (strict: no missing, unexpected or mismatched
   tensors), and the config's dtype is the one saved;
2. `sdpo-run debug-step --model DIR` computes the per-pair completion log-probs on it (the
   log-softmax of the Rust engine's logits at every completion token, summed per sequence);
3. PyTorch computes the same from its logits, TRL-style (fp32, eager attention); the two must
   agree within 1e-5 relative, and for an f32 checkpoint, torch's logits on the checkpoint
   must equal its logits on the source model bit for bit.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import LlamaForCausalLM

from make_fixtures import trl_sequences  # tools/ is on sys.path when run as a script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def torch_logits_and_logps(model_dir, pairs):
    model, info = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                   output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"FAIL: transformers reports {bad} loading {model_dir}")
    model.eval()
    ids, att, comp = trl_sequences(pairs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    s = (lp * comp[:, 1:]).sum(-1)
    n = len(pairs)
    return logits * att[:, :, None], s[:n], s[n:]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"FAIL: {' '.join(cmd)}\n{r.stderr}")


def check(args, dtype, work):
    with open(args.data) as f:
        pairs = [json.loads(l) for l in f if l.strip()]
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(work, f"ckpt-{dtype}")
        run([args.sdpo_run, "debug-step", "--model", args.model, "--data", args.data, "--device", "cpu",
             "--out", os.path.join(work, f"source-{dtype}"), "--save-model", ckpt, "--save-dtype", dtype])
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    saved = cfg.get("dtype", cfg.get("torch_dtype"))
    print(f"{ckpt}: config dtype {saved}; files {sorted(os.listdir(ckpt))}")
    if args.checkpoint is None:
        want = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
        if saved != want:
            sys.exit(f"FAIL: config.json says dtype {saved}, saved as {want}")

    out = os.path.join(work, f"rust-{dtype}")
    run([args.sdpo_run, "debug-step", "--model", ckpt, "--data", args.data, "--device", "cpu", "--out", out])
    with open(os.path.join(out, "metrics.json")) as f:
        rust = json.load(f)["pairs"]
    logits, tc, tr = torch_logits_and_logps(ckpt, pairs)
    worst = 0.0
    for i, p in enumerate(rust):
        for got, want in ((p["policy_chosen_logp"], tc[i].item()), (p["policy_rejected_logp"], tr[i].item())):
            worst = max(worst, abs(got - want) / abs(want))
    print(f"  rust vs torch completion log-probs ({2 * len(rust)} sequences): worst relative error {worst:.2e}")
    ok = worst <= 1e-5
    if args.checkpoint is None:
        src_logits, _, _ = torch_logits_and_logps(args.model, pairs)
        diff = (logits - src_logits).abs().max().item()
        print(f"  torch logits, checkpoint vs source model: max |diff| {diff:.3e}"
              + (" (must be 0 for f32)" if dtype == "f32" else " (bf16/f16 rounding of the weights)"))
        if dtype == "f32" and diff != 0.0:
            ok = False
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdpo-run", default=os.path.join(ROOT, "target", "debug", "sdpo-run"))
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "gqa", "policy"))
    ap.add_argument("--data", default=os.path.join(ROOT, "tests", "fixtures", "gqa", "pairs.jsonl"))
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], action="append")
    ap.add_argument("--checkpoint", help="an existing folder to check (skips making one)")
    args = ap.parse_args()
    dtypes = args.dtype or (["f32"] if args.checkpoint else ["f32", "bf16"])
    ok = True
    with tempfile.TemporaryDirectory() as work:
        for d in dtypes:
            ok &= check(args, d, work)
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
