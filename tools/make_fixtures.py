#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures in tests/fixtures/ (run by hand, not in CI):

    /tmp/refenv/bin/python tools/make_fixtures.py

For each tiny LlamaForCausalLM below (fixed seeds, 2 layers, vocab <= 256):
  <name>/reference/        the reference model (save_pretrained, float32)
  <name>/policy/           the reference plus small noise: the model being trained
  <name>/pairs.jsonl       5 pre-tokenized pairs of uneven lengths
  <name>/expected.json     per-pair log-probs, the sigmoid/ipo/hinge losses and rewards,
                           TRL's metrics, the AdamW settings and the gradient norm
  <name>/grads.safetensors the gradient of the mean sigmoid loss, every parameter, HF names
  <name>/adamw.safetensors the policy after one torch.optim.AdamW step on those gradients,
                           parameter groups as HF Trainer makes them (no decay on norms)
Some models are also saved sharded or in bfloat16, to test the loader.

Everything is computed the way TRL's DPOTrainer does: chosen and rejected are separate
[prompt | answer] sequences in one right-padded batch, eager attention, float32, and a
sequence's log-prob is the sum over its completion tokens only.
"""
import json
import os
import shutil
import sys

import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
BETA = 0.1
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

# name: (config overrides, seed, max_grad_norm or None, extra saves)
MODELS = {
    # untied, GQA 2:1; the policy is saved sharded
    "gqa": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, tie_word_embeddings=False), 1, 1.0, {"shard_policy"}),
    # tied embeddings, MHA; the reference is also saved in bfloat16
    "tied": (dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=96, tie_word_embeddings=True), 2, None, {"bf16_reference"}),
    # llama3 rope scaling (theta 5e5, head_dim 16: wavelengths 6, 32, 167.. fall in all three bands
    # of original_max_position_embeddings 64), GQA 4:1, head_dim * heads != hidden
    "llama3": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                    vocab_size=112, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=256,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=64)), 3, 1.0, set()),
    # odd sizes: hidden 48, 3 heads of 16, one kv head, intermediate 52 (not a multiple of 8)
    "odd": (dict(hidden_size=48, intermediate_size=52, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                 vocab_size=97, tie_word_embeddings=False, rms_norm_eps=1e-5), 4, None, set()),
    # pad_token_id == eos_token_id (as many instruct checkpoints set it), tied embeddings:
    # nn.Embedding(padding_idx=2) gives row 2 no gradient from the lookup, only the LM
    # head's. Every answer ends in eos and some prompts hold it, as templated data does.
    # Sizes the CUDA engine takes (head_dim 16).
    "pad": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=80, tie_word_embeddings=True, pad_token_id=2), 5, 1.0, {"eos_in_data"}),
    # rms_norm_eps stored as float32(0.01) printed as a double, as configs converted through
    # float32 store it; large enough to weigh in every norm (mean squares are ~0.02).
    "eps32": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                   vocab_size=72, tie_word_embeddings=False, rms_norm_eps=0.009999999776482582), 6, None, set()),
}

PROMPT_LENS = [1, 12, 5, 8, 3]
CHOSEN_LENS = [15, 1, 7, 4, 10]
REJECTED_LENS = [2, 13, 7, 1, 9]


def make_config(over):
    base = dict(num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False,
                hidden_act="silu", initializer_range=0.02)
    base.update(over)
    cfg = LlamaConfig(**base)
    cfg._attn_implementation = "eager"
    return cfg


def init_weights(model, gen):
    # Larger than the usual 0.02 so that the tiny model's predictions are not uniform and
    # every gradient is well above rounding noise; norms not all ones so theirs matter too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def make_pairs(vocab, gen, source, eos=None):
    """Random ids; with `eos`, every answer ends in it and every other prompt holds it."""
    def ids(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()
    pairs = [dict(prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r), source=source)
             for p, c, r in zip(PROMPT_LENS, CHOSEN_LENS, REJECTED_LENS)]
    if eos is not None:
        for i, p in enumerate(pairs):
            p["chosen_ids"][-1] = p["rejected_ids"][-1] = eos
            if i % 2 == 1:
                p["prompt_ids"][len(p["prompt_ids"]) // 2] = eos
    return pairs


def trl_sequences(pairs, pad):
    """TRL's layout: 2n right-padded sequences, chosen first; (input ids, attention mask, completion mask)."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seqs.append(p["prompt_ids"] + p[key])
            masks.append([0] * len(p["prompt_ids"]) + [1] * len(p[key]))
    L = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    completion = torch.tensor([m + [0] * (L - len(m)) for m in masks])
    return input_ids, attention, completion


def sequence_logps(model, pairs):
    """Per pair: sums of completion log-probs in TRL's layout, and token counts."""
    # TRL pads with the tokenizer's pad id (the model's pad_token_id here), else 0.
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    input_ids, attention, completion = trl_sequences(pairs, pad)
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion[:, 1:].float()
    per_seq = (logp * mask).sum(-1)
    n = len(pairs)
    counts = mask.sum(-1)
    return per_seq[:n], per_seq[n:], counts[:n], counts[n:]


