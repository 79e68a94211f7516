#!/usr/bin/env python3
"""table.txt and summary.json of a tools/gpu-check.sh run, from its steps.tsv and logs.

    python3 tools/gpu_check_summary.py WORK RESULTS BUDGET_MS ELAPSED_MS FINAL TIME_DIV

WORK holds steps.tsv (one line per step: name, kind, status, seconds, the step it is
compared with) and logs/<name>.log; table.txt and summary.json are written into RESULTS.
Standard library only (and compare_torch.py's JSON lines and ratios, which need no more):
it runs under whatever python3 the GPU host has.

summary.json:
  complete, budget_s, elapsed_s, time_div   whether the run reached its end; the budget and
                        the time used, in seconds of this run (a dry run divides its limits)
  env                   device, driver, torch, the binaries' commit, every library found
                        (libraries: name -> path) and what is missing
  steps                 [{name, kind, status, seconds, figure}], the rows of table.txt
  smoke                 gpu_smoke's SMOKE line (key = value)
  ceilings              gpu_ceilings's CEILING line: copy_GBps, bf16_gemm_TFLOPs, the
                        datasheet's figures and the fractions of them
  tests                 per GPU test: status, seconds, max_rel_err and max_abs_delta over the
                        lines that print one, checks (how many), worst (that line), failure
  runs                  per benchmark step: its JSON line (sdpo-run bench, compare_torch.py;
                        keys at the top of tools/compare_torch.py): tokens/s, MFU, peak and
                        planned memory, attention TFLOP/s
  memory                per training step: peak_bytes, planned_bytes, peak_over_planned
  ratios                per PyTorch step, against the sdpo-run step it anchors: training
                        tokens/s, reference tokens/s, DPO pairs/s and peak memory as
                        sdpo-run over PyTorch; attention times as PyTorch over sdpo-run
                        (>1: sdpo-run is faster, or for memory, uses more)
  kernels               per kernel-benchmark step: [{shape, op, cuda_time, cuda_rate}] from
                        its closing table, else {name: time} of what criterion printed
  sanitizers            per compute-sanitizer step: status, summary (its closing line)
  profiles              per Nsight Compute step: [{kernel, grid, block, duration_us,
                        occupancy_pct, no_eligible_pct}], one per profiled launch
"""

import json
import os
import re
import shlex
import sys

from compare_torch import json_lines, ratios

NUM = r"([0-9][0-9.]*(?:[eE][+-]?[0-9]+)?|nan|inf)"


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def key_values(line):
    """`WORD k=v k="v w" ...` -> {k: v}, numbers as floats."""
    out = {}
    for part in shlex.split(line)[1:]:
        k, _, v = part.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


def failure(lines):
    """The line that says why a step failed: a panic's message, else the last error line."""
    for i, line in enumerate(lines):
        if "panicked at" in line:
            rest = line.split("panicked at", 1)[1]
            if rest.rstrip().endswith(":") and i + 1 < len(lines):
                return lines[i + 1].strip()
            return rest.strip()
    for line in reversed(lines):
        if re.search(r"error|Error|ERROR|Traceback|not found|Killed|Segmentation", line):
            return line.strip()
    rest = [l.strip() for l in lines if l.strip() and not l.startswith("$ ")]
    return rest[-1] if rest else "no output"


def finite(v):
    """`v` with every NaN and infinity replaced by None: summary.json stays strict JSON."""
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v


def fmt(x, digits=3):
    """`digits` significant digits, whole numbers from 100 on (no exponent)."""
    if x is None:
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def gb(b):
    return "n/a" if b is None else f"{b / 1e9:.1f} GB"


# --- one parser per kind: (figure, what goes into the summary)


def parse_env(lines, _):
    env = {"libraries": {}, "missing": []}
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if key in ("device", "binaries", "torch", "transformers", "nvcc", "host", "python"):
            env.setdefault(key, value)
        elif key.startswith("lib") or key == "headers":
            env["libraries"][key] = value
        elif key == "missing":
            env["missing"].append(value)
    fig = f"{env.get('device', '?')}; torch {env.get('torch', '?').split()[0]}"
    if env["missing"]:
        fig = "MISSING " + "; ".join(m.split(" ")[0] for m in env["missing"]) + "; " + fig
    return fig, env


def parse_list(lines, status):
    n = sum(1 for l in lines if l.endswith(": test"))
    return (f"{n} GPU tests" if status == "ok" else failure(lines)[:110]), n


