#!/usr/bin/env bash
# The GPU check: the GPU tests (tests/gpu.rs), the device's ceilings and the benchmarks in
# one call on a GPU host that has the NVIDIA driver, the CUDA libraries and PyTorch but no
# Rust toolchain.
#
#   tools/gpu-check.sh --prepare   on a machine with Rust: builds the release binaries into
#                                  .gpu/ (git-ignored), checks them, dry-runs this script
#                                  and prints the call to make on the GPU host
#   tools/gpu-check.sh             on the GPU host, in a copy of the repository with .gpu/
#   tools/gpu-check.sh --dry-run   anywhere: the whole run against the stub programs of
#                                  tools/gpu-check-stubs/ (one hangs, one crashes), every
#                                  time limit divided by $GPU_CHECK_TIME_DIV (20);
#                                  tests/gpu_check.rs runs it
#
# Results: four files in $GPU_CHECK_OUT, else $OUT, else runs/gpu-check-<time>/ (--dry-run:
# a new temporary folder), all rewritten after every step, so that a run cut short leaves
# what had finished:
#   table.txt     one row per step and per GPU test: name, status, seconds, key figure
#   summary.json  every measured figure (tools/gpu_check_summary.py lists them)
#   logs.tgz      every step's full log (each cut to its first and last MiBs past 4 MiB)
#   env.txt       the machine, and where each CUDA library and header was found
#
# Order, most needed first: the environment and the library search; gpu_smoke, one small
# kernel launch (it compiles every kernel with NVRTC into the cache that the later processes
# read); gpu_ceilings and every other GPU test (`gpu-tests --ignored --list`), each in its
# own process under its own limit, so that a crash or a hang costs one row; the headline
# training benchmark (llama-1b, prompt 256 + answers 512, 8 pairs per step) and its PyTorch
# anchor (eager); causal attention alone against PyTorch SDPA (flash); compute-sanitizer
# (racecheck on attention, memcheck on engine steps) and Nsight Compute on the attention
# kernels, where the toolkit has them; the kernel benchmarks; then, each only while the budget still holds its whole limit, both tools at
# 16 pairs per step, llama-8b, and the PyTorch anchor under torch.compile. The run ends
# within $GPU_CHECK_BUDGET seconds (540).
#
# The CUDA libraries are searched for in $CUDA_HOME, /usr/local/cuda, the toolkit around
# nvcc, then the pip wheels of the PyTorch Python (nvidia/*/lib); what is found reaches the
# project's binaries alone (`env LD_LIBRARY_PATH=... SDPO_NVRTC_LIB=...`), never python3,
# which keeps its own wheels' libraries.
set -uo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

# The call that --prepare prints, to make on the GPU host.
CALL_COMMAND="bash tools/gpu-check.sh"
CALL_CARRY='[".gpu"]'
CALL_TIMEOUT_S=600
# What the GPU host accepts: glibc of Ubuntu 24.04; .gpu/ with room left for the repository
# in the 64 MiB that travel.
GLIBC_MAX=2.39
CARRY_MAX_MIB=55
TREE_MAX_MIB=64

# --- --prepare

# The path cargo prints for the test or bench target SOURCE ("Executable SOURCE (PATH)").
exe_path() { sed -n "s|^ *Executable $2 (\(.*\))\$|\1|p" <<<"$1" | tail -1; }

