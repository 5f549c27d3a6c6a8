#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Side-by-side forward times: torch.nn.MultiheadAttention against this library's BM_mha_forward.

The library is timed twice: `forward` (allocating its result and buffers on every call, as
PyTorch does) and `forward_into` with a workspace kept across calls (BM_mha_forward_into). A second
table compares the attention core alone: torch.nn.functional.scaled_dot_product_attention (PyTorch
2.0 and later) against BM_attention_core_algo's tiled kernel, 8 heads × 64 at L = 512, 2048 and
8192, each also as a fraction of the same run's BM_fma_peak. Where the binary has bfloat16 rows
(BM_attention_core_bf16, BM_mha_forward_into_bf16) and PyTorch runs bfloat16, they are compared
too.

    /usr/bin/python3 bench/compare_pytorch.py [--binary build/release/bench/bench_attention]
                                              [--threads 1] [--repetitions 5]
                                              [--allow-reference-blas] [--torch-root DIR]

--torch-root DIR runs the PyTorch side in the Debian root DIR (chroot, as root) and the library
here, one after the other: a current PyTorch without touching this system, e.g. Debian 13's 2.6:

    debootstrap --variant=minbase trixie DIR
    chroot DIR apt-get install -y --no-install-recommends python3-torch libopenblas0-pthread
    mount -t proc proc DIR/proc; mount -t sysfs sys DIR/sys

(Without /proc and /sys in the root, PyTorch cannot read the CPU's features and falls back to its
code without AVX: the script refuses a root without them.)

--torch-only prints the PyTorch side's figures as JSON and stops; --torch-results FILE reads such
a file instead of running PyTorch (e.g. to compare several builds of the library against one
PyTorch run made on the same quiet machine).

Same shapes as BM_mha_forward (bench/bench_attention.cpp, kShapes): one sequence, d_model 512 with
8 heads at L = 128, 512, 2048 and 768 with 12 heads at L = 512, each without and with a causal
mask. PyTorch runs in eval mode under torch.inference_mode() with need_weights=False and
batch_first=True; the causal mask is a float L × L attn_mask with −inf above the diagonal (1.13's
MultiheadAttention.forward has no is_causal; it is used when present). PyTorch runs with
torch.set_num_threads(N), the library's binary with OMP_NUM_THREADS=N, N = --threads.

Both sides report the median over --repetitions: each PyTorch repetition times a loop of calls
long enough to take ~0.2 s; the library's side is Google Benchmark's own median. The binary also
times BM_gemm_roofline in the same run, printed above the table, so the library's GFLOP/s can be
read as a ratio to it. The machine is shared: run this when it is quiet, and compare only
figures from the same invocation. With --repetitions 1 each side reports its one measurement.

PyTorch built with BLAS_INFO=generic (Debian's python3-torch) calls whichever libblas.so.3 the
system provides; when that is the reference netlib BLAS (a few GFLOP/s), PyTorch's times say
nothing about PyTorch, and the script refuses to run unless --allow-reference-blas is given (then
every table is marked). Install an optimised BLAS (e.g. libopenblas0) or put one first with
LD_LIBRARY_PATH.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

SHAPES = [(512, 8, 128), (512, 8, 512), (512, 8, 2048), (768, 12, 512)]
# The attention core: 8 heads × 64 (d_model 512), as BM_attention_core_algo's tiled rows.
CORE_LENGTHS = [512, 2048, 8192]
CORE_HEADS, CORE_HEAD_DIM = 8, 64
DTYPES = ["float32", "bfloat16"]


def core_flops(length, d_model, causal):
    """bench/flops.hpp attention_core_flops with batch 1."""
    return 2.0 * d_model * length * (length + 1.0) if causal else 4.0 * length * length * d_model


def forward_flops(length, d_model, causal):
    """bench/flops.hpp forward_flops with batch 1."""
    return 8.0 * length * d_model * d_model + core_flops(length, d_model, causal)


def median_ms(call, repetitions, min_seconds=0.2):
    """Median over repetitions of the per-call time of a loop long enough for min_seconds."""
    # Warm-up: at least 3 calls and 0.3 s (PyTorch's first calls build oneDNN primitives and
    # fill caches; a single warm-up call left some bfloat16 paths many times slower).
    start, warm = time.perf_counter(), 0
    while warm < 3 or time.perf_counter() - start < 0.3:
        call()
        warm += 1
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= 1 << 20:
            break
        calls = max(calls * 2, int(calls * min_seconds / max(elapsed, 1e-9)) + 1)
    per_call = []
    for _ in range(repetitions):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call) * 1e3


