// SPDX-License-Identifier: MIT
// Micro-benchmarks of the layer and its parts, each with a GFLOP/s counter (bench/flops.hpp).
//
// The machine a figure comes from matters more than the figure, so every run also times a plain
// Eigen GEMM (BM_gemm_roofline): read each GFLOP/s against that one from the same run, not
// against numbers from another day or another machine.
//
//   ./bench_attention --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <mha/mha.hpp>

#include "flops.hpp"

namespace {

using mha::Index;
using Matrix = mha::matrix<float>;
using Vector = mha::vector<float>;

// One table of shapes serves every family, so the projections, the attention core and the whole
// layer are measured on exactly the same problems and their times can be added up and compared.
// The projections read (d_model, L); the core and the layer also the heads, and run causal and not.
struct shape {
    Index d_model;
    Index heads;
    Index length;
};
constexpr shape kShapes[] = {
    {512, 8, 128},   // 8 heads × 64
    {512, 8, 512},   //
    {512, 8, 2048},  // long enough for the L² core to dominate
    {768, 12, 512},  // 12 heads × 64 (BERT-base / GPT-2 small width)
};
// One sequence per call. The FLOP formulas take the batch anyway, so that a batched entry would
// only need a change here and in the packed_batch below.
constexpr Index kBatch = 1;

// Google Benchmark divides a rate counter by the measured time (real time here, UseRealTime) and
// multiplies an iteration-invariant one by the iteration count: giving it GFLOP per iteration
// yields GFLOP/s.
void set_gflops(benchmark::State& state, double flops_per_iteration) {
    state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iteration / 1e9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

mha::attention_mask<float> mask_for(bool causal) {
    return causal ? mha::attention_mask<float>(mha::causal{}) : mha::attention_mask<float>();
}

mha::packed_batch batch_of(Index length) {
    return mha::packed_batch(std::vector<Index>(static_cast<std::size_t>(kBatch), length));
}

// FMA throughput of one thread, the hardware peak the GEMM roofline is read against.
//
// 16 independent chains of packet FMAs (16 floats each with AVX-512), in 16 named variables
// rather than an array: with an array GCC 12 swapped the two loops and kept the accumulators in
// memory (a load, two FMAs and a store per chain step, chained through store-to-load forwarding),
// which read as half the peak. Named scalars of packet type stay in registers (16 + 2 constants
// of the 32 zmm registers). Zen 5 has 2 FMA pipes with 4 cycles of latency, so 8 chains in
// flight suffice; 16 leave room. With 16 vector registers (AVX2, SSE) the probe runs 12 chains:
// 16 + 2 constants spilled three chains to the stack, and on a Zen 3 the probe read 56 GFLOP/s
// where the whole float layer (768/12, L = 512, its projections on the library's register
// tiles) reached 60. acc ← acc·a + b with a < 1 converges to
// b/(1 − a) = 0.1: no overflow and no denormals, and without -ffast-math the compiler may not
// fold the chain. Flops per benchmark iteration: kSteps × chains × 2 (multiply, add) × lanes.
using fma_packet = Eigen::internal::packet_traits<float>::type;
constexpr int kFmaLanes = Eigen::internal::packet_traits<float>::size;
constexpr int kProbeChains = 16;  // the number of chain lines in the bf16 probe loop below
constexpr int kFmaProbeChains = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 16 : 12;
constexpr long kProbeSteps = 1 << 18;

float fma_chains(long steps) {
    using Eigen::internal::pmadd;
    using Eigen::internal::pset1;
    using packet = fma_packet;
    const packet a = pset1<packet>(0.999999f);
    const packet b = pset1<packet>(1e-7f);
    packet c0 = pset1<packet>(0.f), c1 = pset1<packet>(1.f), c2 = pset1<packet>(2.f),
           c3 = pset1<packet>(3.f), c4 = pset1<packet>(4.f), c5 = pset1<packet>(5.f),
           c6 = pset1<packet>(6.f), c7 = pset1<packet>(7.f), c8 = pset1<packet>(8.f),
           c9 = pset1<packet>(9.f), c10 = pset1<packet>(10.f), c11 = pset1<packet>(11.f),
           c12 = pset1<packet>(12.f), c13 = pset1<packet>(13.f), c14 = pset1<packet>(14.f),
           c15 = pset1<packet>(15.f);
    for (long i = 0; i < steps; ++i) {
        c0 = pmadd(c0, a, b);
        c1 = pmadd(c1, a, b);
        c2 = pmadd(c2, a, b);
        c3 = pmadd(c3, a, b);
        c4 = pmadd(c4, a, b);
        c5 = pmadd(c5, a, b);
        c6 = pmadd(c6, a, b);
        c7 = pmadd(c7, a, b);
        c8 = pmadd(c8, a, b);
        c9 = pmadd(c9, a, b);
        c10 = pmadd(c10, a, b);
        c11 = pmadd(c11, a, b);
        if constexpr (kFmaProbeChains == 16) {
            c12 = pmadd(c12, a, b);
            c13 = pmadd(c13, a, b);
            c14 = pmadd(c14, a, b);
            c15 = pmadd(c15, a, b);
        }
    }
    // Only the result is escaped, once the loop is done; the sum is outside the timing-
    // relevant part (16 reductions against 2^22 FMAs).
    using Eigen::internal::padd;
    const packet s =
        padd(padd(padd(padd(c0, c1), padd(c2, c3)), padd(padd(c4, c5), padd(c6, c7))),
             padd(padd(padd(c8, c9), padd(c10, c11)), padd(padd(c12, c13), padd(c14, c15))));
    return Eigen::internal::predux(s);
}

constexpr double kFmaProbeFlops =
    2.0 * kFmaLanes * kFmaProbeChains * static_cast<double>(kProbeSteps);

void BM_fma_peak(benchmark::State& state) {
    for (auto _ : state) {
        float sum = fma_chains(kProbeSteps);
        benchmark::DoNotOptimize(sum);
    }
    set_gflops(state, kFmaProbeFlops);
    state.counters["lanes"] = kFmaLanes;
    state.counters["chains"] = kFmaProbeChains;
}

#if defined(MHA_BF16_NATIVE)
// The bf16 dot-product rate of one thread (vdpbf16ps), the peak the bf16 core is read against:
// the FMA probe's 16 named chains with _mm512_dpbf16_ps, each instruction 32 bf16 products
// into 16 fp32 lanes, counted as 2 FLOPs per product (64 per instruction), as the attention
// FLOP formulas count a multiply-add. acc ← acc + 2·(2^-7·1): the sums stay finite and normal
// (the instruction flushes subnormals anyway).
float bf16_chains(long steps) {
    using mha::detail::dot_pairs;
    const __m512i x = _mm512_set1_epi32(0x3f803f80);  // (1.0, 1.0) in bf16
    const __m512i y = _mm512_set1_epi32(0x3c003c00);  // (2^-7, 2^-7)
    __m512 c0 = _mm512_set1_ps(0.f), c1 = _mm512_set1_ps(1.f), c2 = _mm512_set1_ps(2.f),
           c3 = _mm512_set1_ps(3.f), c4 = _mm512_set1_ps(4.f), c5 = _mm512_set1_ps(5.f),
           c6 = _mm512_set1_ps(6.f), c7 = _mm512_set1_ps(7.f), c8 = _mm512_set1_ps(8.f),
           c9 = _mm512_set1_ps(9.f), c10 = _mm512_set1_ps(10.f), c11 = _mm512_set1_ps(11.f),
           c12 = _mm512_set1_ps(12.f), c13 = _mm512_set1_ps(13.f), c14 = _mm512_set1_ps(14.f),
           c15 = _mm512_set1_ps(15.f);
    for (long i = 0; i < steps; ++i) {
        c0 = dot_pairs(c0, x, y);
        c1 = dot_pairs(c1, x, y);
        c2 = dot_pairs(c2, x, y);
        c3 = dot_pairs(c3, x, y);
        c4 = dot_pairs(c4, x, y);
        c5 = dot_pairs(c5, x, y);
        c6 = dot_pairs(c6, x, y);
        c7 = dot_pairs(c7, x, y);
        c8 = dot_pairs(c8, x, y);
        c9 = dot_pairs(c9, x, y);
        c10 = dot_pairs(c10, x, y);
        c11 = dot_pairs(c11, x, y);
        c12 = dot_pairs(c12, x, y);
        c13 = dot_pairs(c13, x, y);
        c14 = dot_pairs(c14, x, y);
        c15 = dot_pairs(c15, x, y);
    }
    const __m512 s = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                      _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7))),
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
                      _mm512_add_ps(_mm512_add_ps(c12, c13), _mm512_add_ps(c14, c15))));
    return _mm512_reduce_add_ps(s);
}