prepare() {
  local bin=.gpu out f fails=0
  echo "== building the release binaries into $bin/"
  rm -rf "$bin" && mkdir -p "$bin" || return 1
  out=$(cargo test --release --no-run --test gpu 2>&1) || { echo "$out" | tail -30; return 1; }
  cp "$(exe_path "$out" tests/gpu.rs)" "$bin/gpu-tests" || return 1
  out=$(cargo build --release --bin sdpo-run 2>&1) || { echo "$out" | tail -30; return 1; }
  cp target/release/sdpo-run "$bin/sdpo-run" || return 1
  out=$(cargo bench --no-run --bench kernels 2>&1) || { echo "$out" | tail -30; return 1; }
  cp "$(exe_path "$out" benches/kernels.rs)" "$bin/kernels-bench" || return 1
  strip "$bin"/* || return 1
  { git rev-parse HEAD; git status --short -- src kernels tests benches build.rs Cargo.toml Cargo.lock; } >"$bin/COMMIT"
  ls -l "$bin"

  # check WHAT OK: one line, "ok" or "FAIL", and the count of failures
  check() { if [ "$2" = 0 ]; then echo "ok    $1"; else echo "FAIL  $1"; fails=$((fails + 1)); fi; }
  echo "== checks"
  local list n
  list=$("$bin/gpu-tests" --ignored --list 2>&1 | sed -n 's/: test$//p')
  n=$(grep -c . <<<"$list")
  grep -qx gpu_smoke <<<"$list" && grep -qx gpu_ceilings <<<"$list"
  check "gpu-tests --ignored --list: $n GPU tests, gpu_smoke and gpu_ceilings among them" $?

  if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    echo "skip  how the binaries fail without a GPU: this machine has libcuda"
  else
    out=$(timeout 120 "$bin/gpu-tests" --ignored --exact gpu_smoke 2>&1)
    f=$?
    [ "$f" -ne 0 ] && [ "$f" -lt 128 ] && grep -q 'libcuda was not found' <<<"$out"
    check "gpu-tests without a GPU: exit $f, \"$(grep -om1 'libcuda was not found[^"]*' <<<"$out")\"" $?
    out=$(timeout 120 "$bin/sdpo-run" bench --device cuda --shape llama-1b --steps 1 --warmup 0 2>&1)
    f=$?
    [ "$f" -ne 0 ] && [ "$f" -lt 128 ] && grep -q 'libcuda was not found' <<<"$out"
    check "sdpo-run bench without a GPU: exit $f, \"$(grep -om1 'libcuda was not found[^"]*' <<<"$out")\"" $?
    out=$(timeout 300 "$bin/kernels-bench" --bench cuda/llama-1b/ 2>&1)
    f=$?
    [ "$f" -eq 0 ] && grep -q 'CUDA benchmarks skipped: libcuda was not found' <<<"$out"
    check "kernels-bench without a GPU: exit $f, \"$(grep -om1 'CUDA benchmarks skipped: [^"]*' <<<"$out")\"" $?
  fi

  local carry tree
  carry=$(du -sb "$bin" | cut -f1)
  [ "$carry" -le $((CARRY_MAX_MIB << 20)) ]
  check "$bin/ is $((carry >> 20)) MiB (at most $CARRY_MAX_MIB)" $?
  # What travels with it: tracked and untracked files that git does not ignore.
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  [ $((tree + carry)) -le $((TREE_MAX_MIB << 20)) ]
  check "the repository ($((tree >> 20)) MiB) and $bin/ together: $(((tree + carry) >> 20)) MiB (at most $TREE_MAX_MIB)" $?

  local need
  need=$(objdump -T "$bin"/gpu-tests "$bin"/sdpo-run "$bin"/kernels-bench | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' |
    sed 's/GLIBC_//' | sort -uV | tail -1)
  [ "$(printf '%s\n' "$need" "$GLIBC_MAX" | sort -V | tail -1)" = "$GLIBC_MAX" ]
  check "the binaries need glibc $need (the GPU host has $GLIBC_MAX)" $?

  local dry
  dry=$(mktemp -d)
  out=$(GPU_CHECK_OUT=$dry bash tools/gpu-check.sh --dry-run 2>&1)
  f=$?
  rm -rf "$dry"
  # The stubs hang, crash and panic in one test each on purpose: exit 1, a full table and
  # exactly those three bad rows is the dry run passing.
  [ "$f" -eq 1 ] && grep -q '^kernels-8b  *ok' <<<"$out" &&
    [ "$(grep -cE '^[a-z_0-9-]+ +(FAIL|TIMEOUT|CRASH)' <<<"$out")" -eq 3 ]
  check "dry run: exit $f, $(grep -cE '^[a-z_0-9-]+ +(ok|FAIL|TIMEOUT|CRASH|skipped)' <<<"$out") rows" $?

  if [ "$fails" -gt 0 ]; then
    echo "$fails check(s) failed: fix them before using a GPU lease"
    return 1
  fi
  echo "== the device call (one run; results come back in \$OUT)"
  echo "  command:   $CALL_COMMAND"
  echo "  carry:     $CALL_CARRY"
  echo "  timeout_s: $CALL_TIMEOUT_S"
  echo "  as JSON:   {\"command\": \"$CALL_COMMAND\", \"carry\": $CALL_CARRY, \"timeout_s\": $CALL_TIMEOUT_S}"
}

case "${1:-}" in
  --prepare) prepare; exit $? ;;
  --dry-run) MODE=dry ;;
  "") MODE=run ;;
  *) echo "usage: tools/gpu-check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac

# --- the run: settings

BIN=.gpu
CUDA_ROOTS=() # filled by find_libraries
TORCH_PY=python3
# Where the driver's libcuda may be when ldconfig does not list it.
IFS=: read -ra DRIVER_DIRS <<<"${LD_LIBRARY_PATH:-}"
DRIVER_DIRS+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/cache"

if [ "$MODE" = dry ]; then
  DIV=${GPU_CHECK_TIME_DIV:-20}
  BIN=tools/gpu-check-stubs
  TORCH_PY=$BIN/python3
  RESULTS=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry.XXXXXX")}
  # A driver, a toolkit and a pip wheel of empty files, for the library search to find; the
  # stubs check that the binaries see them and python3 does not.
  export GPU_STUB_FAKE=$WORK/fake
  mkdir -p "$GPU_STUB_FAKE"/{driver,cuda/lib64,cuda/include,site/nvidia/cu13/lib}
  touch "$GPU_STUB_FAKE"/driver/libcuda.so.1 "$GPU_STUB_FAKE"/cuda/lib64/{libnvrtc.so.13,libcublasLt.so.13} \
    "$GPU_STUB_FAKE"/cuda/include/{cuda_bf16.h,mma.h} "$GPU_STUB_FAKE"/site/nvidia/cu13/lib/libnccl.so.2
  export CUDA_HOME=$GPU_STUB_FAKE/cuda
  DRIVER_DIRS=("$GPU_STUB_FAKE/driver")
else
  DIV=1
  RESULTS=${GPU_CHECK_OUT:-${OUT:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}}
fi
mkdir -p "$RESULTS" || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# Time in milliseconds. S is one second of a limit (1000 ms, 50 in a dry run).
now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; echo $((${t:-$(date +%s%N | cut -c1-16)} / 1000)); }
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
S=$((1000 / DIV))
START_MS=$(now_ms)
BUDGET_MS=$((${GPU_CHECK_BUDGET:-540} * S))
KILL_MS=$((10 * S))     # from a limit's SIGTERM to SIGKILL
RESERVE_MS=$((10 * S))  # kept for the last table, summary and tarball (at least 2 s)
[ "$RESERVE_MS" -lt 2000 ] && RESERVE_MS=2000
MIN_STEP_MS=$((20 * S)) # a step with less left is skipped
LOG_MAX=$((4 << 20))    # bytes of one log in the tarball

# --- results

# Repacks the logs into $RESULTS/logs.tgz: a log over LOG_MAX keeps its first and last
# LOG_MAX/2 bytes; a tarball still over 15 MiB is packed again with 256 KiB per log.
pack() {
  local max f
  for max in "$LOG_MAX" $((256 << 10)); do
    rm -rf "$WORK/pack" && mkdir -p "$WORK/pack/logs"
    for f in "$WORK"/logs/*; do
      if [ "$(stat -c %s "$f")" -gt "$max" ]; then
        { head -c $((max / 2)) "$f"; printf '\n[... cut to its first and last %d bytes ...]\n' $((max / 2)); tail -c $((max / 2)) "$f"; } \
          >"$WORK/pack/logs/${f##*/}"
      else
        cp "$f" "$WORK/pack/logs/"
      fi
    done
    cp "$WORK/steps.tsv" "$WORK/pack/" 2>/dev/null
    tar -czf "$WORK/logs.tgz" -C "$WORK/pack" . || return
    [ "$(stat -c %s "$WORK/logs.tgz")" -le $((15 << 20)) ] && break
  done
  mv -f "$WORK/logs.tgz" "$RESULTS/logs.tgz"
}