def time_torch_layer(torch, d_model, heads, length, causal, dtype, repetitions):
    layer = torch.nn.MultiheadAttention(d_model, heads, batch_first=True).eval().to(dtype)
    x = torch.randn(1, length, d_model).to(dtype)
    kwargs = {"need_weights": False}
    if causal:
        kwargs["attn_mask"] = torch.triu(torch.full((length, length), float("-inf")),
                                         diagonal=1).to(dtype)
        if "is_causal" in layer.forward.__code__.co_varnames:
            kwargs["is_causal"] = True
    with torch.inference_mode():
        return median_ms(lambda: layer(x, x, x, **kwargs), repetitions)


def time_torch_core(torch, length, causal, dtype, repetitions):
    sdpa = getattr(torch.nn.functional, "scaled_dot_product_attention", None)
    if sdpa is None:
        return None  # PyTorch before 2.0
    q, k, v = (torch.randn(1, CORE_HEADS, length, CORE_HEAD_DIM).to(dtype) for _ in range(3))
    with torch.inference_mode():
        return median_ms(lambda: sdpa(q, k, v, is_causal=bool(causal)), repetitions)


def reference_blas(torch, loaded):
    """Why PyTorch's BLAS looks like the reference netlib one, or None when it does not."""
    config = torch.__config__.show()
    blas_info = next((item.split("=", 1)[1] for item in config.replace(",", " ").split()
                      if item.startswith("BLAS_INFO=")), "?")
    if blas_info != "generic":
        return None  # MKL, OpenBLAS, ... linked in at build time
    optimised = [path for path in loaded
                 if any(n in os.path.basename(path) for n in ("openblas", "mkl", "blis"))]
    if optimised:
        return None
    netlib = [path for path in loaded if "/blas/libblas.so" in path]
    return (f"torch.__config__.show() says BLAS_INFO=generic and the libblas loaded is "
            f"{', '.join(netlib) or ', '.join(loaded) or 'unknown'} (no OpenBLAS, MKL or BLIS)")


def torch_side(threads, repetitions):
    """Every PyTorch figure, as a JSON-able dict (run here or in --torch-root)."""
    # PyTorch's GEMMs go to whatever BLAS it loaded (Debian's build: the libblas.so.3
    # alternative, which may be the reference netlib BLAS at a few GFLOP/s). Its own threads must
    # follow --threads as well.
    for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    try:
        import torch
    except ImportError:
        sys.exit(f"{sys.executable} has no torch: run this with /usr/bin/python3 (Debian "
                 "python3-torch), or pass --torch-root")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.zeros(2, 2) @ torch.zeros(2, 2)  # load the BLAS before looking for it
    with open("/proc/self/maps") as maps:
        blas = sorted({line.split()[-1] for line in maps
                       if any(n in line for n in ("blas", "mkl", "blis"))})
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    result = {"version": torch.__version__, "threads": torch.get_num_threads(), "blas": blas,
              "cpu_capability": capability() if capability else "?",
              "slow_blas": reference_blas(torch, blas), "layer": {}, "core": {}}
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for d_model, heads, length in SHAPES:
            for causal in (0, 1):
                result["layer"][f"{d_model}/{heads}/{length}/{causal}/{dtype_name}"] = \
                    time_torch_layer(torch, d_model, heads, length, causal, dtype, repetitions)
        for length in CORE_LENGTHS:
            for causal in (0, 1):
                result["core"][f"{length}/{causal}/{dtype_name}"] = \
                    time_torch_core(torch, length, causal, dtype, repetitions)
    return result


def run_library(binary, threads, repetitions):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [
        binary,
        "--benchmark_filter=^(BM_gemm_roofline|BM_fma_peak|BM_bf16_peak|BM_mha_forward|"
        "BM_mha_forward_into|BM_mha_forward_into_bf16|BM_attention_core_algo|"
        "BM_attention_core_bf16)(/|$)",
        "--benchmark_format=json",
        f"--benchmark_repetitions={repetitions}",
        "--benchmark_report_aggregates_only=true",
    ]
    result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    report = json.loads(result.stdout)
    medians = {}
    for b in report["benchmarks"]:
        # One repetition has no aggregates: its single run is the median.
        if repetitions > 1 and b.get("aggregate_name") != "median":
            continue
        if repetitions == 1 and b.get("run_type", "iteration") != "iteration":
            continue
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        name = b["run_name"].removesuffix("/real_time")
        medians[name] = (b["real_time"] * scale, b.get("GFLOP/s"))
    return report["context"], medians