def parse_test(lines, status):
    rel = [(float(m.group(1)), l.strip()) for l in lines for m in [re.search(r"rel err " + NUM, l)] if m]
    delta = [float(m.group(1)) for l in lines for m in [re.search(r"\|Δ\| " + NUM, l)] if m]
    t = {"max_rel_err": max((r for r, _ in rel), default=None), "max_abs_delta": max(delta, default=None),
         "checks": len(rel) + len(delta), "worst": max(rel)[1][:160] if rel else None, "failure": None}
    lines_kv = {w: key_values(l) for l in lines for w in ("SMOKE", "CEILING") if l.startswith(w + " ")}
    t.update({k.lower(): v for k, v in lines_kv.items()})
    if status.startswith(("TIMEOUT", "CRASH")):
        out = [l.strip() for l in lines[1:] if l.strip()]
        t["failure"] = "last output: " + (out[-1] if out else "none")
        return t["failure"][:110], t
    if status != "ok":
        t["failure"] = failure(lines)[:300]
        return t["failure"][:110], t
    if "CEILING" in lines_kv:
        c = lines_kv["CEILING"]
        return (f"copy {fmt(c.get('copy_GBps'))} GB/s ({fmt(c.get('copy_fraction'), 2)} of datasheet), "
                f"bf16 GEMM {fmt(c.get('bf16_gemm_TFLOPs'))} TFLOP/s ({fmt(c.get('gemm_fraction'), 2)})"), t
    if "SMOKE" in lines_kv:
        s = lines_kv["SMOKE"]
        return (f"kernels ready in {fmt(s.get('kernels_ready_s'))} s; cast round trip max err "
                f"{fmt(s.get('cast_max_err'))} over {int(s.get('elements', 0))} values"), t
    if t["checks"] == 0:
        return "passed (no figures printed)", t
    fig = f"max rel err {t['max_rel_err']:.1e}" if rel else ""
    if delta:
        fig += (", " if fig else "") + f"max |Δ| {t['max_abs_delta']:.1e}"
    return f"{fig} ({t['checks']} checks)", t


def last_run(lines, pred):
    runs = [j for j in json_lines(lines) if pred(j)]
    return runs[-1] if runs else None


def parse_train(lines, status):
    run = last_run(lines, lambda j: "train_tokens_per_s" in j)
    if run is None:
        return failure(lines)[:110], None
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    fig = f"{run['train_tokens_per_s']:.0f} tokens/s, MFU {pct(run.get('mfu'))}, peak {gb(run.get('peak_mem_bytes'))}"
    if run.get("planned_mem_bytes"):
        fig += f" (plan {gb(run['planned_mem_bytes'])})"
    return fig, run


def parse_attention(lines, status):
    run = last_run(lines, lambda j: j.get("kind") == "attention")
    if run is None:
        return failure(lines)[:110], None
    return (f"fwd+bwd {run['fwd_bwd_ms']:.3f} ms, {fmt(run['tflops_fwd_bwd'])} TFLOP/s "
            f"(fwd {fmt(run['tflops_fwd'])}, bwd {fmt(run['tflops_bwd'])})"), run


KERNEL_CELL = r"(-|[0-9.]+ (?:µs|ms|s)\s+[0-9.]+ (?:GB|TFLOP)/s)"
KERNEL_ROW = re.compile(r"^(\S+)\s+(.+?)\s+" + KERNEL_CELL + r"\s+" + KERNEL_CELL + r"\s*$")


def parse_kernels(lines, status):
    start = next((i for i, l in enumerate(lines) if l.startswith("Fastest call per benchmark")), None)
    if start is None:
        # Cut short: what criterion printed, "<name> time: [low median high]".
        timed, prev = {}, ""
        for line in lines:
            m = re.match(r"^(.*?)\s*time:\s*\[\S+ \S+ (\S+ \S+)", line)
            if m:
                timed[m.group(1) or prev] = m.group(2)
            elif line.strip():
                prev = line.strip()
        fig = f"{len(timed)} timed, no closing table" if timed else failure(lines)[:110]
        return fig, timed
    rows = []
    for line in lines[start + 1:]:
        m = KERNEL_ROW.match(line)
        if m and m.group(4) != "-":
            time, rate = re.split(r"\s{2,}", m.group(4).strip())
            rows.append({"shape": m.group(1), "op": m.group(2), "cuda_time": time, "cuda_rate": rate})
    rate = lambda unit: max((float(r["cuda_rate"].split()[0]) for r in rows if r["cuda_rate"].endswith(unit)), default=None)
    return f"{len(rows)} timed; fastest GEMM/attention {fmt(rate('TFLOP/s'))} TFLOP/s, top {fmt(rate('GB/s'))} GB/s", rows


def parse_sanitize(lines, status):
    """compute-sanitizer's closing line ("ERROR SUMMARY: 0 errors", "RACECHECK SUMMARY: ...")."""
    summary = [l.strip(" =\n") for l in lines if re.search(r"SUMMARY: ", l)]
    fig = summary[-1] if summary else failure(lines)
    return fig[:110], {"status": status, "summary": summary[-1] if summary else None}