def losses(pc, pr, rc, rr, nc, nr):
    """TRL 1.x: delta = (pc - rc) - (pr - rr); rewards = beta * log-ratio (not length-averaged)."""
    delta = (pc - rc) - (pr - rr)
    rew_c, rew_r = BETA * (pc - rc), BETA * (pr - rr)
    ipo_delta = (pc - rc) / nc - (pr - rr) / nr
    return {
        "sigmoid": -F.logsigmoid(BETA * delta),
        "hinge": torch.relu(1 - BETA * delta),
        "ipo": (ipo_delta - 1 / (2 * BETA)) ** 2,
    }, rew_c, rew_r


def param_dict(model):
    # named_parameters() lists a tied matrix once, under model.embed_tokens.weight.
    return {n: p for n, p in model.named_parameters()}


def build(name, over, seed, clip, extras):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = make_config(over)
    ref = LlamaForCausalLM(cfg).float().eval()
    init_weights(ref, gen)
    policy = LlamaForCausalLM(cfg).float().eval()
    policy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=gen))
    pairs = make_pairs(cfg.vocab_size, gen, name, cfg.eos_token_id if "eos_in_data" in extras else None)

    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    ref.save_pretrained(os.path.join(d, "reference"))
    if "shard_policy" in extras:
        policy.save_pretrained(os.path.join(d, "policy"), max_shard_size="40KB")
    else:
        policy.save_pretrained(os.path.join(d, "policy"))
    if "bf16_reference" in extras:
        bf = LlamaForCausalLM(cfg)
        bf.load_state_dict(ref.state_dict())
        bf.to(torch.bfloat16).save_pretrained(os.path.join(d, "reference_bf16"))
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")

    with torch.no_grad():
        rc, rr, _, _ = sequence_logps(ref, pairs)
    policy.train()  # no dropout in Llama; train() only for clarity
    pc, pr, nc, nr = sequence_logps(policy, pairs)
    per_pair, rew_c, rew_r = losses(pc, pr, rc, rr, nc, nr)
    loss = per_pair["sigmoid"].mean()
    loss.backward()
    params = param_dict(policy)
    grads = {n: p.grad.detach().clone().contiguous() for n, p in params.items()}
    safetensors.torch.save_file(grads, os.path.join(d, "grads.safetensors"), metadata={"format": "pt"})

    grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
    # Parameter groups as HF Trainer.create_optimizer makes them: no weight decay on the
    # norm weights (Trainer.get_decay_parameter_names; its `self` is unused).
    decay = set(transformers.Trainer.get_decay_parameter_names(None, policy))
    groups = [
        {"params": [p for n, p in policy.named_parameters() if n in decay], "weight_decay": ADAMW["weight_decay"]},
        {"params": [p for n, p in policy.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, **ADAMW)
    opt.step()
    after = {n: p.detach().clone().contiguous() for n, p in param_dict(policy).items()}
    safetensors.torch.save_file(after, os.path.join(d, "adamw.safetensors"), metadata={"format": "pt"})

    def mean(t):
        return t.double().mean().item()

    expected = {
        "model": name,
        "beta": BETA,
        "pairs": [
            dict(policy_chosen_logp=pc[i].item(), policy_rejected_logp=pr[i].item(),
                 reference_chosen_logp=rc[i].item(), reference_rejected_logp=rr[i].item(),
                 chosen_tokens=int(nc[i].item()), rejected_tokens=int(nr[i].item()),
                 reward_chosen=rew_c[i].item(), reward_rejected=rew_r[i].item())
            for i in range(len(pairs))
        ],
        "losses": {k: {"loss": mean(v), "per_pair": v.tolist()} for k, v in per_pair.items()},
        "metrics": {
            "loss": loss.item(),
            "rewards/chosen": mean(rew_c),
            "rewards/rejected": mean(rew_r),
            "rewards/margins": mean(rew_c - rew_r),
            "rewards/accuracies": mean((rew_c > rew_r).float()),
            "logps/chosen": mean(pc.detach()),
            "logps/rejected": mean(pr.detach()),
        },
        "adamw": dict(lr=ADAMW["lr"], beta1=ADAMW["betas"][0], beta2=ADAMW["betas"][1], eps=ADAMW["eps"],
                      weight_decay=ADAMW["weight_decay"], max_grad_norm=clip, grad_norm=grad_norm,
                      no_decay=sorted(n for n in params if n not in decay)),
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"{name}: loss {loss.item():.6f} grad_norm {grad_norm:.4f} params {sum(p.numel() for p in params.values())}")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name, (over, seed, clip, extras) in MODELS.items():
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        build(name, over, seed, clip, extras)
    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                f"safetensors {safetensors.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
