#!/usr/bin/env python3
"""Benchmark of preference-data preparation: TRL's own preprocessing, to compare with
`sdpo-run prepare` on the same data.

    # 1. synthetic UltraFeedback-like data (prompt ~150, answers ~300 tokens) and a
    #    Llama-3-style byte-level BPE tokenizer (32k vocabulary) with the Llama 3 template
    /tmp/refenv/bin/python tools/bench_prepare_trl.py make --dir /tmp/prep-bench --pairs 60000
    # 2. ours
    time target/release/sdpo-run prepare --model /tmp/prep-bench/model --data /tmp/prep-bench/pairs.jsonl \
        --out /tmp/prep-bench/ours.jsonl --overwrite
    # 3. TRL (load_dataset + DPOTrainer._prepare_dataset), checking its ids equal ours
    /tmp/refenv/bin/python tools/bench_prepare_trl.py trl --dir /tmp/prep-bench --num-proc 2 \
        --check /tmp/prep-bench/ours.jsonl

The TRL side is what DPOTrainer does before training: read the JSONL into a `datasets`
Dataset, then `_prepare_dataset` (chat template, three tokenizations per pair, prompt
boundary), with caching disabled so nothing is reused between runs.
"""

import argparse
import json
import os
import random
import sys
import time
from types import SimpleNamespace

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The pre-tokenizer split of Meta's Llama 3 tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


class TextGen:
    """English-like text: a Zipf-distributed lexicon of syllable words, punctuation, numbers,
    some code-ish lines and non-ASCII words."""

    def __init__(self, seed=0, n_words=30000):
        # The lexicon is fixed (the tokenizer is trained on it); `seed` varies the text.
        self.rng = random.Random(1)
        syl = [c + v for c in "bcdfghjklmnprstvwz" for v in ["a", "e", "i", "o", "u", "ou", "ea", "ai"]]
        words = set()
        while len(words) < n_words:
            words.add("".join(self.rng.choice(syl) for _ in range(self.rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))))
        self.words = sorted(words)
        self.rng.shuffle(self.words)
        self.words[:10] = ["über", "café", "naïve", "日本", "数据", "Привет", "ελλη", "niño", "straße", "señor"]
        self.weights = [1.0 / (i + 10) for i in range(n_words)]
        self.rng = random.Random(seed)

    def words_(self, n):
        return self.rng.choices(self.words, weights=self.weights, k=n)

    def text(self, n_words):
        out, i = [], 0
        ws = self.words_(n_words)
        while i < n_words:
            k = self.rng.randint(6, 18)
            sent = ws[i : i + k]
            i += k
            if not sent:
                break
            if self.rng.random() < 0.1:
                sent.insert(self.rng.randrange(len(sent)), str(self.rng.randint(0, 99999)))
            s = " ".join(sent)
            s = s[0].upper() + s[1:]
            if self.rng.random() < 0.15:
                s = s.replace(" ", ", ", 1)
            out.append(s + self.rng.choice([".", ".", ".", "?", "!", ":"]))
            if self.rng.random() < 0.12:
                out.append("\n\n")
            if self.rng.random() < 0.03:
                out.append("\n```python\ndef f(x):\n    return x * %d\n```\n" % self.rng.randint(2, 9))
        return " ".join(out).replace(" \n", "\n").replace("\n ", "\n")


def make(args):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(os.path.join(args.dir, "model"), exist_ok=True)
    gen = TextGen(seed=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((gen.text(200) for _ in range(20000)), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    model = os.path.join(args.dir, "model")
    tok.save(os.path.join(model, "tokenizer.json"))
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "chat_template": LLAMA3}, f, indent=2)

    # Size texts to UltraFeedback-like token counts: measure tokens per word first.
    sample = gen.text(5000)
    per_word = len(tok.encode(sample, add_special_tokens=False).ids) / 5000
    n_prompt, n_answer = int(150 / per_word), int(300 / per_word)
    gen = TextGen(seed=2)
    with open(os.path.join(args.dir, "pairs.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(args.pairs):
            jitter = lambda n: max(5, int(n * gen.rng.uniform(0.5, 1.5)))
            rec = {
                "prompt": [{"role": "user", "content": gen.text(jitter(n_prompt))}],
                "chosen": [{"role": "assistant", "content": gen.text(jitter(n_answer))}],
                "rejected": [{"role": "assistant", "content": gen.text(jitter(n_answer))}],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    size = os.path.getsize(os.path.join(args.dir, "pairs.jsonl"))
    print(f"{args.pairs} pairs ({size / 1e6:.0f} MB), {per_word:.2f} tokens/word, vocab {tok.get_vocab_size()}",
          file=sys.stderr)


def trl(args):
    import datasets
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast
    from trl.trainer.dpo_trainer import DPOTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.dir, "model"))
    if tok.pad_token is None:  # as DPOTrainer.__init__ does
        tok.pad_token = tok.eos_token
    path = os.path.join(args.dir, "pairs.jsonl")
    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=path, split="train", cache_dir=os.path.join(args.dir, "hf-cache"))
    if args.limit:
        ds = ds.select(range(args.limit))
    t1 = time.perf_counter()
    cfg = SimpleNamespace(dataset_num_proc=args.num_proc, max_length=None, truncation_mode="keep_start")
    out = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), ds, tok, cfg, "train")
    t2 = time.perf_counter()
    n = len(out)
    toks = sum(len(p) + len(c) + len(r) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]))
    print(json.dumps({"pairs": n, "num_proc": args.num_proc, "load_s": round(t1 - t0, 2),
                      "prepare_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
                      "pairs_per_s": round(n / (t2 - t0), 1), "tokens": toks}))
    if args.check:
        with open(args.check) as f:
            for i, (line, p, c, r) in enumerate(zip(f, out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])):
                ours = json.loads(line)
                if (ours["prompt_ids"], ours["chosen_ids"], ours["rejected_ids"]) != (p, c, r):
                    sys.exit(f"pair {i}: ours differs from TRL's")
        print(f"checked: our ids equal TRL's on all {n} pairs", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", required=True)
    m.add_argument("--pairs", type=int, default=60000)
    t = sub.add_parser("trl")
    t.add_argument("--dir", required=True)
    t.add_argument("--num-proc", type=int, default=None)
    t.add_argument("--limit", type=int, default=None)
    t.add_argument("--check", help="our prepare output, compared id by id with TRL's")
    args = ap.parse_args()
    {"make": make, "trl": trl}[args.cmd](args)


if __name__ == "__main__":
    main()