# Rewrites table.txt, summary.json and logs.tgz from steps.tsv and the logs; FINAL=1 marks
# the run complete. Without Python the table is written here, without key figures.
publish() {
  if ! timeout 60 python3 tools/gpu_check_summary.py "$WORK" "$RESULTS" "$BUDGET_MS" \
    $(($(now_ms) - START_MS)) "${FINAL:-0}" "$DIV" >"$WORK/logs/summary.log" 2>&1; then
    { echo "(tools/gpu_check_summary.py failed: logs.tgz holds summary.log)"
      awk -F'\t' '{ printf "%-44s %-16s %7s\n", $1, $3, $4 }' "$WORK/steps.tsv"; } >"$RESULTS/table.txt"
  fi
  pack
}

# record NAME KIND STATUS SECONDS: one line of steps.tsv, with $VS, the step whose figures
# NAME's are compared with. A step that ran publishes next; a skipped one waits for that.
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${VS:-}" >>"$WORK/steps.tsv"
  echo "-- $1: $3 ($4 s)"
}

# --- steps

# step NAME KIND LIMIT_MS COMMAND...: runs COMMAND, its output in logs/NAME.log, under
# LIMIT_MS cut to what the budget leaves, and records its row. Skipped when under
# MIN_STEP_MS is left or, with WHOLE=1, when LIMIT_MS no longer fits. Status: ok;
# TIMEOUT(limit); CRASH(signal); FAIL(rc=N); FAIL(...) when the log lacks the regex EXPECT or
# holds FAIL_IF. LAST_MS is the time it took.
step() {
  local name=$1 kind=$2 limit=$3
  shift 3
  local left=$((BUDGET_MS - RESERVE_MS - KILL_MS - ($(now_ms) - START_MS)))
  LAST_MS=0
  if [ "$left" -lt "$MIN_STEP_MS" ] || { [ "${WHOLE:-0}" = 1 ] && [ "$limit" -gt "$left" ]; }; then
    record "$name" "$kind" "skipped(budget)" -
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log=$WORK/logs/$name.log t0 rc status=ok
  echo "== $name (limit $(secs "$limit") s)"
  echo "\$ $*" >"$log"
  t0=$(now_ms)
  timeout --kill-after="$(secs "$KILL_MS")" "$(secs "$limit")" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  LAST_MS=$(($(now_ms) - t0))
  if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$LAST_MS" -ge "$limit" ]; }; then
    status="TIMEOUT($(printf '%g' "$(secs "$limit")")s)"
  elif [ "$rc" -gt 128 ]; then
    status="CRASH($(kill -l $((rc - 128)) 2>/dev/null || echo "rc=$rc"))"
  elif [ "$rc" -ne 0 ]; then
    status="FAIL(rc=$rc)"
  elif [ -n "${EXPECT:-}" ] && ! grep -qE -- "$EXPECT" "$log"; then
    status="FAIL(output)"
  elif [ -n "${FAIL_IF:-}" ] && grep -qE -- "$FAIL_IF" "$log"; then
    status="FAIL(output)"
  fi
  [ "$status" = ok ] || tail -3 "$log" | cut -c1-200
  record "$name" "$kind" "$status" "$(secs "$LAST_MS")"
  publish
}

