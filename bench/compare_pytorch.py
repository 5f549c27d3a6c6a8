#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Side-by-side forward times: torch.nn.MultiheadAttention against this library's BM_mha_forward.

The library is timed twice: `forward` (allocating its result and buffers on every call, as
PyTorch does) and `forward_into` with a workspace kept across calls (BM_mha_forward_into).

    /usr/bin/python3 bench/compare_pytorch.py [--binary build/release/bench/bench_attention]
                                              [--threads 1] [--repetitions 5]
                                              [--allow-reference-blas]

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
import statistics
import subprocess
import sys
import time

SHAPES = [(512, 8, 128), (512, 8, 512), (512, 8, 2048), (768, 12, 512)]


def forward_flops(length, d_model, causal):
    """bench/flops.hpp forward_flops with batch 1."""
    core = 2.0 * d_model * length * (length + 1.0) if causal else 4.0 * length * length * d_model
    return 8.0 * length * d_model * d_model + core


def time_torch(torch, d_model, heads, length, causal, repetitions, min_seconds=0.2):
    layer = torch.nn.MultiheadAttention(d_model, heads, batch_first=True).eval()
    x = torch.randn(1, length, d_model)
    kwargs = {"need_weights": False}
    if causal:
        kwargs["attn_mask"] = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        if "is_causal" in layer.forward.__code__.co_varnames:
            kwargs["is_causal"] = True
    with torch.inference_mode():
        layer(x, x, x, **kwargs)  # warm-up
        # Calls per repetition: enough for min_seconds.
        calls, elapsed = 1, 0.0
        while True:
            start = time.perf_counter()
            for _ in range(calls):
                layer(x, x, x, **kwargs)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds or calls >= 1 << 20:
                break
            calls = max(calls * 2, int(calls * min_seconds / max(elapsed, 1e-9)) + 1)
        per_call = []
        for _ in range(repetitions):
            start = time.perf_counter()
            for _ in range(calls):
                layer(x, x, x, **kwargs)
            per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call) * 1e3


def run_library(binary, threads, repetitions):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [
        binary,
        "--benchmark_filter=^(BM_gemm_roofline|BM_mha_forward|BM_mha_forward_into)/",
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
        medians[b["run_name"]] = (b["real_time"] * scale, b.get("GFLOP/s"))
    return report["context"], medians


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
    args = parser.parse_args()
    if args.repetitions < 1:
        parser.error(f"--repetitions must be >= 1, got {args.repetitions}")

    # PyTorch's GEMMs go to whatever BLAS it loaded (Debian's build: the libblas.so.3
    # alternative, which may be the reference netlib BLAS at a few GFLOP/s; an OpenBLAS can be put
    # first with LD_LIBRARY_PATH). Its own threads must follow --threads as well.
    for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(variable, str(args.threads))
    try:
        import torch
    except ImportError:
        sys.exit(f"{sys.executable} has no torch: run this with /usr/bin/python3 (Debian "
                 "python3-torch)")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"no bench_attention at {args.binary}: build it (cmake --preset release && "
                 "cmake --build --preset release --target bench_attention) or pass --binary")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    torch.zeros(2, 2) @ torch.zeros(2, 2)  # load the BLAS before looking for it
    with open("/proc/self/maps") as maps:
        blas = sorted({line.split()[-1] for line in maps
                       if any(n in line for n in ("blas", "mkl", "blis"))})
    slow_blas = reference_blas(torch, blas)
    warning = ""
    if slow_blas:
        warning = ("WARNING: PyTorch runs on the reference BLAS; its times here are not "
                   "PyTorch's speed: " + slow_blas)
        if not args.allow_reference_blas:
            sys.exit(f"compare_pytorch: refusing to compare: {slow_blas}. Install an optimised "
                     "BLAS (e.g. libopenblas0, or put one first with LD_LIBRARY_PATH), or pass "
                     "--allow-reference-blas to run anyway")
        print(warning, file=sys.stderr)
    torch_ms = {}
    for d_model, heads, length in SHAPES:
        for causal in (0, 1):
            torch_ms[(d_model, heads, length, causal)] = time_torch(
                torch, d_model, heads, length, causal, args.repetitions)

    context, medians = run_library(args.binary, args.threads, args.repetitions)
    roofline_ms, roofline_gflops = medians["BM_gemm_roofline/n:1024/real_time"]

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads) vs "
          f"{os.path.relpath(args.binary)} (OMP_NUM_THREADS={args.threads}); "
          + (f"medians of {args.repetitions} repetitions" if args.repetitions > 1
             else "one repetition, no median"))
    print(f"torch BLAS libraries loaded: {', '.join(blas) or 'none found'}")
    if warning:
        print(warning)
    print(f"library built with {context.get('compiler', '?')}, Eigen SIMD "
          f"{context.get('eigen_simd', '?')}; host {context.get('host_name', '?')}, "
          f"{context.get('num_cpus', '?')} CPUs at {context.get('mhz_per_cpu', '?')} MHz")
    print(f"BM_gemm_roofline/n:1024 (same run): {roofline_ms:.2f} ms, "
          f"{roofline_gflops:.1f} GFLOP/s")
    print()
    header = (f"{'shape (d_model/heads, L)':<26} {'causal':>6} {'torch ms':>10} {'mha ms':>10} "
              f"{'speed-up':>9} {'into ms':>9} {'speed-up':>9} {'torch GF/s':>11} "
              f"{'into GF/s':>10} {'into/roofline':>14}")
    print(header)
    print("-" * len(header))
    for d_model, heads, length in SHAPES:
        for causal in (0, 1):
            name = (f"BM_mha_forward/d_model:{d_model}/heads:{heads}/L:{length}/causal:{causal}"
                    "/real_time")
            mha_ms, _ = medians[name]
            into_ms, into_gflops = medians[name.replace("BM_mha_forward/", "BM_mha_forward_into/")]
            t_ms = torch_ms[(d_model, heads, length, causal)]
            torch_gflops = forward_flops(length, d_model, causal) / (t_ms * 1e-3) / 1e9
            print(f"{f'{d_model}/{heads}, L={length}':<26} {('yes' if causal else 'no'):>6} "
                  f"{t_ms:>10.3f} {mha_ms:>10.3f} {t_ms / mha_ms:>8.2f}x "
                  f"{into_ms:>9.3f} {t_ms / into_ms:>8.2f}x {torch_gflops:>11.1f} "
                  f"{into_gflops:>10.1f} {into_gflops / roofline_gflops:>14.2f}")
    print()
    print("speed-up = torch ms / mha ms (> 1: this library is faster). GFLOP/s use the same count "
          "for both (bench/flops.hpp: projections + core, the causal core counted at half), so "
          "PyTorch's full-then-masked causal work reads as half of what it did.")
    if warning:
        print()
        print(warning)


if __name__ == "__main__":
    main()
