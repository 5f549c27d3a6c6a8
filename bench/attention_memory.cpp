// SPDX-License-Identifier: MIT
// Peak memory of one attention-core call beyond its inputs and output.
//
//   attention_memory L causal(0|1) algo(tiled|materialized) [heads=8] [head_dim=64] [backward]
//
// Allocates and fills Q, K, V (as row blocks of one fused (3·D) × L projection, like the layer
// and BM_attention_core) and the output, reads the peak resident set size (getrusage ru_maxrss),
// runs one multi_head_attention_core call, and reads it again. Peak RSS is monotone, so the
// difference is what the call needed at its worst moment on top of everything already touched:
// the kernel's buffers, OpenMP's thread stacks and pool, and allocator overhead. The tiled
// kernel's buffers are per thread and independent of L; the materialised one holds an Lk × Lq
// score matrix (one head at a time), so its figure grows as L².
//
// With `backward` as the sixth argument the call measured is the backward instead
// (multi_head_attention_core_backward, given the forward's output and log-sum-exp, which are
// computed before the first reading): its figure includes the gradients dQ, dK and dV it returns
// (3·D·L floats, printed apart). The tiled backward's own buffers are per thread plus one scalar
// per query and head and one dQ-sized accumulator (D·L floats); the materialised one holds
// 4 · L × L scalars per thread.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <Eigen/Core>

#include <mha/mha.hpp>

#include "flops.hpp"

#include <sys/resource.h>

namespace {

double peak_rss_mib() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux: ru_maxrss is in KiB
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr,
                     "usage: %s L causal(0|1) tiled|materialized [heads] [head_dim] [backward]\n",
                     argv[0]);
        return 2;
    }
    const mha::Index length = std::atol(argv[1]);
    const bool causal = std::atoi(argv[2]) != 0;
    const std::string algo = argv[3];
    const mha::Index heads = argc > 4 ? std::atol(argv[4]) : 8;
    const mha::Index head_dim = argc > 5 ? std::atol(argv[5]) : 64;
    const mha::Index d = heads * head_dim;
    const bool backward = argc > 6 && std::string(argv[6]) == "backward";

    mha::attention_options options;
    if (algo == "tiled")
        options.algorithm = mha::attention_algorithm::tiled;
    else if (algo == "materialized")
        options.algorithm = mha::attention_algorithm::materialized;
    else {
        std::fprintf(stderr, "algo must be tiled or materialized, not %s\n", algo.c_str());
        return 2;
    }

    using Matrix = mha::matrix<float>;
    const Matrix qkv = Matrix::Random(3 * d, length);
    Matrix out = Matrix::Zero(d, length);  // Zero, so that its pages are resident before
    const auto q = qkv.topRows(d);
    const auto k = qkv.middleRows(d, d);
    const auto v = qkv.bottomRows(d);
    const mha::packed_batch batch({length});
    const mha::attention_mask<float> mask =
        causal ? mha::attention_mask<float>(mha::causal{}) : mha::attention_mask<float>();

    double inputs_mib = 4.0 * static_cast<double>(qkv.size() + out.size()) / (1 << 20);
    double gradients_mib = 0;
    double before = 0, after = 0, seconds = 0, flops = 0;
    if (!backward) {
        before = peak_rss_mib();
        const auto t0 = std::chrono::steady_clock::now();
        mha::multi_head_attention_core(q, k, v, heads, batch, out, mask, options);
        const auto t1 = std::chrono::steady_clock::now();
        after = peak_rss_mib();
        seconds = std::chrono::duration<double>(t1 - t0).count();
        flops = mha_bench::attention_core_flops(1, length, d, causal);
    } else {
        // The forward's results, as a training step keeps them, then dO.
        mha::attention_options forward_options;
        forward_options.algorithm = mha::attention_algorithm::tiled;
        mha::attention_request request;
        request.log_sum_exp = true;
        const auto saved = mha::multi_head_attention_core(q, k, v, heads, batch, out, mask,
                                                          forward_options, request);
        const Matrix d_out = Matrix::Random(d, length);
        mha::attention_forward_results<float> forward;
        forward.output = &out;
        forward.log_sum_exp = &saved.log_sum_exp;
        inputs_mib +=
            4.0 * static_cast<double>(d_out.size() + saved.log_sum_exp.size()) / (1 << 20);
        gradients_mib = 4.0 * static_cast<double>(3 * d * length) / (1 << 20);
        before = peak_rss_mib();
        const auto t0 = std::chrono::steady_clock::now();
        const auto g = mha::multi_head_attention_core_backward(q, k, v, heads, heads, batch, d_out,
                                                               forward, mask, options);
        const auto t1 = std::chrono::steady_clock::now();
        after = peak_rss_mib();
        seconds = std::chrono::duration<double>(t1 - t0).count();
        flops = mha_bench::attention_backward_flops(1, length, d, causal);
        out(0, 0) = g.dq(0, 0);  // printed below, so the call is not optimised away
    }

    const char* threads = std::getenv("OMP_NUM_THREADS");
    std::printf(
        "L=%ld heads=%ld head_dim=%ld causal=%d algo=%s pass=%s OMP_NUM_THREADS=%s\n"
        "  inputs and outputs: %.1f MiB   peak RSS before: %.1f MiB   after: %.1f MiB   "
        "call added: %.1f MiB (of which returned gradients: %.1f MiB)\n"
        "  time %.2f s (%.1f GFLOP/s wall, one call, no warm-up)   out(0,0)=%g\n",
        static_cast<long>(length), static_cast<long>(heads), static_cast<long>(head_dim),
        causal ? 1 : 0, algo.c_str(), backward ? "backward" : "forward",
        threads ? threads : "(unset)", inputs_mib, before, after, after - before, gradients_mib,
        seconds, flops / seconds / 1e9, static_cast<double>(out(0, 0)));
    return 0;
}