constexpr double kBf16ProbeFlops = 2.0 * 32 * kProbeChains * static_cast<double>(kProbeSteps);

void BM_bf16_peak(benchmark::State& state) {
    for (auto _ : state) {
        float sum = bf16_chains(kProbeSteps);
        benchmark::DoNotOptimize(sum);
    }
    set_gflops(state, kBf16ProbeFlops);
}
#endif

// The probes' GFLOP/s in this process, measured once on first use (the best of 20 calls, about
// 0.1 s): the "of_probe" counters divide by them, so that each core figure is read as a fraction
// of the same run's peak of its precision.
template <class Fn>
double probe_gflops(Fn fn, double flops) {
    double best = 0;
    for (int r = 0; r < 20; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        float sum = fn(kProbeSteps);
        benchmark::DoNotOptimize(sum);
        const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
        best = std::max(best, flops / dt.count() / 1e9);
    }
    return best;
}

double fma_probe_gflops() {
    static const double g = probe_gflops(fma_chains, kFmaProbeFlops);
    return g;
}

// Sets "of_probe": the iteration's GFLOP/s over the probe's.
void set_fraction_of_probe(benchmark::State& state, double flops_per_iteration, double probe) {
    state.counters["of_probe"] = benchmark::Counter(flops_per_iteration / 1e9 / probe,
                                                    benchmark::Counter::kIsIterationInvariantRate);
}