# bin_step NAME KIND LIMIT_MS PROGRAM ARGS...: `step` for one of the project's binaries in
# $BIN, with the libraries found below; skipped when the binary is missing.
bin_step() {
  local name=$1 kind=$2 limit=$3 prog=$4
  shift 4
  LAST_MS=0
  if [ ! -x "$BIN/$prog" ]; then
    record "$name" "$kind" "skipped(no $BIN/$prog)" -
    return
  fi
  step "$name" "$kind" "$limit" "${BIN_ENV[@]}" "$BIN/$prog" "$@"
}

# tool_step NAME KIND LIMIT_MS TOOL TOOL_ARGS... -- PROGRAM ARGS...: `bin_step` under one of
# the toolkit's tools (compute-sanitizer, ncu: on the PATH or in a CUDA root's bin/; the
# dry run's stubs); skipped when the tool is not found.
tool_step() {
  local name=$1 kind=$2 limit=$3 tool=$4 path r opts=()
  shift 4
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  LAST_MS=0
  if [ "$MODE" = dry ]; then
    path=$BIN/$tool
  else
    path=$(command -v "$tool")
    for r in "${CUDA_ROOTS[@]}"; do [ -n "$path" ] || { [ -x "$r/bin/$tool" ] && path=$r/bin/$tool; }; done
  fi
  if [ ! -x "${path:-/nonexistent}" ]; then
    record "$name" "$kind" "skipped(no $tool)" -
    return
  fi
  if [ ! -x "$BIN/$1" ]; then
    record "$name" "$kind" "skipped(no $BIN/$1)" -
    return
  fi
  local prog=$BIN/$1
  shift
  step "$name" "$kind" "$limit" "${BIN_ENV[@]}" "$path" "${opts[@]}" "$prog" "$@"
}

