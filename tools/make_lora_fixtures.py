#!/usr/bin/env python3
"""Writes the PEFT reference fixtures in tests/fixtures/lora/ (run by hand, not in CI):

    /tmp/refenv/bin/python tools/make_lora_fixtures.py

Each case puts a PEFT LoRA adapter on the `policy/` model of one fixture model made by
make_fixtures.py (the frozen base) and writes, in tests/fixtures/lora/<case>/:
  adapter/            the adapter as PeftModel.save_pretrained writes it; lora_A as PEFT
                      initialises it (seed below), lora_B ~ N(0, 0.05²) instead of zero so
                      that the gradients of lora_A are not zero
  expected.json       per pair the policy and reference log-probs, the mean sigmoid loss
  grads.safetensors   the gradient of that loss for every lora_A / lora_B, PEFT's key names

A case with `lora_dropout` > 0 replaces PEFT's dropout modules by sdpo's own masks
(`lora::dropout_mask`, reimplemented below: seed DROPOUT_SEED, draw 0, keyed by the row of
sdpo's shared batch layout that each token of TRL's rows is), since PEFT draws its masks
from torch's generator; the reference is computed without dropout, as in eval mode.

The reference is what TRL's DPOTrainer uses for a PEFT model without a ref_model: the
same model with the adapter disabled (`reference: "base"`), or, for a stepwise run's
later steps, the adapter itself (`reference: "adapter"`: base ⊕ adapter_{t-1}, where the
policy starts). Log-probs and the loss are computed as in make_fixtures.py (TRL's layout:
separate right-padded [prompt | answer] rows, eager attention, float32).
"""
import json
import os
import shutil
import sys

import peft
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import BETA, losses, sequence_logps  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "lora")

DROPOUT_SEED = 5
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
M64 = (1 << 64) - 1

# name: (model, r, lora_alpha, target_modules, use_rslora, reference, seed[, lora_dropout])
CASES = {
    "gqa_r4_qv": ("gqa", 4, 8, ["q_proj", "v_proj"], False, "base", 11),
    "gqa_r4_all_rslora": ("gqa", 4, 16, "all-linear", True, "adapter", 12),
    "llama3_r4_mixed": ("llama3", 4, 16, ["k_proj", "o_proj", "gate_proj", "down_proj"], False, "base", 13),
    "tied_r8_mlp_rslora": ("tied", 8, 4, ["gate_proj", "up_proj", "down_proj"], True, "base", 14),
    "gqa_r4_dropout": ("gqa", 4, 8, ["q_proj", "v_proj", "down_proj"], False, "base", 15, 0.25),
}


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def dropout_mask(seed, draw, layer, module, n, din, p):
    """sdpo's lora::dropout_mask: [n, din], 0 or 1/(1-p) (as float32)."""
    k = mix64((seed + 0x9E3779B97F4A7C15 * (draw + 1)) & M64) ^ ((7 * layer + module) << 40)
    keep = float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    u = torch.tensor([(mix64(k ^ e) >> 11) / float(1 << 53) for e in range(n * din)], dtype=torch.float64)
    return torch.where(u >= p, keep, 0.0).reshape(n, din).float()


def shared_rows(pairs):
    """For TRL's rows (chosen sequences, then rejected), the row of sdpo's shared layout
    ([prompt | chosen | rejected] per pair) that each position is; -1 for padding."""
    n, out, off, offsets = len(pairs), [], 0, []
    for p in pairs:
        offsets.append(off)
        off += len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
    length = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    for key in ("chosen_ids", "rejected_ids"):
        for i, p in enumerate(pairs):
            P, C = len(p["prompt_ids"]), len(p["chosen_ids"])
            skip = 0 if key == "chosen_ids" else C
            row = [offsets[i] + t if t < P else offsets[i] + skip + t for t in range(P + len(p[key]))]
            out.append(row + [-1] * (length - len(row)))
    assert len(out) == 2 * n
    return torch.tensor(out), off


class GivenMask(torch.nn.Module):
    """Dropout with a given mask [batch, length, in]."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def install_masks(model, pairs, p):
    rows, n_rows = shared_rows(pairs)
    for name, module in model.named_modules():
        if not hasattr(module, "lora_dropout") or "default" not in module.lora_dropout:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        mi = MODULES.index(name.split(".")[-1])
        din = module.in_features
        ours = dropout_mask(DROPOUT_SEED, 0, layer, mi, n_rows, din, p)
        mask = torch.where((rows >= 0)[..., None], ours[rows.clamp(min=0)], 1.0)
        module.lora_dropout["default"] = GivenMask(mask)


def load_pairs(model):
    with open(os.path.join(FIXTURES, model, "pairs.jsonl")) as f:
        return [json.loads(line) for line in f]


def lora_key(name):
    """A parameter's name as PEFT saves it: without the adapter's name."""
    return name.replace(".default.", ".")


def build(name, model_name, r, alpha, targets, rslora, reference, seed, dropout=0.0):
    base_dir = os.path.join(FIXTURES, model_name, "policy")
    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none",
                     use_rslora=rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    pairs = load_pairs(model_name)

    model.eval()
    with torch.no_grad():
        if reference == "base":
            with model.disable_adapter():
                rc, rr, _, _ = sequence_logps(model, pairs)
        else:
            rc, rr, _, _ = sequence_logps(model, pairs)
    model.train()
    if dropout > 0:
        install_masks(model, pairs, dropout)
    pc, pr, nc, nr = sequence_logps(model, pairs)
    per_pair, _, _ = losses(pc, pr, rc, rr, nc, nr)
    loss = per_pair["sigmoid"].mean()
    loss.backward()
    grads = {lora_key(n): p.grad.detach().clone().contiguous()
             for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in grads), "only the adapter trains"

    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model.peft_config["default"].base_model_name_or_path = f"{model_name}/policy"
    model.save_pretrained(os.path.join(d, "adapter"))
    os.remove(os.path.join(d, "adapter", "README.md"))  # PEFT's model card template
    safetensors.torch.save_file(grads, os.path.join(d, "grads.safetensors"), metadata={"format": "pt"})
    expected = {
        "case": name,
        "base": f"{model_name}/policy",
        "pairs_file": f"{model_name}/pairs.jsonl",
        "reference": reference,
        "beta": BETA,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout,
        "dropout_seed": DROPOUT_SEED if dropout > 0 else None,
        "policy_chosen_logp": pc.tolist(), "policy_rejected_logp": pr.tolist(),
        "reference_chosen_logp": rc.tolist(), "reference_rejected_logp": rr.tolist(),
        "loss": loss.item(),
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"{name}: loss {loss.item():.6f}, {sum(g.numel() for g in grads.values())} adapter parameters")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name, args in CASES.items():
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        build(name, *args)
    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\npeft {peft.__version__}\n")


if __name__ == "__main__":
    main()