// What the hardware and Eigen reach on a large square GEMM: the ceiling every other figure is
// read against, since the projections are GEMMs and the core is built from GEMMs.
void BM_gemm_roofline(benchmark::State& state) {
    const Index n = state.range(0);
    const Matrix a = Matrix::Random(n, n);
    const Matrix b = Matrix::Random(n, n);
    Matrix c(n, n);
    for (auto _ : state) {
        c.noalias() = a * b;
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::gemm_flops(n, n, n));
}

// The layer's two projections as the layer runs them: one fused Q/K/V GEMM with bias, then the
// output projection of the (contiguous) concatenated heads. `product(w, b, x, y)` computes
// y = w·x + b; the benchmark reads d_model and L from the state.
template <class Product>
void run_projections(benchmark::State& state, Product product) {
    const Index d = state.range(0);
    const Index n = kBatch * state.range(1);
    const Matrix w_qkv = Matrix::Random(3 * d, d);
    const Vector b_qkv = Vector::Random(3 * d);
    const Matrix w_o = Matrix::Random(d, d);
    const Vector b_o = Vector::Random(d);
    const Matrix x = Matrix::Random(d, n);
    const Matrix heads = Matrix::Random(d, n);
    Matrix qkv(3 * d, n);
    Matrix out(d, n);
    for (auto _ : state) {
        product(w_qkv, b_qkv, x, qkv);
        product(w_o, b_o, heads, out);
        benchmark::DoNotOptimize(qkv.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::projection_flops(kBatch, state.range(1), d));
    set_fraction_of_probe(state, mha_bench::projection_flops(kBatch, state.range(1), d),
                          fma_probe_gflops());
}

void BM_projections(benchmark::State& state) {
    run_projections(state, [](const Matrix& w, const Vector& b, const Matrix& x, Matrix& y) {
        mha::linear(w, b, x, y);
    });
}

// The same two products through Eigen's GEMM kernel with kept packing buffers, as `linear` ran
// them before it took the register tiles (detail/tiled_product.hpp): the reference its rows are
// read against in the same run.
void BM_projections_eigen_gemm(benchmark::State& state) {
    std::vector<mha::detail::gemm_buffers<float>> buffers;
    run_projections(state, [&](const Matrix& w, const Vector& b, const Matrix& x, Matrix& y) {
        mha::detail::product_into(y, w, x, 1.0f, &buffers);
        y.colwise() += b;
    });
}

// The attention core on Q, K and V viewed inside one fused projection result, as the layer
// passes them (row blocks of a (3·D) × L matrix: strided views, no copies), with a
// core_workspace kept between iterations as a caller of repeated calls keeps one (the layer
// keeps its own).
void BM_attention_core(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    const Matrix qkv = Matrix::Random(3 * d, kBatch * length);
    const auto q = qkv.topRows(d);
    const auto k = qkv.middleRows(d, d);
    const auto v = qkv.bottomRows(d);
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    Matrix out(d, kBatch * length);
    mha::core_workspace<float> workspace;
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, heads, heads, batch, out, mask, {}, {}, workspace);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::attention_core_flops(kBatch, length, d, causal));
    set_fraction_of_probe(state, mha_bench::attention_core_flops(kBatch, length, d, causal),
                          fma_probe_gflops());
}

