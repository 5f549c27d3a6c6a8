// SPDX-License-Identifier: MIT
// Peak memory of one attention-core call beyond its inputs and output.
//
//   attention_memory L causal(0|1) algo(tiled|materialized) [heads=8] [head_dim=64]
//
// Allocates and fills Q, K, V (as row blocks of one fused (3·D) × L projection, like the layer
// and BM_attention_core) and the output, reads the peak resident set size (getrusage ru_maxrss),
// runs one multi_head_attention_core call, and reads it again. Peak RSS is monotone, so the
// difference is what the call needed at its worst moment on top of everything already touched:
// the kernel's buffers, OpenMP's thread stacks and pool, and allocator overhead. The tiled
// kernel's buffers are per thread and independent of L; the materialised one holds an Lk × Lq
// score matrix (one head at a time), so its figure grows as L².
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
        std::fprintf(stderr, "usage: %s L causal(0|1) tiled|materialized [heads] [head_dim]\n",
                     argv[0]);
        return 2;
    }
    const mha::Index length = std::atol(argv[1]);
    const bool causal = std::atoi(argv[2]) != 0;
    const std::string algo = argv[3];
    const mha::Index heads = argc > 4 ? std::atol(argv[4]) : 8;
    const mha::Index head_dim = argc > 5 ? std::atol(argv[5]) : 64;
    const mha::Index d = heads * head_dim;

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

    const double inputs_mib = 4.0 * static_cast<double>(qkv.size() + out.size()) / (1 << 20);
    const double before = peak_rss_mib();
    const auto t0 = std::chrono::steady_clock::now();
    mha::multi_head_attention_core(q, k, v, heads, batch, out, mask, options);
    const auto t1 = std::chrono::steady_clock::now();
    const double after = peak_rss_mib();
    const double seconds = std::chrono::duration<double>(t1 - t0).count();
    const double flops = mha_bench::attention_core_flops(1, length, d, causal);

    const char* threads = std::getenv("OMP_NUM_THREADS");
    std::printf(
        "L=%ld heads=%ld head_dim=%ld causal=%d algo=%s OMP_NUM_THREADS=%s\n"
        "  Q,K,V,out: %.1f MiB   peak RSS before: %.1f MiB   after: %.1f MiB   "
        "call added: %.1f MiB\n"
        "  time %.2f s (%.1f GFLOP/s wall, one call, no warm-up)   out(0,0)=%g\n",
        static_cast<long>(length), static_cast<long>(heads), static_cast<long>(head_dim),
        causal ? 1 : 0, algo.c_str(), threads ? threads : "(unset)", inputs_mib, before, after,
        after - before, seconds, flops / seconds / 1e9, static_cast<double>(out(0, 0)));
    return 0;
}