# --- the environment and the libraries

# first_in DIRS_ARRAY NAME...: the first DIR/NAME that exists, DIRS outermost.
first_in() {
  local -n dirs=$1
  shift
  local d n
  for d in "${dirs[@]}"; do
    for n in "$@"; do
      [ -e "$d/$n" ] && { echo "$d/$n"; return 0; }
    done
  done
  return 1
}

# Fills BIN_ENV (the `env` prefix of every project binary) and MISSING, and logs where
# each library and header was found.
find_libraries() {
  local roots=() lib_dirs=() inc_dirs=() ld=() r nvcc site cuda nvrtc cublaslt nccl bf16 mma inc=()
  [ -n "${CUDA_HOME:-}" ] && roots+=("$CUDA_HOME")
  roots+=(/usr/local/cuda)
  nvcc=$(command -v nvcc) && roots+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
  CUDA_ROOTS=("${roots[@]}")
  for r in "${roots[@]}"; do
    lib_dirs+=("$r/lib64" "$r/lib" "$r/targets/x86_64-linux/lib")
    inc_dirs+=("$r/include" "$r/targets/x86_64-linux/include")
  done
  site=$(sed -n 's/^site-packages: //p' "$WORK/logs/python.log" | head -1)
  if [ -n "$site" ]; then
    shopt -s nullglob
    lib_dirs+=("$site"/nvidia/*/lib)
    inc_dirs+=("$site"/nvidia/*/include)
    shopt -u nullglob
  fi
  local where="\$CUDA_HOME, /usr/local/cuda, nvcc's toolkit${nvcc:+ (${roots[-1]})}, ${site:-<no site-packages>}/nvidia/*/"
  MISSING=()

  # A dry run takes the stubs' driver folder even where a real driver is installed.
  cuda=""
  [ "$MODE" = dry ] || cuda=$(ldconfig -p 2>/dev/null | awk '$1 == "libcuda.so.1" { print $NF; exit }')
  if [ -n "$cuda" ]; then
    echo "libcuda.so.1: $cuda (ldconfig)"
  elif cuda=$(first_in DRIVER_DIRS libcuda.so.1); then
    echo "libcuda.so.1: $cuda"
    ld+=("${cuda%/*}")
  else
    MISSING+=("libcuda.so.1 (the NVIDIA driver) is in neither ldconfig nor ${DRIVER_DIRS[*]}: nothing on the GPU can run")
  fi
  if nvrtc=$(first_in lib_dirs libnvrtc.so.13 libnvrtc.so.12 libnvrtc.so); then
    echo "libnvrtc: $nvrtc"
    ld+=("${nvrtc%/*}")
  else
    MISSING+=("libnvrtc (.so.13/.so.12) is not in $where""lib: the kernels cannot compile")
  fi
  if cublaslt=$(first_in lib_dirs libcublasLt.so.13 libcublasLt.so.12 libcublasLt.so); then
    echo "libcublasLt: $cublaslt"
    ld+=("${cublaslt%/*}")
  else
    MISSING+=("libcublasLt (.so.13/.so.12) is not in $where""lib: the GEMMs cannot run")
  fi
  if nccl=$(first_in lib_dirs libnccl.so.2 libnccl.so); then
    echo "libnccl: $nccl (not used yet)"
    ld+=("${nccl%/*}")
  else
    echo "libnccl: not found (not used yet)"
  fi
  if bf16=$(first_in inc_dirs cuda_bf16.h) && mma=$(first_in inc_dirs mma.h); then
    inc=("${bf16%/*}")
    [ "${mma%/*}" != "${bf16%/*}" ] && inc+=("${mma%/*}")
    [ -d "${bf16%/*}/cccl" ] && inc+=("${bf16%/*}/cccl")
    echo "headers: ${inc[*]}"
  else
    MISSING+=("cuda_bf16.h and mma.h are not both in $where""include: the kernels cannot compile")
  fi

  # Each folder once, then the caller's LD_LIBRARY_PATH.
  local path="" d
  for d in "${ld[@]}"; do
    case ":$path:" in *":$d:"*) ;; *) path=${path:+$path:}$d ;; esac
  done
  path=$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  BIN_ENV=(env "LD_LIBRARY_PATH=$path" "SDPO_CACHE=$WORK/cache" "CRITERION_HOME=$WORK/criterion")
  [ -n "$nvrtc" ] && BIN_ENV+=("SDPO_NVRTC_LIB=$nvrtc")
  [ ${#inc[@]} -gt 0 ] && BIN_ENV+=("SDPO_CUDA_INCLUDE=$(IFS=:; echo "${inc[*]}")")
  echo "the binaries run under: ${BIN_ENV[*]:1}"
  for d in "${MISSING[@]}"; do echo "missing: $d"; done
}

environment() {
  local t0
  t0=$(now_ms)
  # The PyTorch Python: its site-packages (for the pip wheels' libraries), versions, GPU.
  timeout $((60 * S / 1000 + 1)) "$TORCH_PY" -c '
import sys, sysconfig
print("site-packages:", sysconfig.get_paths()["purelib"])
print("python:", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch:", torch.__version__, "cuda", torch.version.cuda,
          "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    import transformers
    print("transformers:", transformers.__version__)
except Exception as e:
    print("torch: not usable:", type(e).__name__, e)
' >"$WORK/logs/python.log" 2>&1
  {
    echo "gpu-check ($MODE) started $(date -u '+%Y-%m-%d %H:%M:%S UTC'); budget $((BUDGET_MS / 1000)) s"
    if [ "$MODE" = dry ]; then
      echo "binaries: stubs ($BIN)"
    else
      echo "binaries: $(head -1 "$BIN/COMMIT" 2>/dev/null || echo "unknown (no $BIN/COMMIT)")"
    fi
    [ -f "$BIN/COMMIT" ] && [ "$(wc -l <"$BIN/COMMIT")" -gt 1 ] &&
      { echo "uncommitted changes when they were built:"; tail -n +2 "$BIN/COMMIT"; }
    echo "host: $(uname -srm); $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"); $(ldd --version 2>/dev/null | head -1)"
    echo "cpus: $(nproc); memory: $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
    if command -v nvidia-smi >/dev/null; then
      echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
    else
      echo "device: $(sed -n 's/^torch: .* gpu //p' "$WORK/logs/python.log") (as PyTorch names it: no nvidia-smi)"
    fi
    echo "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
    cat "$WORK/logs/python.log"
    echo "--- the CUDA libraries (for the project's binaries only)"
    find_libraries
    if command -v nvidia-smi >/dev/null; then
      echo "--- nvidia-smi"
      nvidia-smi 2>&1
    fi
  } >"$WORK/logs/env.log" 2>&1
  cp "$WORK/logs/env.log" "$RESULTS/env.txt"
  # find_libraries ran in this shell: BIN_ENV and MISSING are set.
  local m
  for m in "${MISSING[@]}"; do echo "gpu-check: missing $m" >&2; done
  record env env "$([ ${#MISSING[@]} -eq 0 ] && echo ok || echo "FAIL(missing)")" "$(secs $(($(now_ms) - t0)))"
  publish
}

# --- the run

: >"$WORK/steps.tsv"
ulimit -c 0 # a crashing binary leaves no core file in the repository
chmod u+x "$BIN"/gpu-tests "$BIN"/sdpo-run "$BIN"/kernels-bench 2>/dev/null
environment
EXPECT=': test$' bin_step gpu-tests-list list $((30 * S)) gpu-tests --ignored --list
mapfile -t TESTS < <(sed -n 's/: test$//p' "$WORK/logs/gpu-tests-list.log" 2>/dev/null)
# gpu_smoke first (it fills the kernel cache), then gpu_ceilings, then the rest as listed;
# the tests after gpu_smoke share PARITY_MS, so that hangs leave the benchmarks their time.
ORDERED=()
for t in gpu_smoke gpu_ceilings; do printf '%s\n' "${TESTS[@]}" | grep -qx "$t" && ORDERED+=("$t"); done
for t in "${TESTS[@]}"; do case $t in gpu_smoke | gpu_ceilings) ;; *) ORDERED+=("$t") ;; esac; done
PARITY_MS=$((360 * S))
for t in "${ORDERED[@]}"; do
  limit=$((60 * S))
  if [ "$t" = gpu_smoke ]; then
    limit=$((150 * S))
  elif [ "$PARITY_MS" -lt "$MIN_STEP_MS" ]; then
    record "$t" test "skipped(parity time)" -
    continue
  elif [ "$limit" -gt "$PARITY_MS" ]; then
    limit=$PARITY_MS
  fi
  EXPECT='test result: ok\. 1 passed' bin_step "$t" test "$limit" gpu-tests --ignored --exact "$t" --nocapture
  [ "$t" = gpu_smoke ] || PARITY_MS=$((PARITY_MS - LAST_MS))