// The three passes of one (query block, key block) step of the float core, each alone, on the
// default block (128 queries × 512 keys, d_k = d_v = 64, K and V contiguous as pack_keys_values
// leaves them): pass 0 the score tiles with each query's max (transposed_scores), 1 the exp and
// sum (exp_shifted_per_query), 2 the value tiles (accumulate_values). Gscores/s counts the
// block's scores for every pass, so the three rows add up as shares of a step; the products also
// report GFLOP/s and of_probe. Where the core stays short of the probe, these rows say which
// pass holds it back. The exp pass runs on its own output after the first iteration; it has no
// branch on the values, so its time is the same.
void BM_tiled_block_pass(benchmark::State& state) {
    namespace dt = mha::detail;
    const int pass = static_cast<int>(state.range(0));
    const Index nq = dt::tiled_query_block, nk = dt::tiled_key_block, d = 64;
    const Index nqp = dt::padded_queries<float>(nq);
    // qt's and Sᵀ's leading dimension, as the core's.
    const Index ld = dt::score_stride<float>(nqp);
    const Matrix qt = Matrix::Random(ld, d) * 0.125f;  // nqp × d_k (ld rows), packed scaled queries
    const Matrix k = Matrix::Random(d, nk);            // d_k × nk, one key per column
    const Matrix v = Matrix::Random(d, nk);            // d_v × nk
    Matrix st(ld, nk);                                 // nqp × nk (ld rows), Sᵀ then Pᵀ
    Matrix acc = Matrix::Zero(d, nq);                  // d_v × nq
    Vector mx(nqp), sum(nqp);
    dt::transposed_scores(qt.data(), ld, nqp, d, k.data(), d, nk, st.data(), ld, {}, mx.data());
    for (auto _ : state) {
        if (pass == 0)
            dt::transposed_scores(qt.data(), ld, nqp, d, k.data(), d, nk, st.data(), ld, {},
                                  mx.data());
        else if (pass == 1)
            dt::exp_shifted_per_query(st.data(), ld, nqp, nk, mx.data(), sum.data());
        else
            dt::accumulate_values(v.data(), d, d, nk, st.data(), ld, nq, acc.data(), d);
        benchmark::DoNotOptimize(st.data());
        benchmark::DoNotOptimize(acc.data());
        benchmark::ClobberMemory();
    }
    const double scores = static_cast<double>(nq * nk);
    state.counters["Gscores/s"] =
        benchmark::Counter(scores / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    if (pass != 1) {
        set_gflops(state, 2.0 * scores * static_cast<double>(d));
        set_fraction_of_probe(state, 2.0 * scores * static_cast<double>(d), fma_probe_gflops());
    }
}

// The backward of BM_attention_core's call (same views of one fused projection, same shapes),
// given the forward's output and log-sum-exp as a training step keeps them: softmax runs the
// tiled backward (include/mha/detail/tiled/backward.hpp). The gradients are allocated by each
// call, as the public function returns them.
void BM_attention_backward(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    const Matrix qkv = Matrix::Random(3 * d, kBatch * length);
    const auto q = qkv.topRows(d);
    const auto k = qkv.middleRows(d, d);
    const auto v = qkv.bottomRows(d);
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    Matrix out(d, kBatch * length);
    mha::attention_request request;
    request.log_sum_exp = true;
    const mha::attention_outputs<float> saved =
        mha::multi_head_attention_core(q, k, v, heads, batch, out, mask, {}, request);
    const Matrix d_out = Matrix::Random(d, kBatch * length);
    mha::attention_forward_results<float> forward;
    forward.output = &out;
    forward.log_sum_exp = &saved.log_sum_exp;
    for (auto _ : state) {
        const auto g = mha::multi_head_attention_core_backward(q, k, v, heads, heads, batch, d_out,
                                                               forward, mask);
        benchmark::DoNotOptimize(g.dq.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::attention_backward_flops(kBatch, length, d, causal));
}

// Double scores spread by about 1e4 (amplitude 1) against scores of order 1 (amplitude 0): most
// exp(s − max) of the first would be subnormal, which slowed the tiled kernel 30× when they
// reached its multiply-adds; the kernel flushes them to 0, so both should run at the same speed.
void BM_attention_core_large_logits(benchmark::State& state) {
    using Double = mha::matrix<double>;
    const Index length = state.range(0);
    const double amplitude = state.range(1) != 0 ? 60.0 : 1.0;
    const Index d = 64;
    const Double q = Double::Random(d, length) * amplitude;
    const Double k = Double::Random(d, length) * amplitude;
    const Double v = Double::Random(d, length);
    Double out(d, length);
    const mha::attention_mask<double> mask = mha::causal{};
    for (auto _ : state) {
        mha::scaled_dot_product_attention(q, k, v, out, mask);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::attention_core_flops(1, length, d, true));
}

// BM_attention_core with the kernel chosen (algo 0: materialized, 1: tiled), to compare the two
// on the same shapes in one run; L = 8192 runs tiled only (the materialised scores alone would be
// 256 MB per head).
void BM_attention_core_algo(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    mha::attention_options options;
    options.algorithm = state.range(4) != 0 ? mha::attention_algorithm::tiled
                                            : mha::attention_algorithm::materialized;
    const Matrix qkv = Matrix::Random(3 * d, kBatch * length);
    const auto q = qkv.topRows(d);
    const auto k = qkv.middleRows(d, d);
    const auto v = qkv.bottomRows(d);
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    Matrix out(d, kBatch * length);
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, heads, batch, out, mask, options);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::attention_core_flops(kBatch, length, d, causal));
    set_fraction_of_probe(state, mha_bench::attention_core_flops(kBatch, length, d, causal),
                          fma_probe_gflops());
}

