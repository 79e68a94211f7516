#!/usr/bin/env python3
"""Checks that PEFT loads what `sdpo-run train --lora-r` saves and computes what sdpo-run
computes (run by hand; needs the reference environment and a built sdpo-run):

    cargo build && /tmp/refenv/bin/python tools/check_lora_peft.py [--bin target/debug/sdpo-run]

On the `llama3` fixture model (tests/fixtures) it trains two sDPO steps of LoRA with
sdpo-run, then for each step-t/ adapter folder:
  1. loads it with `PeftModel.from_pretrained(base, step-t)` (which must accept it as is);
  2. takes sdpo-run's own log-probs of base ⊕ that adapter (`sdpo-run debug-step
     --adapter`, metrics.json);
  3. merges it with `sdpo-run merge` and loads the merged folder with transformers;
  4. compares PEFT's per-pair completion log-probs (TRL's layout, as in make_fixtures.py)
     with those of 2 and 3: relative error <= 1e-5.
Prints the largest errors per step; exits non-zero on failure.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import sequence_logps  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def load(path):
    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "sdpo-run"))
    ap.add_argument("--model", default="llama3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base_dir = os.path.join(FIXTURES, args.model, "policy")
    data = os.path.join(FIXTURES, args.model, "pairs.jsonl")
    with open(data) as f:
        pairs = [json.loads(line) for line in f]
    worst_all = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        subprocess.run([args.bin, "train", "--quiet", "--device", "cpu", "--model", base_dir, "--data", data,
                        "--out", out, "--partition", "in-order", "--steps", "2", "--batch-pairs", "2",
                        "--lr", "1e-2", "--warmup-ratio", "0", "--lora-r", "4", "--lora-alpha", "16",
                        "--lora-targets", "all-linear", "--use-rslora"], check=True)
        for t in (1, 2):
            step = os.path.join(out, f"step-{t}")
            peft_model = PeftModel.from_pretrained(load(base_dir), step).eval()
            merged_dir = os.path.join(tmp, f"merged-{t}")
            subprocess.run([args.bin, "merge", "--model", base_dir, "--adapter", step, "--out", merged_dir],
                           check=True)
            dbg = os.path.join(tmp, f"debug-{t}")
            subprocess.run([args.bin, "debug-step", "--device", "cpu", "--model", base_dir, "--adapter", step,
                            "--data", data, "--out", dbg], check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(dbg, "metrics.json")) as f:
                ours = json.load(f)["pairs"]
            with torch.no_grad():
                pc, pr, _, _ = sequence_logps(peft_model, pairs)
                mc, mr, _, _ = sequence_logps(load(merged_dir), pairs)
                bc, _, _, _ = sequence_logps(load(base_dir), pairs)
            want = torch.cat([pc, pr]).double()
            merged = torch.cat([mc, mr]).double()
            sdpo = torch.tensor([p["policy_chosen_logp"] for p in ours] + [p["policy_rejected_logp"] for p in ours],
                                dtype=torch.float64)
            err_sdpo = ((sdpo - want).abs() / want.abs()).max().item()
            err_merged = ((merged - want).abs() / want.abs()).max().item()
            moved = (pc.double() - bc.double()).abs().max().item()
            print(f"step-{t}: PEFT vs sdpo-run log-probs max relative error {err_sdpo:.2e}, vs sdpo-run merge "
                  f"{err_merged:.2e} (the adapter moves them by up to {moved:.3f} nats)")
            assert moved > 1e-3, "the adapter should change the log-probs"
            worst_all = max(worst_all, err_sdpo, err_merged)
    if worst_all > 1e-5:
        sys.exit(f"FAILED: max relative error {worst_all:.2e} > 1e-5")
    print("ok")


if __name__ == "__main__":
    main()