done

# The headline: llama-1b, prompt 256 + answers 512, 8 pairs (10240
# tokens) per step, then the PyTorch anchor on the same sizes (eager; torch.compile last).
TRAIN=(--device cuda --shape llama-1b --prompt-len 256 --answer-len 512 --micro-batch-tokens 10240 --steps 5 --warmup 1)
EXPECT='"tool":"sdpo-run"' bin_step train-bench train $((150 * S)) sdpo-run bench "${TRAIN[@]}"
EXPECT='"tool": "pytorch-eager"' VS=train-bench step torch torch $((150 * S)) \
  "$TORCH_PY" tools/compare_torch.py "${TRAIN[@]}" --modes eager
# Causal attention alone at both tools' CUDA defaults: B 4, S 2048, 32 heads of 128.
EXPECT='"kind":"attention"' bin_step attention attention $((60 * S)) \
  sdpo-run bench --attention --device cuda --steps 50 --warmup 5
EXPECT='"kind": "attention"' VS=attention step attention-torch attention $((60 * S)) \
  "$TORCH_PY" tools/compare_torch.py --attention --device cuda --steps 50 --warmup 5
# compute-sanitizer (0 errors, or the step fails): racecheck on attention's shared-memory
# tiles, memcheck on whole engine steps.
EXPECT='RACECHECK SUMMARY: 0 hazards' tool_step racecheck sanitize $((60 * S)) compute-sanitizer \
  --tool racecheck --error-exitcode 1 -- gpu-tests --ignored --exact attention_matches_cpu