#if defined(MHA_BF16_AMX)
// The AMX tile-product rate of one thread (TDPBF16PS), where the bf16 kernels run on AMX: four
// independent 16 × 16 accumulator tiles, each instruction 16·16·32 products of bf16 pairs
// (2 FLOPs each, 16384 per instruction) from two operand tiles loaded once.
float amx_chains(long steps) {
    alignas(64) static std::uint16_t ones[16 * 32], small[16 * 32];
    std::fill(std::begin(ones), std::end(ones), std::uint16_t(0x3f80));    // 1.0
    std::fill(std::begin(small), std::end(small), std::uint16_t(0x3c00));  // 2^-7
    alignas(64) float out[16 * 16];
    const mha::detail::amx_tile_scope tiles;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, small, 64);
    _tile_loadd(7, small, 64);
    for (long i = 0; i < steps / 64; ++i) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    return out[0];
}

constexpr double kAmxProbeFlops = 2.0 * 16 * 16 * 32 * 4 * static_cast<double>(kProbeSteps / 64);

void BM_amx_peak(benchmark::State& state) {
    if (!mha::detail::amx_usable()) {
        state.SkipWithError("AMX is compiled in but this CPU or OS does not allow it");
        return;
    }
    for (auto _ : state) {
        float sum = amx_chains(kProbeSteps);
        benchmark::DoNotOptimize(sum);
    }
    set_gflops(state, kAmxProbeFlops);
}
#endif

