#!/usr/bin/env python3
"""Checks that the TensorBoard event files of a run (`sdpo-run train --report-to tensorboard`)
read in TensorBoard's own reader with the numbers of the run's metrics.jsonl, and that its
report.html is well-formed XML with no external reference.

    cargo build --bin sdpo-run
    /tmp/refenv/bin/python tools/check_tensorboard.py                 # makes a run (killed and resumed)
    /tmp/refenv/bin/python tools/check_tensorboard.py --run RUN_DIR   # a run you have

Without --run it makes one with the debug binary: a tiny random model, the demo's data, three
sDPO steps, TensorBoard on, killed (SIGKILL) inside step 2 and resumed, so that the events
come from two processes. Then:
1. TensorBoard's EventAccumulator loads RUN/tensorboard (every scalar kept);
2. for every tag, its (step, value) series must be the metrics.jsonl lines that have that
   key, in order, as float32, each at the line's `train/global_step` (an eval line: the
   update before it);
3. report.html parses with xml.etree and holds no http, src= or href=.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "debug", "sdpo-run")


def latest_state(out):
    """The newest complete resume state's state.json, or None."""
    states = sorted(d for d in os.listdir(out) if d.startswith("state-")) if os.path.isdir(out) else []
    for d in reversed(states):
        try:
            with open(os.path.join(out, d, "state.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


def make_run(tmp):
    """A tiny run, killed inside step 2 and resumed."""
    subprocess.run([BIN, "demo", "--write-data", os.path.join(tmp, "data")], check=True, stdout=subprocess.DEVNULL)
    model = os.path.join(tmp, "model")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "vocab_size": 16, "max_position_embeddings": 64,
                   "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}, f)
    out = os.path.join(tmp, "run")
    cmd = [BIN, "train", "--quiet", "--model", model, "--random-init", "1",
           "--data", os.path.join(tmp, "data", "train.jsonl"), "--eval-data", os.path.join(tmp, "data", "eval.jsonl"),
           "--partition", "sources", "--lr", "1e-3", "--batch-pairs", "64", "--micro-batch-tokens", "400",
           "--save-every", "5", "--report-to", "tensorboard", "--out", out]
    p = subprocess.Popen(cmd + ["--debug-sleep-ms", "30"], stdout=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300:
        state = latest_state(out)
        if state and state["sdpo_step"] == 2 and not state["step_done"]:
            break
        time.sleep(0.01)
    else:
        sys.exit("no mid-step state of step 2 appeared")
    time.sleep(0.1)  # a few updates past the state, which the resume must drop
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
        written = f.read()
    lines, kept = written.count(b"\n"), written[:latest_state(out)["metrics_bytes"]].count(b"\n")
    print(f"killed after {lines} metrics lines; its newest state keeps {kept}; resuming")
    subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL)
    return out


def expected(run):
    """tag -> [(step, float32 value)] from metrics.jsonl."""
    want, step = {}, 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            step = rec.get("train/global_step", step)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    want.setdefault(k, []).append((step, float(np.float32(v))))
    return want


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a run folder written with --report-to tensorboard")
    args = ap.parse_args()
    tmp = None
    run = args.run
    if run is None:
        tmp = tempfile.mkdtemp(prefix="sdpo-tb-")
        run = make_run(tmp)
    try:
        files = sorted(os.listdir(os.path.join(run, "tensorboard")))
        acc = event_accumulator.EventAccumulator(os.path.join(run, "tensorboard"),
                                                 size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        want = expected(run)
        tags = acc.Tags()["scalars"]
        assert sorted(tags) == sorted(want), f"tags {sorted(tags)} vs metrics.jsonl keys {sorted(want)}"
        n = 0
        for tag in tags:
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            assert got == want[tag], f"{tag}: TensorBoard has {got[:5]}..., metrics.jsonl {want[tag][:5]}..."
            n += len(got)
        lines = sum(1 for _ in open(os.path.join(run, "metrics.jsonl")))
        print(f"TensorBoard {__import__('tensorboard').__version__} read {len(files)} event file(s): "
              f"{len(tags)} tags, {n} scalars, equal to the {lines} lines of metrics.jsonl")
        page = open(os.path.join(run, "report.html"), encoding="utf-8").read()
        ET.fromstring(page.replace("<!DOCTYPE html>", "", 1))
        for bad in ("http", "src=", "href="):
            assert bad not in page, f"report.html holds {bad}"
        print(f"report.html ({len(page)} bytes) is well-formed XML with no external reference")
    finally:
        if tmp:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
