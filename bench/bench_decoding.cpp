// SPDX-License-Identifier: MIT
// Decoder-shaped benchmarks: a Llama-3-8B-shaped layer (E = 4096, 32 query heads, 8 key/value
// heads, head width 128) at prefill and at decode.
//
// - Prefill: the attention core's GFLOP/s with 8 key/value heads against the same shape with 32,
//   in the same run (grouping should cost nothing: K and V are read by index, never copied).
// - Decode: one token over a cache of L tokens reads every cached key and value once, so it is
//   bound by memory bandwidth. BM_stream_read measures that bandwidth in the same run (a sum
//   over a buffer far larger than the caches); each decode case reports the bytes of K and V it
//   reads per second, to be read as a fraction of the probe's.
// - A whole decoding step of the layer: projection of one token, cache append, attention and
//   output projection, with its time per token and its heap allocations per step (0).
// - Both decode cases again in bfloat16 (the bf16 layer and its bf16 cache): half the bytes.
// - One token through a linear layer of E × E, with the weight as it is and packed once
//   (mha::prepacked_weight), against the same bandwidth probe.
//
// Threads: the kernels run on OpenMP's threads; compare OMP_NUM_THREADS=1 with 2:
//   OMP_NUM_THREADS=1 ./bench_decoding --benchmark_repetitions=3
//   (add --benchmark_report_aggregates_only=true for medians only)
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <mha/mha.hpp>
#include <mha/multi_head_attention_bf16.hpp>

#include "flops.hpp"

// Every heap allocation of the process, so that a benchmark can report how many one step makes:
// glibc's malloc family interposed (operator new, Eigen and the OpenMP runtime all end there).
// Elsewhere the counter reads −1.
namespace {
std::atomic<std::int64_t> allocations{0};
}  // namespace

#if defined(__GLIBC__)
#define MHA_BENCH_COUNTS_MALLOC 1
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) noexcept {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) noexcept {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) noexcept {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) noexcept {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) noexcept {
    allocations.fetch_add(1, std::memory_order_relaxed);
    void* p = __libc_memalign(alignment, n);
    if (p == nullptr) return ENOMEM;
    *out = p;
    return 0;
}
void free(void* p) noexcept {
    __libc_free(p);
}
}
#endif

namespace {

using mha::Index;
using Matrix = mha::matrix<float>;

// The Llama-3-8B attention shape.
constexpr Index kEmbed = 4096;
constexpr Index kHeads = 32;
constexpr Index kKvHeads = 8;
constexpr Index kHeadDim = 128;

void set_gflops(benchmark::State& state, double flops_per_iteration) {
    state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iteration / 1e9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

// Memory bandwidth of plain streaming reads: the sum of 1 GiB of floats, eight independent
// partial sums so that the adds are not the limit. 1 GiB is four times the largest cache read
// below (256 MiB of K and V at 32768 tokens), so no level of CPU cache holds it.
void BM_stream_read(benchmark::State& state) {
    const Index n = Index(1) << 28;  // floats, 1 GiB
    const Eigen::VectorXf buffer = Eigen::VectorXf::Constant(n, 1.0f);
    for (auto _ : state) {
        float s[8] = {};
        const float* p = buffer.data();
        for (Index i = 0; i < n; i += 8)
            for (int j = 0; j < 8; ++j)
                s[j] += p[i + j];
        float total = 0;
        for (float x : s)
            total += x;
        benchmark::DoNotOptimize(total);
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * n *
                            static_cast<std::int64_t>(sizeof(float)));
}

// The attention core at prefill: causal self-attention over L tokens with `kv_heads` key/value
// heads. GFLOP/s counts the same work for both head counts (the scores and the weighted sums of
// 32 query heads), so the two figures compare directly.
void BM_prefill_core(benchmark::State& state) {
    const Index kv_heads = state.range(0);
    const Index length = state.range(1);
    const Matrix q = Matrix::Random(kHeads * kHeadDim, length);
    const Matrix k = Matrix::Random(kv_heads * kHeadDim, length);
    const Matrix v = Matrix::Random(kv_heads * kHeadDim, length);
    const mha::packed_batch batch({length});
    const mha::attention_mask<float> mask = mha::causal{};
    Matrix out(kHeads * kHeadDim, length);
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, kHeads, kv_heads, batch, out, mask);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::attention_core_flops(1, length, kHeads * kHeadDim, true));
}

// The attention core of one decode step: one new query per head over a cache of L tokens,
// H_kv key/value heads (second argument: 8 as Llama 3 8B, 1 for multi-query attention) shared
// by the 32 query heads. The keys and values are read once: 2 · L · H_kv · d_k elements per
// step, reported as bytes/s. `Storage`: float, or Eigen::bfloat16 (Q, K and V in bf16, the sums
// and softmax in fp32; half the bytes). With fewer key/value heads than threads, only the split
// of the keys into chunks keeps every thread busy.
template <class Storage>
void decode_core(benchmark::State& state) {
    using storage_matrix = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic>;
    const Index length = state.range(0);
    const Index kv_heads = state.range(1);
    const storage_matrix q = Matrix::Random(kHeads * kHeadDim, 1).cast<Storage>();
    const storage_matrix k = Matrix::Random(kv_heads * kHeadDim, length).cast<Storage>();
    const storage_matrix v = Matrix::Random(kv_heads * kHeadDim, length).cast<Storage>();
    const mha::packed_batch batch({1}, {length});
    Matrix out(kHeads * kHeadDim, 1);
    for (auto _ : state) {
        mha::multi_head_attention_core(q, k, v, kHeads, kv_heads, batch, out);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mha_bench::cross_attention_core_flops(1, 1, length, kHeads * kHeadDim));
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 2 * length * kv_heads *
                            kHeadDim * static_cast<std::int64_t>(sizeof(Storage)));
}