#if defined(MHA_BF16_NATIVE)
// The peak of the instruction the bf16 kernels run: the AMX probe where they run on AMX, else
// BM_bf16_peak's vdpbf16ps rate.
double bf16_probe_gflops() {
#if defined(MHA_BF16_AMX)
    if (mha::detail::amx_usable()) {
        static const double amx = probe_gflops(amx_chains, kAmxProbeFlops);
        return amx;
    }
#endif
    static const double g = probe_gflops(bf16_chains, kBf16ProbeFlops);
    return g;
}
#endif

// BM_attention_core on bfloat16 storage (Q, K, V as row blocks of one bf16 (3·D) × L matrix,
// fp32 output, a bf16_core_workspace kept between iterations), with the FLOPs of the fp32 core.
// Without it each call takes the memory of its packed K and V (16 MiB at L = 8192) anew; what
// that costs depends on whether the allocator keeps the memory between calls (a plain loop of
// calls on the Zen 5 machine: 1.4× the time at L = 2048; this benchmark's loop: no difference).
// "of_probe" is read against BM_amx_peak's rate where the kernel runs on AMX, BM_bf16_peak's where
// it runs on vdpbf16ps, else BM_fma_peak's.
void BM_attention_core_bf16(benchmark::State& state) {
    using Bf16Matrix = Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>;
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    const Bf16Matrix qkv = Matrix::Random(3 * d, kBatch * length).cast<Eigen::bfloat16>();
    const auto q = qkv.topRows(d);
    const auto k = qkv.middleRows(d, d);
    const auto v = qkv.bottomRows(d);
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    Matrix out(d, kBatch * length);
    mha::bf16_core_workspace workspace;
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, heads, heads, batch, out, mask, {}, {}, workspace);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    const double flops = mha_bench::attention_core_flops(kBatch, length, d, causal);
    set_gflops(state, flops);
#if defined(MHA_BF16_NATIVE)
    set_fraction_of_probe(state, flops, bf16_probe_gflops());
#else
    set_fraction_of_probe(state, flops, fma_probe_gflops());
#endif
}

// BM_projections on bfloat16 storage (mha::linear with a bf16_linear_workspace, kept between
// iterations as the layer would keep it): the fused Q/K/V projection rounded to bf16 (the input
// the bf16 core takes), then the output projection of bf16 heads into fp32, both with fp32
// biases. Same shapes and FLOPs as BM_projections; "of_probe" against BM_amx_peak's rate where
// the GEMM runs on AMX, BM_bf16_peak's where it runs on vdpbf16ps, else BM_fma_peak's.
void BM_projections_bf16(benchmark::State& state) {
    using Bf16Matrix = Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>;
    const Index d = state.range(0);
    const Index n = kBatch * state.range(1);
    const Bf16Matrix w_qkv = Matrix::Random(3 * d, d).cast<Eigen::bfloat16>();
    const Vector b_qkv = Vector::Random(3 * d);
    const Bf16Matrix w_o = Matrix::Random(d, d).cast<Eigen::bfloat16>();
    const Vector b_o = Vector::Random(d);
    const Bf16Matrix x = Matrix::Random(d, n).cast<Eigen::bfloat16>();
    const Bf16Matrix heads = Matrix::Random(d, n).cast<Eigen::bfloat16>();
    Bf16Matrix qkv(3 * d, n);
    Matrix out(d, n);
    mha::bf16_linear_workspace workspace;
    for (auto _ : state) {
        mha::linear(w_qkv, b_qkv, x, qkv, workspace);
        mha::linear(w_o, b_o, heads, out, workspace);
        benchmark::DoNotOptimize(qkv.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    const double flops = mha_bench::projection_flops(kBatch, state.range(1), d);
    set_gflops(state, flops);
#if defined(MHA_BF16_NATIVE)
    set_fraction_of_probe(state, flops, bf16_probe_gflops());
#else
    set_fraction_of_probe(state, flops, fma_probe_gflops());
#endif
}

// One decode step: a single query per sequence over L cached keys (8 heads × 64, no mask), on
// separate Q (D × 1), K and V (D × L) as a KV cache would hold them. 4·L·D flops against
// 2·L·D floats of K and V read once: memory-bound, so bytes/s (K and V) are reported too. The
// tiled kernel splits the keys of such a call into chunks so that both threads have work.
void BM_attention_decode(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const Matrix q = Matrix::Random(d, kBatch);
    const Matrix k = Matrix::Random(d, kBatch * length);
    const Matrix v = Matrix::Random(d, kBatch * length);
    const mha::packed_batch batch(std::vector<Index>(static_cast<std::size_t>(kBatch), 1),
                                  std::vector<Index>(static_cast<std::size_t>(kBatch), length));
    Matrix out(d, kBatch);
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, heads, batch, out);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::cross_attention_core_flops(kBatch, 1, length, d));
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * kBatch * length * d *
                            static_cast<int64_t>(sizeof(float)));
}

