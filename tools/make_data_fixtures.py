#!/usr/bin/env python3
"""Makes tests/fixtures/data: two small tokenizers, published chat templates, preference
records in every format we read, and the token ids that transformers + TRL produce for them.

Run with the reference environment: /tmp/refenv/bin/python tools/make_data_fixtures.py

The expected ids come from TRL's own preprocessing (DPOTrainer._prepare_dataset, which
extracts implicit prompts, appends EOS to text completions, applies the chat template and
finds the prompt/completion boundary) and TRL's DataCollatorForPreference (truncation), so
the fixture does not depend on our Rust code. Output stays well under 1 MB.
"""

import json
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, disable_progress_bars
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "data")

# --- chat templates (published configuration of the named models) ---------------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta: relies on trim_blocks / lstrip_blocks.
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# meta-llama/Llama-2-7b-chat-hf: slicing, str.strip(), raise_exception.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "zephyr": ZEPHYR, "llama2": LLAMA2}

SPECIAL = [
    "<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
]

# --- training text for the tokenizers ---------------------------------------------------

WORDS = (
    "the a of to and in is it that for on with as was be by this are or from at an which have not "
    "they you we he she his her their there what when where who why how can will would should could "
    "sky blue green red color sun sea moon star light water fire earth wind tree river mountain city "
    "answer question explain describe write story poem code function number list sort first second "
    "model language train data prompt reply assistant user system human good bad better best help "
    "please thank hello world yes no maybe because therefore however example simple short long time"
).split()
UNICODE = ["café", "naïve", "日本語", "中文", "Привет", "δ", "🙂", "Straße", "¿Qué?", "→"]


def corpus():
    lines = []
    for i in range(600):
        words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(5 + i % 11)]
        if i % 5 == 0:
            words.insert(i % 3, UNICODE[i % len(UNICODE)])
        s = " ".join(words)
        lines.append(s.capitalize() + ("." if i % 2 else "?"))
        lines.append("\n\nHuman: " + s + "\n\nAssistant: " + s[::-1])
    return lines


def train_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    # Llama 3 style: the post-processor adds the BOS token.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def train_spm():
    # SentencePiece style: NFKC, Metaspace with prepend_scheme "first", a Unigram model.
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=SPECIAL, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    # No post-processor: no BOS. transformers 5 ignores tokenizer_config.json's add_bos_token
    # when a tokenizer.json exists, which the fixture's config pins (it says add_bos_token: true).
    tok.post_processor = None
    return tok


# --- records ------------------------------------------------------------------------

STANDARD = [
    {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " The sky is green."},
    {"prompt": "Describe café culture in 日本語 🙂", "chosen": " Café → カフェ.", "rejected": " No idea."},
    {"prompt": "Say yes", "chosen": " yes", "rejected": " yes", "source": "dupes"},
    {"prompt": "Write a short poem.\n", "chosen": "Sun on the sea,\nlight on the tree.", "rejected": "No."},
    # The prompt ends inside a word: tokens merge across the boundary, and the completion
    # starts where the tokenized prompt and prompt+completion diverge.
    {"prompt": "The sky col", "chosen": "or is blue", "rejected": "our is green"},
]

CONVERSATIONAL = [
    {
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What color is the sky?"},
        ],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hello! Привет, naïve café?"},
            {"role": "assistant", "content": "Hello 🙂 How can I help?"},
            {"role": "user", "content": "Explain δ in one line.\n"},
        ],
        "chosen": [{"role": "assistant", "content": " δ is a small change. "}],
        "rejected": [{"role": "assistant", "content": "δ → ¿Qué?"}],
        "source": "multi",
    },
    {
        "prompt": [{"role": "user", "content": "Say yes"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "yes"}],
    },
]

IMPLICIT_CONV = [
    {
        "chosen": [
            {"role": "user", "content": "Where is the sun?"},
            {"role": "assistant", "content": "In the sky."},
        ],
        "rejected": [
            {"role": "user", "content": "Where is the sun?"},
            {"role": "assistant", "content": "In the sea."},
        ],
    },
    {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sort 3 1 2"},
            {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "Now the reverse, 日本語 please."},
            {"role": "assistant", "content": "3 2 1"},
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sort 3 1 2"},
            {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "Now the reverse, 日本語 please."},
            {"role": "assistant", "content": "I cannot."},
        ],
    },
]

IMPLICIT_TEXT = [
    {
        "chosen": "\n\nHuman: What color is the sky?\n\nAssistant: The sky is blue.",
        "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: It is green.",
    },
    {
        "chosen": "\n\nHuman: Hello 🙂 Straße?\n\nAssistant: Straße means street.",
        "rejected": "\n\nHuman: Hello 🙂 Straße?\n\nAssistant: Road.",
    },
]

ORCA = [
    {"system": "You are an AI assistant.", "question": "Name a color of the sky.", "chosen": "Blue.", "rejected": "Fire."},
    {"system": "", "question": "What is 中文?", "chosen": "A language: Chinese.", "rejected": "A number."},
]


def orca_to_conversational(r):
    # What `--prompt-field question --system-field system` means: a system turn (left out when
    # empty), the question as the user turn, the answers as assistant turns.
    prompt = ([{"role": "system", "content": r["system"]}] if r["system"] else []) + [
        {"role": "user", "content": r["question"]}
    ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }


# --- TRL's preprocessing ---------------------------------------------------------------


def load_tokenizer(model_dir, template):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tok.chat_template = template
    if tok.pad_token is None:  # as DPOTrainer.__init__ does
        tok.pad_token = tok.eos_token
    return tok


def trl_prepare(records, tok, max_length=None):
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    fake_trainer = SimpleNamespace(_tokenizer=tok)
    ds = DPOTrainer._prepare_dataset(fake_trainer, Dataset.from_list(records), tok, args, "train")
    out = []
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    for ex in ds:
        # The collator truncates prompt+chosen and prompt+rejected separately (keep_start);
        # read the surviving completion tokens back through its completion mask.
        b = collator([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        ids, mask = b["input_ids"].tolist(), b["completion_mask"].tolist()
        att = b["attention_mask"].tolist()
        chosen = [t for t, m, a in zip(ids[0], mask[0], att[0]) if m and a]
        rejected = [t for t, m, a in zip(ids[1], mask[1], att[1]) if m and a]
        prompt = [t for t, m, a in zip(ids[0], mask[0], att[0]) if not m and a]
        assert prompt == ex["prompt_ids"][: len(prompt)]
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    disable_progress_bars()
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(os.path.join(ROOT, "records"))
    os.makedirs(os.path.join(ROOT, "templates"))
    for name, t in TEMPLATES.items():
        with open(os.path.join(ROOT, "templates", f"{name}.jinja"), "w") as f:
            f.write(t)

    # Model directories as a Hub checkout has them.
    bpe_dir, spm_dir = os.path.join(ROOT, "bpe"), os.path.join(ROOT, "spm")
    os.makedirs(bpe_dir)
    os.makedirs(spm_dir)
    train_bpe().save(os.path.join(bpe_dir, "tokenizer.json"))
    with open(os.path.join(bpe_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "chat_template": LLAMA3,
            },
            f,
            indent=2,
        )
    train_spm().save(os.path.join(spm_dir, "tokenizer.json"))
    with open(os.path.join(spm_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            },
            f,
            indent=2,
        )
    with open(os.path.join(spm_dir, "chat_template.jinja"), "w") as f:
        f.write(ZEPHYR)

    # Records in every container format.
    rec = os.path.join(ROOT, "records")
    write_jsonl(os.path.join(rec, "standard.jsonl"), STANDARD)
    with open(os.path.join(rec, "conversational.json"), "w", encoding="utf-8") as f:
        json.dump(CONVERSATIONAL, f, ensure_ascii=False, indent=1)
    pq.write_table(pa.Table.from_pylist(IMPLICIT_CONV), os.path.join(rec, "implicit_conv.parquet"), compression="snappy")
    write_jsonl(os.path.join(rec, "implicit_text.jsonl"), IMPLICIT_TEXT)
    pq.write_table(pa.Table.from_pylist(ORCA), os.path.join(rec, "orca.parquet"), compression="zstd")
    # A parquet file whose columns are no preference format (for the error test).
    bad = [{"question": "q", "answer": "a"}]
    pq.write_table(pa.Table.from_pylist(bad), os.path.join(rec, "bad_columns.parquet"), compression="snappy")

    # file -> (records TRL sees, source of each record)
    datasets = {
        "standard.jsonl": STANDARD,
        "conversational.json": CONVERSATIONAL,
        "implicit_conv.parquet": IMPLICIT_CONV,
        "implicit_text.jsonl": IMPLICIT_TEXT,
        "orca.parquet": [orca_to_conversational(r) for r in ORCA],
    }
    expected = {}
    for tok_name, model_dir in [("bpe", bpe_dir), ("spm", spm_dir)]:
        for tname, template in TEMPLATES.items():
            tok = load_tokenizer(model_dir, template)
            for fname, records in datasets.items():
                stem = fname.rsplit(".", 1)[0]
                trl_records = [{k: v for k, v in r.items() if k != "source"} for r in records]
                rows = trl_prepare(trl_records, tok)
                for r, src in zip(rows, records):
                    r["source"] = src.get("source", stem)
                expected[f"{tok_name}/{tname}/{fname}"] = rows

    # Truncation: TRL's max_length on the multi-turn conversations (llama3 template, bpe).
    tok = load_tokenizer(bpe_dir, LLAMA3)
    full = trl_prepare(CONVERSATIONAL, tok)
    lens = [len(r["prompt_ids"]) for r in full]
    max_length = sorted(lens)[1] + 3  # the longest prompt no longer fits, others are cut
    trunc = trl_prepare([{k: v for k, v in r.items() if k != "source"} for r in CONVERSATIONAL], tok, max_length)
    expected["truncation"] = {"max_length": max_length, "n_in": len(CONVERSATIONAL), "pairs": trunc}

    # Pre-tokenized records: the first standard pairs as bpe ids, plus a source.
    pre = [dict(r) for r in expected["bpe/llama3/standard.jsonl"][:2]]
    pre[1]["source"] = "pre"
    for r in pre[:1]:
        r.pop("source")
    write_jsonl(os.path.join(rec, "pretokenized.jsonl"), pre)

    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ROOT) for n in ns)
    print(f"wrote {ROOT}: {total / 1e3:.0f} kB", file=sys.stderr)


if __name__ == "__main__":
    main()