NCU_KERNEL = re.compile(r"^  (\w+) \((\d+, \d+, \d+)\)x\((\d+, \d+, \d+)\)")
NCU_METRIC = re.compile(r"^    (Duration|Achieved Occupancy|No Eligible)\s+(\S+)\s+([0-9][0-9.,]*)\s*$")


def parse_profile(lines, status):
    """Nsight Compute's text report: per profiled launch, its kernel, grid, block, duration
    (µs), achieved occupancy and the share of cycles with no eligible warp (%)."""
    launches, scale = [], {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
    for line in lines:
        m = NCU_KERNEL.match(line)
        if m:
            launches.append({"kernel": m.group(1), "grid": m.group(2), "block": m.group(3)})
            continue
        m = NCU_METRIC.match(line)
        if m and launches:
            key, unit, value = m.group(1), m.group(2), float(m.group(3).replace(",", ""))
            if key == "Duration":
                launches[-1]["duration_us"] = value * scale.get(unit, float("nan"))
            else:
                launches[-1]["occupancy_pct" if key.startswith("Achieved") else "no_eligible_pct"] = value
    if not launches:
        return failure(lines)[:110], None
    first = {}
    for l in launches:
        first.setdefault(l["kernel"], l)
    fig = "; ".join(f"{k} {fmt(l.get('duration_us'))} us, occupancy {fmt(l.get('occupancy_pct'))}%"
                    for k, l in first.items())
    return fig, launches


PARSERS = {"env": parse_env, "list": parse_list, "test": parse_test, "train": parse_train, "torch": parse_train,
           "attention": parse_attention, "kernels": parse_kernels, "sanitize": parse_sanitize,
           "profile": parse_profile}


def main(work, results, budget_ms, elapsed_ms, final, div):
    steps = [l.split("\t") for l in read_lines(os.path.join(work, "steps.tsv")) if l.strip()]
    s = {"complete": final == "1", "time_div": int(div), "budget_s": int(budget_ms) / 1000,
         "elapsed_s": int(elapsed_ms) / 1000, "env": {}, "steps": [], "smoke": None, "ceilings": None,
         "tests": {}, "runs": {}, "memory": {}, "ratios": {}, "kernels": {}, "sanitizers": {},
         "profiles": {}}
    for name, kind, status, seconds, vs in (row + [""] * (5 - len(row)) for row in steps):
        lines = read_lines(os.path.join(work, "logs", name + ".log"))
        if status.startswith("skipped"):
            figure, data = "", None
        else:
            figure, data = PARSERS[kind](lines, status)
        if kind == "env":
            s["env"] = data
        elif kind == "test" and data is not None:
            s["smoke"] = data.pop("smoke", s["smoke"])
            s["ceilings"] = data.pop("ceiling", s["ceilings"])
            s["tests"][name] = {"status": status, "seconds": seconds, **data}
        elif kind in ("train", "torch", "attention") and data is not None:
            s["runs"][name] = data
            if data.get("planned_mem_bytes") and data.get("peak_mem_bytes"):
                s["memory"][name] = {"peak_bytes": data["peak_mem_bytes"], "planned_bytes": data["planned_mem_bytes"],
                                     "peak_over_planned": data["peak_mem_bytes"] / data["planned_mem_bytes"]}
            ours = s["runs"].get(vs)
            if vs and ours:
                r = ratios(kind == "attention", ours, data)
                s["ratios"][name] = {"against": vs, **r}
                if kind == "attention":
                    figure += f"; sdpo-run x{fmt(r['fwd_bwd_ms'])}"
                else:
                    figure += f"; sdpo-run x{fmt(r['train_tokens_per_s'])} tokens/s, x{fmt(r['peak_mem_bytes'])} memory"
        elif kind == "kernels" and data is not None:
            s["kernels"][name] = data
        elif kind == "sanitize" and data is not None:
            s["sanitizers"][name] = data
        elif kind == "profile" and data is not None:
            s["profiles"][name] = data
        s["steps"].append({"name": name, "kind": kind, "status": status, "seconds": seconds, "figure": figure})

    env = s["env"] or {}
    head = (f"gpu-check on {env.get('device', '?')}, binaries {env.get('binaries', '?').split()[0][:12]}: "
            f"{'complete' if s['complete'] else 'RUNNING or CUT SHORT'}, {s['elapsed_s']:.0f} of {s['budget_s']:.0f} s")
    rows = [head, f"{'step':<44} {'status':<16} {'seconds':>7}  key figure"]
    rows += [f"{t['name']:<44} {t['status']:<16} {t['seconds']:>7}  {t['figure'][:110]}" for t in s["steps"]]
    for fname, text in (("table.txt", "\n".join(rows) + "\n"), ("summary.json", json.dumps(finite(s), indent=1, allow_nan=False) + "\n")):
        with open(os.path.join(results, fname), "w", encoding="utf-8") as f:
            f.write(text)

if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:])