// The whole layer through its public forward, allocations included, as a user would call it.
void BM_mha_forward(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    mha::attention_config config;
    config.embed_dim = d;
    config.num_heads = heads;
    const mha::multi_head_attention<float> layer(config, /*seed=*/1);
    const Matrix x = Matrix::Random(d, kBatch * length);
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    for (auto _ : state) {
        Matrix y = layer.forward(x, batch, mask);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::forward_flops(kBatch, length, d, causal));
}

// The whole layer through forward_into with a workspace kept across calls: after the first
// call no buffer is allocated, so this is the layer's arithmetic without the allocator's cost
// (large buffers are mmap-ed and unmapped by glibc on every call of BM_mha_forward).
void BM_mha_forward_into(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    mha::attention_config config;
    config.embed_dim = d;
    config.num_heads = heads;
    const mha::multi_head_attention<float> layer(config, /*seed=*/1);
    const Matrix x = Matrix::Random(d, kBatch * length);
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    Matrix y(d, kBatch * length);
    mha::forward_workspace<float> workspace;
    for (auto _ : state) {
        layer.forward_into(x, batch, mask, y, workspace);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::forward_flops(kBatch, length, d, causal));
}

// The bfloat16 layer (multi_head_attention_bf16) with the fp32 layer's parameters, through
// forward_into with a kept workspace, beside BM_mha_forward_into: bf16 input, fp32 output. The
// FLOP count is the fp32 layer's, so the GFLOP/s of the two compare directly.
void BM_mha_forward_into_bf16(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    mha::attention_config config;
    config.embed_dim = d;
    config.num_heads = heads;
    const mha::multi_head_attention_bf16 layer(mha::multi_head_attention<float>(config, 1));
    const Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic> x =
        Matrix::Random(d, kBatch * length).cast<Eigen::bfloat16>();  // E × N
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    Matrix y(d, kBatch * length);  // E × N
    mha::bf16_forward_workspace workspace;
    for (auto _ : state) {
        layer.forward_into(x, batch, mask, y, workspace);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::forward_flops(kBatch, length, d, causal));
}

