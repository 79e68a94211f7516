#!/usr/bin/env python3
"""The PyTorch anchor of `sdpo-run bench`: the same shape, batch and sequence lengths,
trained the way TRL trains DPO, timed the same way, printed in the same JSON format.

    python tools/compare_torch.py --shape tiny --device cpu --steps 3 --warmup 1
    python tools/compare_torch.py --shape llama-1b --device cuda --micro-batch-tokens 16384

What runs (per mode: `eager`, then `compile` = torch.compile of the model, skipped with a
message when it fails, e.g. without a C++ compiler on the CPU):
- transformers' LlamaForCausalLM with SDPA attention, random weights, the shapes of
  benches/shapes.json (which `sdpo-run bench --shape` reads too);
- TRL's layout: each pair as two full sequences, [prompt | chosen] and [prompt | rejected],
  concatenated into one batch (equal lengths, so no padding); per-token log-probs of the
  completion tokens by `trl.trainer.utils.selective_log_softmax` on all logits, summed per
  sequence; TRL's sigmoid loss -logsigmoid(beta * ((pc - rc) - (pr - rr))), beta 0.1,
  averaged over the pairs;
- reference log-probs precomputed (one no-grad forward: the timed "reference pass");
- AdamW (fused on CUDA, foreach on the CPU), lr 1e-7, clip_grad_norm_ 1.0 as HF Trainer;
- CPU: fp32, `--threads` threads (default 2). CUDA: fp32 master weights under
  torch.autocast(bfloat16), as HF Trainer's `bf16=True` (our CUDA engine too keeps fp32
  masters and AdamW state and computes in bf16).

JSON keys (one line per mode on stdout; gpu-check.sh divides sdpo-run's numbers by these).
Every key below is also printed by `sdpo-run bench` with the same meaning:
  tool                  "pytorch-eager" | "pytorch-compile" (sdpo-run: "sdpo-run")
  shape, device, dtype  shape name; device description; "fp32" or "bf16"
  micro_batch_tokens, prompt_len, answer_len, steps, warmup     the arguments
  pairs_per_step        micro_batch_tokens // (prompt_len + 2 * answer_len)
  tokens_per_step       pairs_per_step * (prompt_len + 2 * answer_len): the prompt counted
                        once, whatever the layout, so tokens/s ratios are pairs/s ratios
  train_step_s          mean seconds of one training step (forward, backward, clip, AdamW)
  train_tokens_per_s, train_pairs_per_s
  ref_step_s, ref_tokens_per_s   the same for the no-grad reference pass
  dpo_pairs_per_s       pairs / (ref_step_s + train_step_s)
  train_flops_per_step, ref_flops_per_step   model FLOPs of the task, counted as
                        src/bench.rs does (shared layout, attended keys only, no
                        recomputation), so MFU compares like with like
  train_tflops, ref_tflops       achieved model TFLOP/s
  ceiling_tflops        a large matmul measured in this run (fp32 2048^3 on the CPU,
                        bf16 8192^3 on CUDA), best of 3 before and 3 after the steps
  mfu                   train_tflops / ceiling_tflops
  datasheet_tflops, mfu_datasheet   vendor dense bf16 peak where known (GPU), else null
  peak_mem_bytes        CPU: the process's peak RSS (VmHWM); CUDA: torch.cuda.max_memory_allocated
Ratios: `compare_torch.py --ratios SDPO_LOG TORCH_LOG` reads the JSON lines of both
outputs (other lines are ignored) and prints one line per PyTorch mode, starting "RATIO":
sdpo-run's train tokens/s, reference tokens/s and DPO pairs/s over PyTorch's (>1: sdpo-run
is faster), peak memory (<1: sdpo-run uses less), and both MFUs. Attention lines (below)
give "RATIO attention fwd_bwd xR (fwd x.., bwd x..) ...": PyTorch's time over sdpo-run's,
i.e. sdpo-run's throughput over PyTorch's (>1: sdpo-run is faster).

Attention alone, against `sdpo-run bench --attention`:

    python tools/compare_torch.py --attention --device cpu --batch 1 --seq-len 512
    python tools/compare_torch.py --attention --device cuda      # B 4, S 2048, 32 heads of 128

`torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)` on [B, H, S, D]
standard-normal inputs (k, v with Hkv heads): on CUDA in bf16 under
`sdpa_kernel(SDPBackend.FLASH_ATTENTION)` (it exits with the reason when the flash backend
refuses the sizes), on the CPU in fp32 with the default backend. Hkv < H: `enable_gqa=True`
where torch has it, else k and v repeated to H heads ("gqa": "repeat_kv" in the JSON; the
repeat and the backward's sum over the copies are then timed too). Timed, each the median
of --steps calls after --warmup untimed ones, the device synchronised before and after
each: the forward (inputs requiring grad, as in training), the backward alone
(torch.autograd.grad of the forward's output with dO, the graph retained), and forward +
backward. Defaults as sdpo-run's: B 4, S 2048 on CUDA; B 1, S 512 on the CPU; H 32,
Hkv = H, D 128. One JSON line, the keys of sdpo-run's (src/bench.rs `AttentionReport`):
  kind "attention"; tool "pytorch-sdpa-flash" (CUDA) | "pytorch-sdpa" (CPU); device, dtype,
  causal, B, S, H, Hkv, D, threads, steps, warmup;
  fwd_ms, bwd_ms, fwd_bwd_ms    medians, milliseconds
  flops_fwd                     4*D*H per attended (query, key), B*S*(S+1)/2 of them
  flops_bwd = 2.5 * flops_fwd   (FlashAttention's convention), flops_fwd_bwd the sum
  tflops_fwd, tflops_bwd, tflops_fwd_bwd
  check_rel_err                 sampled output rows against causal attention in float64
and besides: torch (version), backend, gqa.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

BENCHES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches")
# The shapes' config.json files, the same table `sdpo-run bench --shape` reads.
with open(os.path.join(BENCHES, "shapes.json")) as _f:
    SHAPES = {name: entry["config"] for name, entry in json.load(_f).items()}
# The devices' datasheet figures, the same table `sdpo-run bench` and tests/gpu.rs read.
with open(os.path.join(BENCHES, "devices.json")) as _f:
    DEVICES = json.load(_f)["devices"]


def datasheet_bf16_flops(device_name):
    """Dense bf16 FLOP/s of the first device whose name fragment `device_name` contains."""
    return next((d["bf16_flops"] for d in DEVICES if d["name"] in device_name), None)


def model_flops(shape, pairs, p, a):
    """Forward and training FLOPs of one micro-batch, exactly as src/bench.rs `flops`."""
    c = SHAPES[shape]
    h, i, n_layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    nh, nkv, v = c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    hd = h // nh
    per_layer = h * nh * hd * 2 + h * nkv * hd * 2 + 3 * h * i
    body = n_layers * per_layer
    head = v * h
    rows = pairs * (p + 2 * a)
    head_rows = pairs * (2 * a - 1)
    attended = pairs * (p * (p + 1) // 2 + 2 * (a * p + a * (a + 1) // 2))
    fwd = 2.0 * body * rows + 2.0 * head * head_rows + 4.0 * n_layers * nh * hd * attended
    return fwd, 3.0 * fwd


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def matmul_ceiling(torch, device):
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for rep in range(4):
        sync(torch, device)
        t0 = time.perf_counter()
        (a @ b).sum()
        sync(torch, device)
        if rep:
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


# --- ratios (tools/gpu_check_summary.py imports json_lines and ratios)

def json_lines(lines):
    """The JSON objects among `lines`: those starting with "{" that parse; the rest is ignored."""
    out = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def ratios(attention, ours, theirs):
    """sdpo-run over PyTorch for throughput and memory; for attention, PyTorch's time over
    sdpo-run's (>1: sdpo-run is faster, or for memory, uses more). None where a figure is
    missing or zero."""
    div = lambda a, b: a / b if a and b else None
    if attention:
        return {k: div(theirs.get(k), ours.get(k)) for k in ("fwd_bwd_ms", "fwd_ms", "bwd_ms")}
    return {k: div(ours.get(k), theirs.get(k))
            for k in ("train_tokens_per_s", "ref_tokens_per_s", "dpo_pairs_per_s", "peak_mem_bytes")}


def times(r):
    return "n/a" if r is None else f"x{r:.2f}"


def read_json_lines(path):
    try:
        with open(path) as f:
            return json_lines(f)
    except OSError as e:
        print(f"RATIO n/a: {e}")
        return []


def print_ratios(ours_path, torch_path):
    ours_all = [j for j in read_json_lines(ours_path) if j.get("tool") == "sdpo-run"]
    anchors_all = [j for j in read_json_lines(torch_path) if str(j.get("tool", "")).startswith("pytorch")]
    is_attn = lambda j: j.get("kind") == "attention"
    printed = False
    for attention in (False, True):
        ours = [j for j in ours_all if is_attn(j) == attention]
        anchors = [j for j in anchors_all if is_attn(j) == attention]
        if ours and anchors:
            (print_attention_ratios if attention else print_train_ratios)(ours[-1], anchors)
            printed = True
        elif ours or anchors:
            what = "attention" if attention else "training"
            print(f"RATIO n/a: {what} lines in only one of {ours_path} ({len(ours)}) and {torch_path} ({len(anchors)})")
            printed = True
    if not printed:
        print(f"RATIO n/a: no sdpo-run JSON line in {ours_path} or no PyTorch line in {torch_path}")


def print_attention_ratios(o, anchors):
    """Throughput ratios: PyTorch's median time over sdpo-run's (>1: sdpo-run is faster)."""
    keys = ("B", "S", "H", "Hkv", "D")
    for t in anchors:
        same = all(o.get(k) == t.get(k) for k in keys)
        r = ratios(True, o, t)
        sizes = "B{} S{} H{}/{} D{}".format(*(o.get(k) for k in keys))
        print(f"RATIO attention fwd_bwd {times(r['fwd_bwd_ms'])} (fwd {times(r['fwd_ms'])}, bwd {times(r['bwd_ms'])}) "
              f"sdpo-run/{t['tool']} {sizes}{'' if same else ' SIZES DIFFER'} on {o['device']}: "
              f"fwd+bwd {o['fwd_bwd_ms']:.3f} vs {t['fwd_bwd_ms']:.3f} ms, "
              f"{o['tflops_fwd_bwd']:.3g} vs {t['tflops_fwd_bwd']:.3g} TFLOP/s")


def print_train_ratios(o, anchors):
    for t in anchors:
        same = all(o.get(k) == t.get(k) for k in ("shape", "tokens_per_step", "prompt_len", "answer_len"))
        r = ratios(False, o, t)
        pct = lambda j: f"{100 * j['mfu']:.1f}%" if j.get("mfu") is not None else "n/a"
        print(f"RATIO sdpo-run/{t['tool']} ({o['shape']}, {o['tokens_per_step']} tokens/step, {o['device']}"
              f"{'' if same else ', SIZES DIFFER'}): train tokens/s {times(r['train_tokens_per_s'])}, "
              f"reference {times(r['ref_tokens_per_s'])}, DPO pairs/s {times(r['dpo_pairs_per_s'])}, "
              f"peak memory {times(r['peak_mem_bytes'])}, MFU {pct(o)} vs {pct(t)}")


def attention_check(torch, q, k, v, o):
    """Relative L2 error of `o` against causal softmax attention in float64, written from
    the definition, at the rows sdpo-run checks (src/bench.rs `attention_check`): rows 0,
    1, 2, S/4, S/2, 3S/4, S-2, S-1 of the first sequence at head 0 and of the last sequence
    at the last head. [B, heads, S, D] tensors; k and v may have fewer heads."""
    B, H, S, D = q.shape
    rows = sorted({t for t in (0, 1, 2, S // 4, S // 2, 3 * S // 4, S - 2, S - 1) if 0 <= t < S})
    err2 = ref2 = 0.0
    for b, h in ((0, 0), (B - 1, H - 1)):
        g = h // (H // k.shape[1])
        qq, kk, vv = (x.detach().double().cpu() for x in (q[b, h], k[b, g], v[b, g]))
        oo = o[b, h].detach().double().cpu()
        for t in rows:
            w = torch.softmax((kk[: t + 1] @ qq[t]) / D**0.5, dim=0)
            want = w @ vv[: t + 1]
            err2 += float(((oo[t] - want) ** 2).sum())
            ref2 += float((want**2).sum())
    return (err2 / max(ref2, 1e-300)) ** 0.5


def run_attention(args):
    """`--attention`: see the top of this file."""
    import torch
    import torch.nn.functional as F

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_torch.py: --device cuda, but torch sees no CUDA device")
    cuda = device == "cuda"
    B = args.batch if args.batch is not None else (4 if cuda else 1)
    S = args.seq_len if args.seq_len is not None else (2048 if cuda else 512)
    H = args.heads if args.heads is not None else 32
    Hkv = args.kv_heads if args.kv_heads is not None else H
    D = args.head_dim if args.head_dim is not None else 128
    for flag, val in (("--batch", B), ("--seq-len", S), ("--heads", H), ("--kv-heads", Hkv), ("--head-dim", D),
                      ("--steps", args.steps)):
        if val < 1:
            sys.exit(f"compare_torch.py --attention: {flag} must be at least 1")
    if H % Hkv:
        sys.exit(f"compare_torch.py --attention: --heads {H} is not a multiple of --kv-heads {Hkv}")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32

    gen = torch.Generator().manual_seed(args.seed)
    randn = lambda heads, grad: torch.randn(B, heads, S, D, generator=gen).to(device, dtype).requires_grad_(grad)
    q, k, v, dout = randn(H, True), randn(Hkv, True), randn(Hkv, True), randn(H, False)

    if cuda:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend, ctx = "flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        except ImportError:  # torch < 2.3
            backend = "flash"
            ctx = lambda: torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)
    else:
        backend, ctx = "default", contextlib.nullcontext
    gqa = "none"
    if Hkv < H:
        try:
            tiny = torch.zeros(1, 2, 1, 8)
            F.scaled_dot_product_attention(tiny, tiny[:, :1], tiny[:, :1], enable_gqa=True)
            gqa = "enable_gqa"
        except TypeError:  # torch < 2.5
            gqa = "repeat_kv"

    def attn():
        if gqa == "repeat_kv":
            kk, vv = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        extra = {"enable_gqa": True} if gqa == "enable_gqa" else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)

    def median_secs(fn):
        for _ in range(args.warmup):
            fn()
        ts = []
        for _ in range(args.steps):
            sync(torch, device)
            t0 = time.perf_counter()
            fn()
            sync(torch, device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    with ctx():
        try:
            o = attn()
            torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)
            sync(torch, device)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            sys.exit(f"compare_torch.py --attention: the {backend} SDPA backend refused B {B}, S {S}, H {H}, "
                     f"Hkv {Hkv}, D {D}, {str(dtype)[6:]} (gqa: {gqa}): {first}")
        check = attention_check(torch, q, k, v, o)
        fwd_s = median_secs(attn)
        bwd_s = median_secs(lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True))
        fwd_bwd_s = median_secs(lambda: torch.autograd.grad(attn(), (q, k, v), dout))

    # Same count as src/bench.rs `AttentionSizes`.
    f_fwd = 4.0 * D * H * B * S * (S + 1) / 2
    f_bwd = 2.5 * f_fwd
    out = {
        "kind": "attention", "tool": "pytorch-sdpa-flash" if cuda else "pytorch-sdpa",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({args.threads} threads)",
        "dtype": "bf16" if cuda else "fp32", "causal": True,
        "B": B, "S": S, "H": H, "Hkv": Hkv, "D": D, "threads": 0 if cuda else args.threads,
        "steps": args.steps, "warmup": args.warmup,
        "fwd_ms": fwd_s * 1e3, "bwd_ms": bwd_s * 1e3, "fwd_bwd_ms": fwd_bwd_s * 1e3,
        "flops_fwd": f_fwd, "flops_bwd": f_bwd, "flops_fwd_bwd": f_fwd + f_bwd,
        "tflops_fwd": f_fwd / fwd_s / 1e12, "tflops_bwd": f_bwd / bwd_s / 1e12,
        "tflops_fwd_bwd": (f_fwd + f_bwd) / fwd_bwd_s / 1e12,
        "flop_count": "forward 4*D*H per attended (query, key), B*S*(S+1)/2 of them; backward 2.5x forward",
        "timing": f"median of {args.steps} calls after {args.warmup} untimed, wall clock"
                  + (", torch.cuda.synchronize() before and after each" if cuda else ""),
        "check_rel_err": check, "torch": torch.__version__, "backend": backend, "gqa": gqa,
    }
    print(json.dumps(out), flush=True)
    print(f"{out['tool']}: causal attention on {out['device']} ({out['dtype']}): B {B} x S {S}, {H} heads / {Hkv} kv "
          f"of {D}, median of {args.steps} calls (output check: rel err {check:.1e})", file=sys.stderr)
    for name, ms, tf in (("forward", out["fwd_ms"], out["tflops_fwd"]), ("backward", out["bwd_ms"], out["tflops_bwd"]),
                         ("forward + backward", out["fwd_bwd_ms"], out["tflops_fwd_bwd"])):
        print(f"  {name:<19} {ms:>10.3f} ms  {tf:>9.3f} TFLOP/s", file=sys.stderr)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--ratios":
        print_ratios(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: tiny on the CPU, llama-1b on CUDA")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--answer-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--attention", action="store_true", help="time causal SDPA alone (see the top of this file)")
    ap.add_argument("--batch", type=int, default=None, help="--attention: sequences (default 4 on CUDA, 1 on the CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="--attention: tokens per sequence (2048 / 512)")
    ap.add_argument("--heads", type=int, default=None, help="--attention: query heads (32)")
    ap.add_argument("--kv-heads", type=int, default=None, help="--attention: key/value heads (as many as --heads)")
    ap.add_argument("--head-dim", type=int, default=None, help="--attention: head dimension (128)")
    args = ap.parse_args()
    attention_flags = [f for f in ("batch", "seq_len", "heads", "kv_heads", "head_dim") if getattr(args, f) is not None]
    if args.attention:
        run_attention(args)
        return
    if attention_flags:
        ap.error(f"--{attention_flags[0].replace('_', '-')} needs --attention")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if len(modes) > 1:
        # One process per mode: peak memory (VmHWM on the CPU) is per process.
        import subprocess

        argv = [x for k, x in enumerate(sys.argv[1:]) if x != "--modes" and (k == 0 or sys.argv[k] != "--modes")]
        argv = [x for x in argv if not x.startswith("--modes=")]
        for mode in modes:
            subprocess.run([sys.executable, __file__, *argv, "--modes", mode], check=mode == "eager")
        return

    import torch
    import torch.nn.functional as F
    import transformers

    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:  # the GPU host's image has no trl (nor its `datasets` dependency)

        def selective_log_softmax(logits, index):
            """TRL's helper, same arithmetic: log-probs of `index` under `logits`; fp32 and
            fp64 as gather minus a per-row logsumexp, other dtypes row by row through
            log_softmax, so full-vocabulary log-probs never exist for the whole batch."""
            if logits.dtype in (torch.float32, torch.float64):
                picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
                return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
            rows = [
                torch.gather(F.log_softmax(row, dim=-1), -1, ix.unsqueeze(-1)).squeeze(-1)
                for row, ix in zip(logits, index)
            ]
            return torch.stack(rows)

        print("compare_torch.py: trl not installed; its selective_log_softmax re-stated here", file=sys.stderr)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_torch.py: --device cuda, but torch sees no CUDA device")
    shape = args.shape or ("tiny" if device == "cpu" else "llama-1b")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    p, a = args.prompt_len, args.answer_len
    pairs = args.micro_batch_tokens // (p + 2 * a)
    if pairs == 0:
        sys.exit(f"compare_torch.py: --micro-batch-tokens {args.micro_batch_tokens} does not hold one pair of {p + 2 * a} tokens")

    fields = {k: x for k, x in SHAPES[shape].items() if k not in ("architectures", "model_type")}
    if fields["rope_scaling"] is not None:
        fields["rope_scaling"] = dict(fields["rope_scaling"], rope_theta=fields["rope_theta"])
    v = fields["vocab_size"]
    cfg = transformers.LlamaConfig(**fields)
    cfg._attn_implementation = "sdpa"
    fwd_flops, train_flops = model_flops(shape, pairs, p, a)
    dev_name = f"cpu ({args.threads} threads)" if device == "cpu" else torch.cuda.get_device_name()
    use_amp = device == "cuda"

    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, v, (pairs, p), generator=g)
    chosen = torch.randint(0, v, (pairs, a), generator=g)
    rejected = torch.randint(0, v, (pairs, a), generator=g)
    # TRL's concatenated batch: chosen sequences first, then rejected ones.
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0).to(device)
    labels = ids[:, p:]  # completion tokens, predicted by rows p-1 .. p+a-2

    def seq_logps(model):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=ids).logits
        logits = logits[:, p - 1 : -1, :].float()
        lp = selective_log_softmax(logits, labels).sum(-1)
        return lp[:pairs], lp[pairs:]

    # As in src/bench.rs: the ceiling is the better of a measurement before and one after.
    ceiling_before = matmul_ceiling(torch, device)
    for mode in modes:
        torch.manual_seed(args.seed)
        model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32)
        model.config.use_cache = False
        model.train()
        if mode == "compile":
            run_model = torch.compile(model)
        elif mode == "eager":
            run_model = model
        else:
            sys.exit(f"compare_torch.py: unknown mode {mode!r} (eager, compile)")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0,
                                **({"fused": True} if device == "cuda" else {"foreach": True}))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def ref_pass():
            with torch.no_grad():
                c, r = seq_logps(run_model)
            sync(torch, device)
            return c, r

        try:
            ref_c, ref_r = ref_pass()

            def train_step():
                pc, pr = seq_logps(run_model)
                logits = (pc - ref_c) - (pr - ref_r)
                loss = -F.logsigmoid(0.1 * logits).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(torch, device)

            for _ in range(args.warmup):
                ref_pass()
                train_step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                ref_pass()
            ref_s = (time.perf_counter() - t0) / args.steps
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step()
            train_s = (time.perf_counter() - t0) / args.steps
        except Exception as e:  # torch.compile fails without a working toolchain
            if mode != "compile":
                raise
            print(f"compare_torch.py: torch.compile skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
            continue

        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_rss()
        del model, run_model, opt
        ceiling = max(ceiling_before, matmul_ceiling(torch, device))
        sheet = datasheet_bf16_flops(dev_name) if device == "cuda" else None
        tokens = pairs * (p + 2 * a)
        train_fs = train_flops / train_s
        out = {
            "tool": f"pytorch-{mode}", "shape": shape, "device": dev_name,
            "dtype": "bf16" if use_amp else "fp32", "layout": "concatenated",
            "threads": args.threads if device == "cpu" else 0,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "micro_batch_tokens": args.micro_batch_tokens, "prompt_len": p, "answer_len": a,
            "pairs_per_step": pairs, "tokens_per_step": tokens, "steps": args.steps, "warmup": args.warmup,
            "train_step_s": train_s, "train_tokens_per_s": tokens / train_s, "train_pairs_per_s": pairs / train_s,
            "ref_step_s": ref_s, "ref_tokens_per_s": tokens / ref_s, "dpo_pairs_per_s": pairs / (ref_s + train_s),
            "train_flops_per_step": train_flops, "ref_flops_per_step": fwd_flops,
            "train_tflops": train_fs / 1e12, "ref_tflops": fwd_flops / ref_s / 1e12,
            "ceiling_tflops": ceiling / 1e12,
            "ceiling": f"torch.matmul {'fp32 2048' if device == 'cpu' else 'bf16 8192'}^3, best of 3 before and 3 after",
            "mfu": train_fs / ceiling,
            "datasheet_tflops": sheet / 1e12 if sheet else None, "mfu_datasheet": train_fs / sheet if sheet else None,
            "peak_mem_bytes": peak,
            "peak_mem": "VmHWM: peak resident set of the process" if device == "cpu" else "torch.cuda.max_memory_allocated",
        }
        print(json.dumps(out), flush=True)
        print(f"{out['tool']}: {shape} on {dev_name}: train {out['train_tokens_per_s']:.1f} tokens/s, "
              f"reference {out['ref_tokens_per_s']:.1f} tokens/s, MFU {100 * out['mfu']:.1f}%, "
              f"peak memory {peak / 2**20:.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
