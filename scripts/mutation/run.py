#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Runs the mutation suite (mutants.py): plants each mutant in a clean copy of the committed
tree, builds the tests that should kill it, runs them, and prints the score and the survivors.

  scripts/mutation/run.py                  every mutant
  scripts/mutation/run.py ID [ID ...]      only these mutants (IDs or patterns such as 'bw-*')
  scripts/mutation/run.py --file HEADER    only the mutants of this header (repeatable)
  scripts/mutation/run.py --list           the mutants and the tests each one runs
  scripts/mutation/run.py --check          only check that every mutant applies (no build)

A mutant is killed when its tests fail or do not build. The copy is `git archive HEAD`, so
uncommitted changes are not mutated; it is kept in --work (default /tmp/mha-mutation) and its
build directory is reused by later runs. Builds and tests run under `nice -n 15`, -j2 unless
--jobs says otherwise. A mutant whose `find` no longer occurs exactly once in the committed
header (the code moved or changed) is reported as "does not apply", is not run nor scored, and
makes the run fail; the others still run.
"""

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from mutants import MUTANTS  # noqa: E402

# The tests that should kill a mutant of each header, by ctest name, when the mutant names none.
DEFAULT_TESTS = {
    "core.hpp": ["core", "multi_head_attention"],
    "detail/check.hpp": ["core", "multi_head_attention"],
    "attention_config.hpp": ["targeted", "multi_head_attention"],
    "batch.hpp": ["batch", "multi_head_attention"],
    "mask.hpp": ["mask", "multi_head_attention"],
    "detail/mask_view.hpp": ["mask", "tiled_attention", "kv_cache", "grouped_heads"],
    "normalization.hpp": ["normalization", "attention"],
    "options.hpp": ["attention", "multi_head_attention"],
    "projection.hpp": ["projection", "heads", "multi_head_attention"],
    "rotary.hpp": ["rotary", "rotary_layer"],
    "kv_cache.hpp": ["kv_cache", "targeted"],
    "multi_head_attention.hpp": ["multi_head_attention", "targeted", "kv_cache", "rotary_layer",
                                 "grouped_heads"],
    "attention.hpp": ["attention", "multi_head_attention"],
    "detail/materialized.hpp": ["attention", "multi_head_attention"],
    "detail/head_problem.hpp": ["grouped_heads", "kv_cache", "targeted"],
    "detail/tiled/online_softmax.hpp": ["tiled_attention", "tiled_attention_avx512", "log_sum_exp",
                                        "targeted"],
    "detail/tiled/tile_scratch.hpp": ["tiled_attention", "tiled_attention_avx512", "log_sum_exp",
                                      "targeted"],
    "detail/tiled/block_softmax.hpp": ["tiled_attention", "tiled_attention_avx512", "log_sum_exp",
                                       "targeted"],
    "detail/tiled/forward.hpp": ["tiled_attention", "multi_head_attention", "targeted"],
    "detail/tiled/plan.hpp": ["tiled_attention", "log_sum_exp", "targeted", "kv_cache",
                              "bf16_attention"],
    "detail/tiled/exp_avx512.hpp": ["tiled_attention_avx512", "bf16_attention_native",
                                    "tiled_backward"],
    "detail/tiled/block_kernels.hpp": ["attention_block_kernels", "tiled_attention",
                                       "attention_block_kernels_scalar", "tiled_attention_avx512"],
    "detail/tiled/pack_queries.hpp": ["attention_block_kernels", "tiled_attention",
                                      "tiled_attention_avx512"],
    "detail/tiled/backward.hpp": ["tiled_backward", "attention_backward"],
    "detail/gemm.hpp": ["targeted", "allocation_free"],
    "detail/parallel.hpp": ["targeted", "tiled_attention"],
    "io/safetensors/file.hpp": ["safetensors", "single_defect", "pytorch_golden"],
    "io/safetensors/pytorch.hpp": ["safetensors", "single_defect", "pytorch_golden"],
    "mha.hpp": ["core", "safetensors", "two_translation_units"],
    "score_modifiers.hpp": ["score_modifiers"],
    "detail/score_terms.hpp": ["score_modifiers"],
    "attention_states.hpp": ["attention_states"],
    "detail/state_merge.hpp": ["attention_states", "log_sum_exp"],
    "attention_backward.hpp": ["attention_backward", "layer_backward"],
    "detail/materialized_backward.hpp": ["attention_backward", "layer_backward"],
    "layer_backward.hpp": ["layer_backward"],
    "plot.hpp": ["plot"],
    "detail/layer_parameters.hpp": ["multi_head_attention", "layer_backward", "pytorch_golden"],
    "detail/gemm_bf16.hpp": ["bf16_projection", "bf16_projection_native"],
    "detail/gemm_bf16_portable.hpp": ["bf16_projection"],
    "io/half_precision.hpp": ["half_precision", "safetensors_bf16"],
    "detail/call_checks.hpp": ["attention", "hostile_input", "attention_backward"],
    "attention_bf16.hpp": ["bf16_attention", "bf16_attention_native"],
    "multi_head_attention_bf16.hpp": ["bf16_layer", "bf16_layer_native", "allocation_free"],
    "detail/decode_step.hpp": ["kv_cache", "bf16_layer"],
    "detail/tiled/forward_bf16.hpp": ["bf16_attention", "bf16_layer"],
    "detail/tiled/online_softmax_bf16.hpp": ["bf16_attention", "bf16_layer"],
    "detail/tiled/plan_bf16.hpp": ["bf16_attention", "bf16_layer"],
    "detail/tiled/probabilities_bf16.hpp": ["bf16_attention_native"],
    "detail/gemm_bf16_amx.hpp": ["bf16_projection_native"],
    "detail/gemm_bf16_packing.hpp": ["bf16_projection", "bf16_projection_native"],
    "detail/tiled/block_kernels_amx.hpp": ["bf16_attention_native"],
    "detail/tiled/bf16_problem.hpp": ["bf16_attention", "bf16_layer"],
    "detail/tiled/forward_bf16_amx.hpp": ["bf16_attention_native"],
}

# ctest name -> build target, where they differ.
TARGETS = {"two_translation_units": "test_two_units", "compile_fail.long_double": None}


def tests_of(m):
    return m.get("tests") or DEFAULT_TESTS[m["file"]]


def target_of(test):
    return TARGETS.get(test, "test_" + test)


def run(cmd, cwd, log, timeout=None):
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        try:
            return subprocess.run(["nice", "-n", "15"] + cmd, cwd=cwd, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            out.write("timed out\n")
            return 124


def head_commit():
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE,
                          check=True, text=True).stdout.strip()


def committed_header(head, name):
    """The header include/mha/<name> as committed in `head`, or None when it is not there."""
    r = subprocess.run(["git", "show", "%s:include/mha/%s" % (head, name)], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return r.stdout if r.returncode == 0 else None


def not_applying(mutants, head):
    """{id: reason} for the mutants whose `find` does not occur exactly once in the header as
    committed in `head` (what the runner mutates), e.g. because the code moved."""
    bad = {}
    for m in mutants:
        text = committed_header(head, m["file"])
        if text is None:
            bad[m["id"]] = "include/mha/%s is not in the commit" % m["file"]
            continue
        n = text.decode("utf-8").count(m["find"])
        if n != 1:
            bad[m["id"]] = "its 'find' text occurs %d times in include/mha/%s (must be once)" % (
                n, m["file"])
    return bad


def prepare(work, build_type, head):
    src = os.path.join(work, "src")
    stamp = os.path.join(work, "commit")
    same = os.path.isfile(stamp) and open(stamp).read() == head
    if same:
        # A run stopped without restoring its mutant leaves a changed header behind.
        for name in sorted({m["file"] for m in MUTANTS}):
            committed = committed_header(head, name)
            path = os.path.join(src, "include", "mha", name)
            if committed is None or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                same = same and f.read() == committed
    if not same:
        # A fresh copy of HEAD; an unchanged one is kept, so its build is reused as it is.
        if os.path.isdir(src):
            shutil.rmtree(src)
        os.makedirs(src)
        archive = subprocess.run(["git", "archive", head], cwd=ROOT, stdout=subprocess.PIPE,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        with open(stamp, "w") as f:
            f.write(head)
    build = os.path.join(work, "build")
    log = os.path.join(work, "configure.log")
    rc = run(["cmake", "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=" + build_type,
              "-DMHA_BUILD_EXAMPLES=OFF", "-DMHA_BUILD_BENCHMARKS=OFF", "-DMHA_INSTALL=OFF",
              "-DMHA_SAFETENSORS=ON"],
             work, log)
    if rc != 0:
        sys.exit("configure failed; see " + log)
    return src, build


def build_and_test(build, tests, log, timeout, jobs):
    targets = [t for t in (target_of(x) for x in tests) if t]
    if targets and run(["cmake", "--build", build, "-j%d" % jobs, "--target"] + targets, build,
                       log) != 0:
        return "build failed"
    for test in tests:
        rc = run(["ctest", "--test-dir", build, "-R", "^" + test.replace(".", "\\.") + "$",
                  "--no-tests=error", "--output-on-failure"], build, log, timeout)
        if rc != 0:
            return "failed: " + test
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--work", default="/tmp/mha-mutation")
    parser.add_argument("--build-type", default="Release")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per test")
    parser.add_argument("--jobs", type=int, default=2, help="parallel build jobs")
    parser.add_argument("--file", action="append", default=[],
                        help="only the mutants of this header (as in mutants.py, e.g. plot.hpp)")
    args = parser.parse_args()

    ids = [m["id"] for m in MUTANTS]
    if len(set(ids)) != len(ids):
        sys.exit("duplicate mutant ids")
    unknown = [p for p in args.ids if not fnmatch.filter(ids, p)]
    unknown += [f for f in args.file if f not in {m["file"] for m in MUTANTS}]
    if unknown:
        sys.exit("no mutant matches: " + ", ".join(unknown))
    chosen = [m for m in MUTANTS
              if (not args.ids or any(fnmatch.fnmatchcase(m["id"], p) for p in args.ids))
              and (not args.file or m["file"] in args.file)]

    if args.list:
        for m in chosen:
            eq = " (equivalent)" if m.get("equivalent") else ""
            print("%-30s %-32s %s%s\n    tests: %s" % (m["id"], m["file"], m["description"], eq,
                                                   " ".join(tests_of(m))))
        return 0

    head = head_commit()
    bad = not_applying(chosen, head)
    for m in chosen:
        if m["id"] in bad:
            print("DOES NOT APPLY: %s (%s): %s; update the mutant to the new code"
                  % (m["id"], m["file"], bad[m["id"]]), flush=True)
    applying = [m for m in chosen if m["id"] not in bad]
    if args.check:
        print("%d of %d mutants apply to %s" % (len(applying), len(chosen), head[:12]))
        return 1 if bad else 0

    os.makedirs(args.work, exist_ok=True)
    src, build = prepare(args.work, args.build_type, head)
    log = os.path.join(args.work, "baseline.log")
    open(log, "w").close()
    baseline_tests = sorted({t for m in applying for t in tests_of(m)})
    print("baseline: %s" % " ".join(baseline_tests), flush=True)
    failure = build_and_test(build, baseline_tests, log, args.timeout, args.jobs)
    if failure:
        sys.exit("the unmutated tree does not pass (%s); see %s" % (failure, log))

    killed, survived, equivalent = [], [], []
    for m in applying:
        path = os.path.join(src, "include", "mha", m["file"])
        with open(path) as f:
            original = f.read()
        log = os.path.join(args.work, m["id"] + ".log")
        open(log, "w").close()
        start = time.time()
        try:
            with open(path, "w") as f:
                f.write(original.replace(m["find"], m["replace"], 1))
            failure = build_and_test(build, tests_of(m), log, args.timeout, args.jobs)
        finally:
            with open(path, "w") as f:
                f.write(original)
        status = ("killed (%s)" % failure) if failure else "SURVIVED"
        print("%-32s %-40s %4.0f s" % (m["id"], status, time.time() - start), flush=True)
        if m.get("equivalent"):
            equivalent.append((m, failure))
        elif failure:
            killed.append(m)
        else:
            survived.append(m)

    scored = len(killed) + len(survived)
    print("\nscore: %d / %d non-equivalent mutants killed" % (len(killed), scored))
    for m in survived:
        print("  survived: %s (%s): %s" % (m["id"], m["file"], m["description"]))
    for m, failure in equivalent:
        note = "killed: %s, so not equivalent after all" % failure if failure else "survived"
        print("  equivalent: %s (%s; %s): %s" % (m["id"], m["file"], note, m["equivalent"]))
    for m in chosen:
        if m["id"] in bad:
            print("  does not apply (not run): %s (%s): %s" % (m["id"], m["file"], bad[m["id"]]))
    print("logs: %s" % args.work)
    return 1 if survived or bad else 0


if __name__ == "__main__":
    sys.exit(main())