// The whole layer's backward as a training step runs it: the forward that keeps what the
// backward needs (layer.forward_for_backward) once, then layer.backward(saved, d_output) timed,
// gradients of the input and of every weight and bias allocated by each call. Read its time
// against BM_mha_forward's at the same shape (the layer_backward_flops comment gives the FLOP
// ratio: about 2× the projections' and 2.5× the core's).
void BM_mha_backward(benchmark::State& state) {
    const Index d = state.range(0);
    const Index heads = state.range(1);
    const Index length = state.range(2);
    const bool causal = state.range(3) != 0;
    mha::attention_config config;
    config.embed_dim = d;
    config.num_heads = heads;
    const mha::multi_head_attention<float> layer(config, /*seed=*/1);
    const Matrix x = Matrix::Random(d, kBatch * length);  // E × N
    const mha::packed_batch batch = batch_of(length);
    const mha::attention_mask<float> mask = mask_for(causal);
    const mha::layer_saved_state<float> saved = layer.forward_for_backward(x, batch, mask);
    const Matrix d_output = Matrix::Random(d, kBatch * length);  // E × N
    for (auto _ : state) {
        const mha::layer_gradients<float> g = layer.backward(saved, d_output);
        benchmark::DoNotOptimize(g.d_query.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::layer_backward_flops(kBatch, length, d, causal));
}

void projection_shapes(benchmark::internal::Benchmark* b) {
    b->ArgNames({"d_model", "L"});
    for (const shape& s : kShapes)
        b->Args({s.d_model, s.length});
}

void attention_shapes(benchmark::internal::Benchmark* b) {
    b->ArgNames({"d_model", "heads", "L", "causal"});
    for (const shape& s : kShapes)
        for (Index causal : {0, 1})
            b->Args({s.d_model, s.heads, s.length, causal});
}

void algo_shapes(benchmark::internal::Benchmark* b) {
    b->ArgNames({"d_model", "heads", "L", "causal", "tiled"});
    for (const shape& s : kShapes)
        for (Index causal : {0, 1})
            for (Index tiled : {0, 1})
                b->Args({s.d_model, s.heads, s.length, causal, tiled});
    for (Index causal : {0, 1})
        b->Args({512, 8, 8192, causal, 1});
}

// Milliseconds suit every shape here; real time, because a GFLOP/s figure is about wall-clock
// throughput and CPU time would hide time lost to the other processes on a shared machine.
BENCHMARK(BM_gemm_roofline)->ArgName("n")->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_projections)->Apply(projection_shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_projections_eigen_gemm)
    ->Apply(projection_shapes)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_projections_bf16)
    ->Apply(projection_shapes)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_attention_core)->Apply(attention_shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
// 8 heads × 64 at L = 512, 2048 and 8192, causal and not, next to BM_attention_core's shapes.
BENCHMARK(BM_attention_backward)
    ->ArgNames({"d_model", "heads", "L", "causal"})
    ->Args({512, 8, 512, 0})
    ->Args({512, 8, 512, 1})
    ->Args({512, 8, 2048, 0})
    ->Args({512, 8, 2048, 1})
    ->Args({512, 8, 8192, 0})
    ->Args({512, 8, 8192, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_mha_forward)->Apply(attention_shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_mha_forward_into)
    ->Apply(attention_shapes)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_mha_forward_into_bf16)
    ->Apply(attention_shapes)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// Short sequences (a prompt of a few dozen tokens, a small batch step), causal: there the
// projections dominate, and the bf16 layer's weights, packed once at construction, are not
// packed again by each call. In microseconds, both precisions.
BENCHMARK(BM_mha_forward_into)
    ->Name("BM_mha_forward_into/short")
    ->ArgNames({"d_model", "heads", "L", "causal"})
    ->Args({512, 8, 16, 1})
    ->Args({512, 8, 64, 1})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_mha_forward_into_bf16)
    ->Name("BM_mha_forward_into_bf16/short")
    ->ArgNames({"d_model", "heads", "L", "causal"})
    ->Args({512, 8, 16, 1})
    ->Args({512, 8, 64, 1})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_mha_backward)->Apply(attention_shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_attention_core_algo)->Apply(algo_shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_attention_decode)
    ->ArgNames({"d_model", "heads", "L"})
    ->Args({512, 8, 2048})
    ->Args({512, 8, 8192})
    ->Args({512, 8, 32768})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_attention_core_large_logits)
    ->ArgNames({"L", "large"})
    ->Args({2048, 0})
    ->Args({2048, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_tiled_block_pass)
    ->ArgName("pass")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_fma_peak)->Unit(benchmark::kMillisecond)->UseRealTime();
#if defined(MHA_BF16_NATIVE)
BENCHMARK(BM_bf16_peak)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
#if defined(MHA_BF16_AMX)
BENCHMARK(BM_amx_peak)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
BENCHMARK(BM_attention_core_bf16)
    ->ArgNames({"d_model", "heads", "L", "causal"})
    ->Args({512, 8, 2048, 0})
    ->Args({512, 8, 2048, 1})
    ->Args({512, 8, 8192, 0})
    ->Args({512, 8, 8192, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

std::string compiler() {
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "g++ " __VERSION__;
#else
    return "unknown";
#endif
}

}  // namespace

// Our own main instead of benchmark_main, to record in the report's context what the figures
// depend on besides the machine: the compiler, Eigen's SIMD set and its thread count.
int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::AddCustomContext("compiler", compiler());
    benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
    benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