def torch_in_root(root, threads, repetitions):
    """Runs torch_side in the Debian root `root` (chroot) and returns its dict."""
    if os.geteuid() != 0:
        sys.exit("compare_pytorch: --torch-root needs root (chroot)")
    if not os.access(os.path.join(root, "usr/bin/python3"), os.X_OK):
        sys.exit(f"compare_pytorch: no {root}/usr/bin/python3: make the root with debootstrap "
                 "and install python3-torch in it (see --help)")
    for needed in ("proc/cpuinfo", "sys/devices/system/cpu"):
        if not os.path.exists(os.path.join(root, needed)):
            sys.exit(f"compare_pytorch: no {root}/{needed}: mount -t proc proc {root}/proc; "
                     f"mount -t sysfs sys {root}/sys (PyTorch reads the CPU's features there)")
    inside = "/tmp/mha_compare_pytorch.py"
    shutil.copyfile(os.path.abspath(__file__), os.path.join(root, inside.lstrip("/")))
    command = ["chroot", root, "/usr/bin/python3", inside, "--torch-only",
               f"--threads={threads}", f"--repetitions={repetitions}"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def fmt(value, spec):
    """value formatted by spec, or "n/a" at the same width."""
    if value is None:
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return format("n/a", ">" + width) if width else "n/a"
    return format(value, spec)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_binary = os.path.join(here, "..", "build", "release", "bench", "bench_attention")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.path.normpath(default_binary),
                        help="bench_attention binary (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads and OMP_NUM_THREADS (default: 1)")
    parser.add_argument("--repetitions", type=int, default=5,
                        help="repetitions on each side; medians are compared (default: 5)")
    parser.add_argument("--allow-reference-blas", action="store_true",
                        help="run even when PyTorch uses the reference netlib BLAS (its times "
                             "are then marked as meaningless)")
    parser.add_argument("--torch-root", metavar="DIR",
                        help="run PyTorch in the Debian root DIR (chroot; see above)")
    parser.add_argument("--torch-only", action="store_true",
                        help="run only the PyTorch side and print its figures as JSON")
    parser.add_argument("--torch-results", metavar="FILE",
                        help="read the PyTorch side from FILE (written by --torch-only)")
    args = parser.parse_args()
    if args.repetitions < 1:
        parser.error(f"--repetitions must be >= 1, got {args.repetitions}")
    if args.torch_only:  # the PyTorch half, as JSON on stdout (used by --torch-root)
        json.dump(torch_side(args.threads, args.repetitions), sys.stdout)
        return
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"no bench_attention at {args.binary}: build it (cmake --preset release && "
                 "cmake --build --preset release --target bench_attention) or pass --binary")

    # PyTorch first, then the library: one after the other, never at the same time.
    if args.torch_results:
        with open(args.torch_results) as saved:
            torch = json.load(saved)
    elif args.torch_root:
        torch = torch_in_root(args.torch_root, args.threads, args.repetitions)
    else:
        torch = torch_side(args.threads, args.repetitions)
    warning = ""
    if torch["slow_blas"]:
        warning = ("WARNING: PyTorch runs on the reference BLAS; its times here are not "
                   "PyTorch's speed: " + torch["slow_blas"])
        if not args.allow_reference_blas:
            sys.exit(f"compare_pytorch: refusing to compare: {torch['slow_blas']}. Install an "
                     "optimised BLAS (e.g. libopenblas0, or put one first with "
                     "LD_LIBRARY_PATH), or pass --allow-reference-blas to run anyway")
        print(warning, file=sys.stderr)
    context, medians = run_library(args.binary, args.threads, args.repetitions)
    roofline_ms, roofline_gflops = medians["BM_gemm_roofline/n:1024"]
    fma_gflops = medians.get("BM_fma_peak", (None, None))[1]
    bf16_gflops = medians.get("BM_bf16_peak", (None, None))[1]

    where = f" in {args.torch_root}" if args.torch_root else ""
    print(f"torch {torch['version']}{where} ({torch['threads']} threads) vs "
          f"{os.path.relpath(args.binary)} (OMP_NUM_THREADS={args.threads}); "
          + (f"medians of {args.repetitions} repetitions" if args.repetitions > 1
             else "one repetition, no median"))
    print(f"torch BLAS libraries loaded: {', '.join(torch['blas']) or 'none found'}; "
          f"torch CPU capability: {torch.get('cpu_capability', '?')}")
    if warning:
        print(warning)
    print(f"library built with {context.get('compiler', '?')}, Eigen SIMD "
          f"{context.get('eigen_simd', '?')}; host {context.get('host_name', '?')}, "
          f"{context.get('num_cpus', '?')} CPUs at {context.get('mhz_per_cpu', '?')} MHz")
    print(f"same run: BM_gemm_roofline/n:1024 {roofline_gflops:.1f} GFLOP/s, BM_fma_peak "
          f"{fmt(fma_gflops, '.1f')} GFLOP/s, BM_bf16_peak {fmt(bf16_gflops, '.1f')} GFLOP/s")

    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "_bf16"
        print()
        print(f"The layer, {dtype}: nn.MultiheadAttention against forward and forward_into")
        header = (f"{'shape (d_model/heads, L)':<26} {'causal':>6} {'torch ms':>10} "
                  f"{'mha ms':>10} {'speed-up':>9} {'into ms':>9} {'speed-up':>9} "
                  f"{'torch GF/s':>11} {'into GF/s':>10} {'into/roofline':>14}")
        print(header)
        print("-" * len(header))
        for d_model, heads, length in SHAPES:
            for causal in (0, 1):
                row = f"d_model:{d_model}/heads:{heads}/L:{length}/causal:{causal}"
                t_ms = torch["layer"].get(f"{d_model}/{heads}/{length}/{causal}/{dtype}")
                mha_ms = medians.get(f"BM_mha_forward{suffix}/{row}", (None, None))[0]
                into_ms, into_gf = medians.get(f"BM_mha_forward_into{suffix}/{row}",
                                               (None, None))
                torch_gf = (forward_flops(length, d_model, causal) / (t_ms * 1e-3) / 1e9
                            if t_ms else None)
                print(f"{f'{d_model}/{heads}, L={length}':<26} {('yes' if causal else 'no'):>6} "
                      f"{fmt(t_ms, '>10.3f')} {fmt(mha_ms, '>10.3f')} "
                      f"{fmt(t_ms / mha_ms if t_ms and mha_ms else None, '>8.2f')}x "
                      f"{fmt(into_ms, '>9.3f')} "
                      f"{fmt(t_ms / into_ms if t_ms and into_ms else None, '>8.2f')}x "
                      f"{fmt(torch_gf, '>11.1f')} {fmt(into_gf, '>10.1f')} "
                      f"{fmt(into_gf / roofline_gflops if into_gf else None, '>14.2f')}")
        probe, probe_name = (fma_gflops, "fma") if dtype == "float32" else (bf16_gflops, "bf16")
        print()
        print(f"The attention core, {dtype}, {CORE_HEADS} heads × {CORE_HEAD_DIM}: "
              f"scaled_dot_product_attention against the tiled kernel")
        header = (f"{'L':>6} {'causal':>6} {'torch ms':>10} {'mha ms':>10} {'speed-up':>9} "
                  f"{'torch GF/s':>11} {'mha GF/s':>10} {'torch/probe':>12} {'mha/probe':>10}")
        print(header)
        print("-" * len(header))
        d_model = CORE_HEADS * CORE_HEAD_DIM
        for length in CORE_LENGTHS:
            for causal in (0, 1):
                t_ms = torch["core"].get(f"{length}/{causal}/{dtype}")
                name = (f"BM_attention_core_algo/d_model:{d_model}/heads:{CORE_HEADS}/L:{length}"
                        f"/causal:{causal}/tiled:1" if dtype == "float32" else
                        f"BM_attention_core_bf16/d_model:{d_model}/heads:{CORE_HEADS}/L:{length}"
                        f"/causal:{causal}")
                m_ms = medians.get(name, (None, None))[0]
                flops = core_flops(length, d_model, causal)
                t_gf = flops / (t_ms * 1e-3) / 1e9 if t_ms else None
                m_gf = flops / (m_ms * 1e-3) / 1e9 if m_ms else None
                print(f"{length:>6} {('yes' if causal else 'no'):>6} {fmt(t_ms, '>10.3f')} "
                      f"{fmt(m_ms, '>10.3f')} "
                      f"{fmt(t_ms / m_ms if t_ms and m_ms else None, '>8.2f')}x "
                      f"{fmt(t_gf, '>11.1f')} {fmt(m_gf, '>10.1f')} "
                      f"{fmt(t_gf / probe if t_gf and probe else None, '>12.2f')} "
                      f"{fmt(m_gf / probe if m_gf and probe else None, '>10.2f')}")
        print(f"(probe: BM_{probe_name}_peak of the same run)")
    print()
    print("speed-up = torch ms / mha ms (> 1: this library is faster); n/a: not measured (no "
          "such row in the binary, or no scaled_dot_product_attention before PyTorch 2.0). "
          "GFLOP/s use the same count for both (bench/flops.hpp: projections + core, the causal "
          "core counted at half), so work PyTorch does on masked scores is not counted.")
    if warning:
        print()
        print(warning)


if __name__ == "__main__":
    main()