EXPECT='ERROR SUMMARY: 0 errors' tool_step memcheck sanitize $((60 * S)) compute-sanitizer \
  --tool memcheck --leak-check no --error-exitcode 1 -- gpu-tests --ignored --exact engine_matches_cpu_engine_on_fixtures
# Nsight Compute's counters (clocks left alone) on the attention kernels: the B 4, S 2048
# calls above, and the last forward and first backward of a llama-1b training step
# (head_dim 64; of the run's 64 launches, two reference passes' 16 forwards come first).
NCU=(--clock-control none --set full --kernel-name 'regex:attention_(forward|backward)_hd')
EXPECT='Achieved Occupancy' tool_step ncu-attention profile $((60 * S)) ncu "${NCU[@]}" --launch-count 6 -- \
  sdpo-run bench --attention --device cuda --steps 1 --warmup 0
EXPECT='Achieved Occupancy' tool_step ncu-attention-1b profile $((60 * S)) ncu "${NCU[@]}" --launch-skip 47 --launch-count 2 -- \
  sdpo-run bench --device cuda --shape llama-1b --prompt-len 256 --answer-len 512 --micro-batch-tokens 10240 --steps 1 --warmup 0
# Every CUDA kernel and GEMM on the layer shapes, one shape per step so that each prints
# its closing table.
for shape in 1b 8b; do
  EXPECT='^Fastest call per benchmark' FAIL_IF='CUDA benchmarks skipped' \
    bin_step "kernels-$shape" kernels $((100 * S)) kernels-bench --bench "cuda/llama-$shape/"