void BM_decode_core(benchmark::State& state) {
    decode_core<float>(state);
}

void BM_decode_core_bf16(benchmark::State& state) {
    decode_core<Eigen::bfloat16>(state);
}

// A whole decoding step of the layer with a cache of L tokens: project the new token, append
// its key and value, attend, project the output. Each iteration rolls the cache back by one
// token, so every step sees the same L. Reports the heap allocations per step. `Layer`: the
// fp32 layer, or the bf16 one (bf16 weights, input and cache; float output). Second argument:
// 1 for Llama 3's rotary positions (base 500000), whose turn of Q and K the step then includes.
template <class Layer, class Input, class Workspace>
void decode_layer_step(benchmark::State& state) {
    const Index length = state.range(0);
    mha::attention_config config;
    config.embed_dim = kEmbed;
    config.num_heads = kHeads;
    config.num_kv_heads = kKvHeads;
    config.bias = false;
    if (state.range(1) != 0) {
        mha::rotary_options rope;
        rope.base = 500000;
        config.rotary = rope;
    }
    const Layer layer(mha::multi_head_attention<float>(config, /*seed=*/1));
    auto cache = layer.make_cache();
    cache.reserve(length + 1);
    {
        // The prompt's keys and values, written directly: its projection is not what is timed.
        const Matrix prompt_k = Matrix::Random(layer.key_width(), length);
        const Matrix prompt_v = Matrix::Random(layer.value_width(), length);
        cache.append(prompt_k.cast<Input>(), prompt_v.cast<Input>());
    }
    const Eigen::Matrix<Input, Eigen::Dynamic, Eigen::Dynamic> x =
        Matrix::Random(kEmbed, 1).cast<Input>();
    Matrix y(kEmbed, 1);
    Workspace workspace;
    layer.decode_into(x, cache, y, workspace);  // warm-up: sizes the workspace
    cache.truncate(length);
    std::int64_t allocated = 0;
    for (auto _ : state) {
        const std::int64_t before = allocations.load(std::memory_order_relaxed);
        layer.decode_into(x, cache, y, workspace);
        allocated += allocations.load(std::memory_order_relaxed) - before;
        cache.truncate(length);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
#if defined(MHA_BENCH_COUNTS_MALLOC)
    state.counters["allocs/step"] = benchmark::Counter(static_cast<double>(allocated) /
                                                       static_cast<double>(state.iterations()));
#else
    state.counters["allocs/step"] = benchmark::Counter(-1);
#endif
    state.counters["tokens/s"] =
        benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_decode_layer_step(benchmark::State& state) {
    decode_layer_step<mha::multi_head_attention<float>, float, mha::forward_workspace<float>>(
        state);
}

void BM_decode_layer_step_bf16(benchmark::State& state) {
    decode_layer_step<mha::multi_head_attention_bf16, Eigen::bfloat16, mha::bf16_forward_workspace>(
        state);
}

// One token through a 4096 × 4096 linear layer (64 MiB of float weight, read once per call),
// as a decoding step's projections: `mha::linear` with the weight itself (prepacked 0: its
// columns read a column stride apart) and with an `mha::prepacked_weight` (1: the panels read
// in order). Bytes per second of the weight, to be read against BM_stream_read's.
void BM_decode_linear(benchmark::State& state) {
    const bool prepacked = state.range(0) != 0;
    const Matrix w = Matrix::Random(kEmbed, kEmbed);
    const Eigen::VectorXf b = Eigen::VectorXf::Random(kEmbed);
    const Matrix x = Matrix::Random(kEmbed, 1);
    Matrix y(kEmbed, 1);
    const mha::prepacked_weight<float> packed(w);
    for (auto _ : state) {
        if (prepacked)
            mha::linear(packed, b, x, y);
        else
            mha::linear(w, b, x, y);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kEmbed * kEmbed *
                            static_cast<std::int64_t>(sizeof(float)));
}

BENCHMARK(BM_stream_read)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_decode_linear)
    ->ArgName("prepacked")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_prefill_core)
    ->ArgNames({"kv_heads", "L"})
    ->Args({kKvHeads, 512})
    ->Args({kHeads, 512})
    ->Args({kKvHeads, 2048})
    ->Args({kHeads, 2048})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_decode_core)
    ->ArgNames({"L", "kv_heads"})
    ->Args({4096, 8})
    ->Args({32768, 8})
    ->Args({32768, 1})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_decode_core_bf16)
    ->ArgNames({"L", "kv_heads"})
    ->Args({4096, 8})
    ->Args({32768, 8})
    ->Args({32768, 1})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_decode_layer_step)
    ->ArgNames({"L", "rotary"})
    ->Args({4096, 0})
    ->Args({4096, 1})
    ->Args({32768, 0})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_decode_layer_step_bf16)
    ->ArgNames({"L", "rotary"})
    ->Args({4096, 0})
    ->Args({4096, 1})
    ->Args({32768, 0})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
