// SPDX-License-Identifier: MIT
// The cost of the score terms in the tiled kernel: the attention core at L = 2048, 8 heads × 64,
// plain, with ALiBi, with sinks, with soft-capping, with a score modifier that changes nothing,
// and with a modifier whose block predicate skips half of the key blocks (a key-prefix mask).
// Read each figure against `plain` of the same run.
//
//   OMP_NUM_THREADS=1 ./bench_score_modifiers --benchmark_repetitions=5
//   (add --benchmark_report_aggregates_only=true for the medians alone)
#include <limits>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <mha/mha.hpp>

namespace {

using mha::Index;
using Matrix = mha::matrix<float>;

enum variant : int { plain, alibi, sinks, softcap, identity, half_skip };

template <class Mod>
void run(benchmark::State& state, const mha::attention_options& options, const Mod& mod) {
    const Index d = 512, heads = 8, length = state.range(0);
    const Matrix qkv = Matrix::Random(3 * d, length);
    const auto q = qkv.topRows(d);
    const auto k = qkv.middleRows(d, d);
    const auto v = qkv.bottomRows(d);
    const mha::packed_batch batch({length});
    Matrix out(d, length);
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, heads, heads, batch, out, {}, options, {}, mod);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
}

void BM_score_terms(benchmark::State& state) {
    const Index length = state.range(0);
    const auto which = static_cast<variant>(state.range(1));
    mha::attention_options options;
    switch (which) {
        case alibi:
            options.alibi_slopes = mha::alibi_slopes(8);
            break;
        case sinks:
            options.sinks = std::vector<double>(8, 0.5);
            break;
        case softcap:
            options.softcap = 30.0;
            break;
        default:
            break;
    }
    if (which == identity) {
        run(state, options,
            mha::make_score_modifier([](Index, Index, Index, Index, float s) { return s; }));
    } else if (which == half_skip) {
        // Keys past the first half are excluded by the score function, and the predicate says
        // so for whole blocks, which are then skipped.
        const Index half = length / 2;
        run(state, options,
            mha::make_score_modifier(
                [half](Index, Index, Index, Index j, float s) {
                    return j < half ? s : -std::numeric_limits<float>::infinity();
                },
                [half](Index, Index, Index, Index, Index j0, Index) { return j0 < half; }));
    } else {
        run(state, options, mha::detail::no_score_modifier{});
    }
}

}  // namespace

BENCHMARK(BM_score_terms)
    ->ArgNames({"L", "variant"})
    ->ArgsProduct({{2048}, {plain, alibi, sinks, softcap, identity, half_skip}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