done

# Extras, each only with its whole limit left: both tools at 16 pairs (20480 tokens) per
# step, where BENCHMARKS.md's memory plan expects the 0.6x peak-memory aim to be met;
# Llama 3 8B at 3 pairs (whether it trains on one H200, its plan against its peak);
# torch.compile, whose compile of llama-1b alone can take minutes.
TRAIN16=(--device cuda --shape llama-1b --prompt-len 256 --answer-len 512 --micro-batch-tokens 20480 --steps 3 --warmup 1)
EXPECT='"tool":"sdpo-run"' WHOLE=1 bin_step train-bench16 train $((120 * S)) sdpo-run bench "${TRAIN16[@]}"
EXPECT='"tool": "pytorch-eager"' WHOLE=1 VS=train-bench16 step torch16 torch $((150 * S)) \
  "$TORCH_PY" tools/compare_torch.py "${TRAIN16[@]}" --modes eager
TRAIN8B=(--device cuda --shape llama-8b --prompt-len 256 --answer-len 512 --micro-batch-tokens 3840 --steps 2 --warmup 1)
EXPECT='"tool":"sdpo-run"' WHOLE=1 bin_step train-bench-8b train $((150 * S)) sdpo-run bench "${TRAIN8B[@]}"
EXPECT='"tool": "pytorch-compile"' WHOLE=1 VS=train-bench step torch-compile torch $((240 * S)) \
  "$TORCH_PY" tools/compare_torch.py "${TRAIN[@]}" --modes compile

FINAL=1 publish
echo
cat "$RESULTS/table.txt"
echo "results: $RESULTS"
# Non-zero when a step failed, crashed or timed out.
awk -F'\t' '$3 != "ok" && $3 !~ /^skipped/ { bad = 1 } END { exit bad }' "$WORK/steps.tsv"
