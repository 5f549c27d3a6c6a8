// SPDX-License-Identifier: MIT
// forward_into with a reused workspace allocates nothing once it has run with the same shapes.
//
// How allocations are seen. Three counters, read before and after the measured call:
//   1. Eigen's own allocator. EIGEN_RUNTIME_NO_MALLOC makes every Eigen heap allocation (matrix
//      storage, GEMM packing above the stack limit, temporaries) check a flag; the test clears
//      the flag around the call with set_is_malloc_allowed(false). The check is an eigen_assert,
//      which this file defines to count the "heap allocation is forbidden" failure instead of
//      aborting (Eigen 5's "heap deallocation is forbidden" passes uncounted; any other failed
//      assertion still aborts), and which stays on under NDEBUG.
//   2. Global operator new, replaced below in every form (plain, array, nothrow, aligned,
//      sized deletes), so std::vector, std::string and anything else on new is counted.
//   3. The malloc family, where this file can interpose it (glibc, no sanitizer, which
//      installs its own): catches what the other two cannot, such as the OpenMP runtime's
//      allocations (libgomp calls malloc directly) and Eigen's aligned_malloc underneath 1.
// All three must stay at 0. The negative controls at the end show each counter seeing a real
// allocation, so a 0 is a measurement, not a disconnected counter.
//
// Why the outputs are compared bit for bit: forward() runs the same code (it makes a workspace
// of its own), so any difference would mean the reused buffers changed the computation (stale
// data read, a wrong size kept).
//
// Shapes are chosen so that the cases go where allocations used to be: Eigen's GEMM packing for
// the projections exceeds its 128 KiB stack limit at E = 128 (checked by a control), packed
// batches of unequal lengths (the materialised path's per-sequence score buffers, per-sequence
// slices), a sequence of length 0, every mask kind and their composition (the old mask slices
// copied vectors), decode shapes over >= 2·tiled_split_chunk keys (split-KV partials and their
// merge), the materialised algorithm and relu / sigmoid normalisation, float and double (the
// tiled kernel's block products pack more than the stack limit in double), and 1 and 2 threads.
// With 2 threads, task-to-thread assignment changes between calls; the workspace must have room
// wherever a block product lands. Decoding steps (decode_into) are measured over caches that grow
// by a token each step, shorter and longer than a key block: a step's shapes are never those of
// the step before, yet after reserve and one warm-up step none may allocate.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <string>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define MHA_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MHA_TEST_SANITIZED 1
#endif
#if defined(__GLIBC__) && !defined(MHA_TEST_SANITIZED)
#define MHA_TEST_COUNT_MALLOC 1
#endif

namespace mha_test {
std::atomic<long> eigen_forbidden{0};
std::atomic<long> news{0};
std::atomic<long> mallocs{0};

inline void eigen_assertion_failed(const char* expression, const char* file, int line) {
    if (std::strstr(expression, "heap allocation is forbidden") != nullptr) {
        eigen_forbidden.fetch_add(1, std::memory_order_relaxed);
        return;  // the allocation goes ahead; the counter reports it
    }
    // Eigen 5 checks frees against the same flag. Releasing memory is not what this test
    // forbids (the allocation it releases was counted when it happened), so let it through.
    if (std::strstr(expression, "heap deallocation is forbidden") != nullptr) return;
    std::fprintf(stderr, "%s:%d: Eigen assertion failed: %s\n", file, line, expression);
    std::abort();
}
}  // namespace mha_test

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
    ((x) ? static_cast<void>(0) : ::mha_test::eigen_assertion_failed(#x, __FILE__, __LINE__))

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <mha/multi_head_attention.hpp>
#include <mha/multi_head_attention_bf16.hpp>
#include <mha/projection_bf16.hpp>

#include "layer_setup.hpp"
#include "reference.hpp"

// ---- 2. global operator new and delete ----------------------------------------------------------

namespace {
void* counted_new(std::size_t size) {
    mha_test::news.fetch_add(1, std::memory_order_relaxed);
    return std::malloc(size == 0 ? 1 : size);
}
void* counted_new(std::size_t size, std::align_val_t alignment) {
    mha_test::news.fetch_add(1, std::memory_order_relaxed);
    const auto a = static_cast<std::size_t>(alignment);
    return std::aligned_alloc(a, (size + a - 1) / a * a);
}
void* checked(void* p) {
    if (p == nullptr) throw std::bad_alloc();
    return p;
}
}  // namespace

void* operator new(std::size_t n) {
    return checked(counted_new(n));
}
void* operator new[](std::size_t n) {
    return checked(counted_new(n));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    return counted_new(n);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
    return counted_new(n);
}
void* operator new(std::size_t n, std::align_val_t a) {
    return checked(counted_new(n, a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
    return checked(counted_new(n, a));
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
    return counted_new(n, a);
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
    return counted_new(n, a);
}
void operator delete(void* p) noexcept {
    std::free(p);
}
void operator delete[](void* p) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
    std::free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
    std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
    std::free(p);
}

// ---- 3. the malloc family (glibc's own implementation underneath) -------------------------------

#if defined(MHA_TEST_COUNT_MALLOC)
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) noexcept {
    mha_test::mallocs.fetch_add(1, std::memory_order_relaxed);
    return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) noexcept {
    mha_test::mallocs.fetch_add(1, std::memory_order_relaxed);
    return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) noexcept {
    mha_test::mallocs.fetch_add(1, std::memory_order_relaxed);
    return __libc_realloc(p, n);
}
void* memalign(std::size_t alignment, std::size_t n) noexcept {
    mha_test::mallocs.fetch_add(1, std::memory_order_relaxed);
    return __libc_memalign(alignment, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) noexcept {
    mha_test::mallocs.fetch_add(1, std::memory_order_relaxed);
    return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) noexcept {
    mha_test::mallocs.fetch_add(1, std::memory_order_relaxed);
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

// ---- the cases
// -----------------------------------------------------------------------------------

using mha::Index;
using mha_test::bitwise_equal;
using mha_test::max_threads;
using mha_test::set_threads;

namespace {

struct allocation_counts {
    long eigen = 0, news = 0, mallocs = 0;
};

/// What `fn` allocates, by each counter (mallocs stays 0 where it cannot be counted).
template <class Fn>
allocation_counts allocations_during(Fn&& fn) {
    const long e0 = mha_test::eigen_forbidden.load(), n0 = mha_test::news.load(),
               m0 = mha_test::mallocs.load();
    Eigen::internal::set_is_malloc_allowed(false);
    fn();
    Eigen::internal::set_is_malloc_allowed(true);
    return {mha_test::eigen_forbidden.load() - e0, mha_test::news.load() - n0,
            mha_test::mallocs.load() - m0};
}

void require_no_allocation(const allocation_counts& c) {
    INFO("Eigen heap allocations: " << c.eigen << ", operator new: " << c.news
                                    << ", malloc family: " << c.mallocs);
    REQUIRE(c.eigen == 0);
    REQUIRE(c.news == 0);
    REQUIRE(c.mallocs == 0);
}

template <class Scalar>
using mat = mha::matrix<Scalar>;

/// One layer call: self-attention when `key` is empty (no columns and no rows), else
/// cross-attention.
template <class Scalar>
struct call {
    const mha::multi_head_attention<Scalar>* layer;
    const mat<Scalar>* query;
    const mat<Scalar>* key;  // null: self-attention
    const mha::packed_batch* batch;
    const mha::attention_mask<Scalar>* mask;

    mat<Scalar> forward() const {
        return key == nullptr ? layer->forward(*query, *batch, *mask)
                              : layer->forward(*query, *key, *key, *batch, *mask);
    }
    void forward_into(Eigen::Ref<mat<Scalar>> out, mha::forward_workspace<Scalar>& ws) const {
        if (key == nullptr)
            layer->forward_into(*query, *batch, *mask, out, ws);
        else
            layer->forward_into(*query, *key, *key, *batch, *mask, out, ws);
    }
};

/// The check of one case at the current thread count: warm up, measure, compare.
template <class Scalar>
mat<Scalar> check_allocation_free(const call<Scalar>& c) {
    const mat<Scalar> expected = c.forward();
    mha::forward_workspace<Scalar> ws;
    // The output is a block of a larger matrix: forward_into writes through the Ref with the
    // parent's stride, and the rows around it must stay untouched.
    mat<Scalar> big = mat<Scalar>::Constant(expected.rows() + 3, expected.cols(), Scalar(7));
    auto out = big.middleRows(1, expected.rows());
    c.forward_into(out, ws);  // warm-up: sizes every buffer
    out.setConstant(Scalar(-1));
    const allocation_counts counts = allocations_during([&] { c.forward_into(out, ws); });
    require_no_allocation(counts);
    REQUIRE(bitwise_equal(out, expected));
    REQUIRE((big.topRows(1).array() == Scalar(7)).all());
    REQUIRE((big.bottomRows(2).array() == Scalar(7)).all());
    // A third call: the second one left the workspace as it found it.
    require_no_allocation(allocations_during([&] { c.forward_into(out, ws); }));
    REQUIRE(bitwise_equal(out, expected));
    return expected;
}

/// Runs the case with 1 thread and, with OpenMP, 2; the results must also be identical across
/// thread counts (every kernel of the layer promises that).
template <class Scalar>
void check_case(const call<Scalar>& c) {
    const int saved = max_threads();
    set_threads(1);
    const mat<Scalar> one = check_allocation_free(c);
#if defined(_OPENMP)
    set_threads(2);
    const mat<Scalar> two = check_allocation_free(c);
    REQUIRE(bitwise_equal(one, two));
#endif
    set_threads(saved);
}

mha::attention_config config_of(Index embed, Index heads, Index kv_width = 0) {
    mha::attention_config c;
    c.embed_dim = embed;
    c.num_heads = heads;
    c.key_input_dim = kv_width;
    c.value_input_dim = kv_width;
    return c;
}

/// keep_mask of one matrix per sequence (lk × lq), each entry kept with probability 0.8, and
/// every query keeping at least its first key (so no case turns into an all-masked one).
template <class Scalar>
mha::keep_mask random_keep(const mha::packed_batch& batch, mha_test::value_source& values) {
    std::vector<mha::bool_matrix> masks;
    for (Index b = 0; b < batch.size(); ++b) {
        mha::bool_matrix m(batch.key_length(b), batch.query_length(b));
        for (Index i = 0; i < m.cols(); ++i)
            for (Index j = 0; j < m.rows(); ++j)
                m(j, i) = j == 0 || values.uniform(0, 1) < 0.8;
        masks.push_back(std::move(m));
    }
    return mha::keep_mask(std::move(masks));
}

/// additive_bias of one matrix per sequence and head (B·H), N(0, 0.5) with some −∞.
template <class Scalar>
mha::additive_bias<Scalar> random_bias(const mha::packed_batch& batch, Index heads,
                                       mha_test::value_source& values) {
    std::vector<mat<Scalar>> biases;
    for (Index b = 0; b < batch.size(); ++b)
        for (Index h = 0; h < heads; ++h) {
            mat<Scalar> m =
                values.normal_matrix<Scalar>(batch.key_length(b), batch.query_length(b), 0.5);
            for (Index i = 0; i < m.cols(); ++i)
                for (Index j = 1; j < m.rows(); ++j)
                    if (values.uniform(0, 1) < 0.1)
                        m(j, i) = -std::numeric_limits<Scalar>::infinity();
            biases.push_back(std::move(m));
        }
    return mha::additive_bias<Scalar>(std::move(biases));
}

}  // namespace

TEST_CASE("forward_into allocates nothing: self-attention, every mask", "[alloc]") {
    using Scalar = float;
    mha_test::value_source values(7001);
    const mha::multi_head_attention<Scalar> layer(config_of(128, 2), 11);
    // Unequal lengths, one empty sequence, and a sequence longer than a query block (128).
    const mha::packed_batch batch({70, 0, 150, 29});
    const mat<Scalar> x = values.normal_matrix<Scalar>(128, batch.total_queries());
    const std::vector<Index> limits{60, 0, 150, 20};

    std::vector<std::pair<const char*, mha::attention_mask<Scalar>>> masks;
    masks.emplace_back("no mask", mha::attention_mask<Scalar>());
    masks.emplace_back("causal", mha::causal{});
    masks.emplace_back("sliding_window", mha::sliding_window{16, 4});
    masks.emplace_back("key_lengths", mha::key_lengths{limits});
    masks.emplace_back("keep_mask", random_keep<Scalar>(batch, values));
    masks.emplace_back("additive_bias", random_bias<Scalar>(batch, 2, values));
    masks.emplace_back(
        "composed", mha::attention_mask<Scalar>(
                        mha::causal{}, mha::sliding_window{40, 0}, mha::key_lengths{limits},
                        random_keep<Scalar>(batch, values), random_bias<Scalar>(batch, 2, values)));
    for (const auto& [name, mask] : masks) {
        DYNAMIC_SECTION(name) {
            check_case<Scalar>({&layer, &x, nullptr, &batch, &mask});
        }
    }
}

TEST_CASE("forward_into allocates nothing: cross-attention", "[alloc]") {
    using Scalar = float;
    mha_test::value_source values(7002);
    const mha::packed_batch batch({20, 45, 3}, {90, 33, 0});
    const mat<Scalar> query = values.normal_matrix<Scalar>(128, batch.total_queries());
    // kdim = vdim = E takes the fused weights' row blocks; kdim = 96 separate weights.
    for (const Index kv_width : {Index(128), Index(96)}) {
        const mha::multi_head_attention<Scalar> layer(config_of(128, 2, kv_width), 12);
        const mat<Scalar> memory = values.normal_matrix<Scalar>(kv_width, batch.total_keys());
        const mha::attention_mask<Scalar> none, causal(mha::causal{});
        const mha::attention_mask<Scalar> composed(mha::causal{}, mha::key_lengths{{80, 30, 0}},
                                                   random_keep<Scalar>(batch, values),
                                                   random_bias<Scalar>(batch, 2, values));
        DYNAMIC_SECTION("kdim " << kv_width << ", no mask") {
            check_case<Scalar>({&layer, &query, &memory, &batch, &none});
        }
        DYNAMIC_SECTION("kdim " << kv_width << ", causal") {
            check_case<Scalar>({&layer, &query, &memory, &batch, &causal});
        }
        DYNAMIC_SECTION("kdim " << kv_width << ", composed") {
            check_case<Scalar>({&layer, &query, &memory, &batch, &composed});
        }
    }
}

TEST_CASE("forward_into allocates nothing: score terms and a score modifier", "[alloc]") {
    using Scalar = float;
    mha_test::value_source values(7004);
    mha::attention_config config = config_of(128, 4);
    config.attention.softcap = 20.0;
    config.attention.alibi_slopes = mha::alibi_slopes(4);
    config.attention.sinks = {0.5, -0.5, 0.0, 1.0};
    const mha::multi_head_attention<Scalar> layer(config, 14);
    const mha::packed_batch batch({70, 150});
    const mat<Scalar> x = values.normal_matrix<Scalar>(128, batch.total_queries());
    // A prefix-LM: the first 10 tokens of each sequence see each other, the rest is causal; the
    // predicate lets the kernel skip the blocks past both.
    const auto modifier = mha::make_score_modifier(
        [](Index, Index h, Index i, Index j, Scalar s) {
            if (j >= 10 && j > i) return -std::numeric_limits<Scalar>::infinity();
            return s + Scalar(0.01) * static_cast<Scalar>(h);
        },
        [](Index, Index, Index, Index i1, Index j0, Index) { return j0 < 10 || j0 < i1; });
    const mat<Scalar> expected = layer.forward(x, batch, {}, modifier);
    const int saved = max_threads();
    for (const int threads : {1, 2}) {
        set_threads(threads);
        mha::forward_workspace<Scalar> ws;
        mat<Scalar> out(128, x.cols());
        layer.forward_into(x, batch, {}, out, ws, modifier);  // warm-up: sizes every buffer
        out.setConstant(Scalar(-1));
        require_no_allocation(
            allocations_during([&] { layer.forward_into(x, batch, {}, out, ws, modifier); }));
        REQUIRE(bitwise_equal(out, expected));
    }
    set_threads(saved);
}

TEMPLATE_TEST_CASE("forward_into allocates nothing: decode over a long cache (split-KV)", "[alloc]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source values(7003);
    const mha::multi_head_attention<Scalar> layer(config_of(64, 1), 13);
    // One query per sequence over 2·tiled_split_chunk keys or more: the split path (partials
    // per chunk, then a log-sum-exp merge).
    const Index split = 2 * mha::detail::tiled_split_chunk;
    const mha::packed_batch batch({1, 1}, {split + 300, split});
    const mat<Scalar> query = values.normal_matrix<Scalar>(64, 2);
    const mat<Scalar> cache = values.normal_matrix<Scalar>(64, batch.total_keys());
    const mha::attention_mask<Scalar> none,
        masked(mha::causal{}, mha::key_lengths{{split + 200, split - 7}});
    SECTION("no mask") {
        check_case<Scalar>({&layer, &query, &cache, &batch, &none});
    }
    SECTION("causal and key_lengths") {
        check_case<Scalar>({&layer, &query, &cache, &batch, &masked});
    }
}

TEST_CASE("forward_into allocates nothing: self-attention in double", "[alloc]") {
    // Double packs twice the bytes: the tiled kernel's block products exceed Eigen's stack limit.
    using Scalar = double;
    mha_test::value_source values(7004);
    const mha::multi_head_attention<Scalar> layer(config_of(128, 2), 14);
    const mha::packed_batch batch({140, 3, 61});
    const mat<Scalar> x = values.normal_matrix<Scalar>(128, batch.total_queries());
    const mha::attention_mask<Scalar> mask(mha::causal{}, random_bias<Scalar>(batch, 2, values));
    check_case<Scalar>({&layer, &x, nullptr, &batch, &mask});
}

TEST_CASE("forward_into allocates nothing: materialised algorithm, relu and sigmoid", "[alloc]") {
    using Scalar = float;
    mha_test::value_source values(7005);
    const mha::packed_batch batch({70, 0, 130, 29});
    const mat<Scalar> x = values.normal_matrix<Scalar>(128, batch.total_queries());
    const mha::attention_mask<Scalar> mask(mha::causal{}, mha::key_lengths{{60, 0, 130, 20}},
                                           random_keep<Scalar>(batch, values),
                                           random_bias<Scalar>(batch, 2, values));
    const mha::attention_mask<Scalar> none;
    struct variant {
        const char* name;
        mha::attention_algorithm algorithm;
        mha::normalization normalize;
    };
    for (const variant& v :
         {variant{"materialized softmax", mha::attention_algorithm::materialized,
                  mha::normalization::softmax},
          variant{"relu", mha::attention_algorithm::automatic, mha::normalization::relu},
          variant{"sigmoid", mha::attention_algorithm::automatic, mha::normalization::sigmoid}}) {
        mha::attention_config config = config_of(128, 2);
        config.attention.algorithm = v.algorithm;
        config.attention.normalize = v.normalize;
        const mha::multi_head_attention<Scalar> layer(config, 15);
        DYNAMIC_SECTION(v.name << ", no mask") {
            check_case<Scalar>({&layer, &x, nullptr, &batch, &none});
        }
        DYNAMIC_SECTION(v.name << ", composed mask") {
            check_case<Scalar>({&layer, &x, nullptr, &batch, &mask});
        }
    }
}

TEST_CASE("the bfloat16 linear with a workspace allocates nothing once it has run a shape",
          "[alloc]") {
    using bf16 = Eigen::bfloat16;
    using bmat = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;
    mha_test::value_source values(7008);
    // The layer's fused projection at E = 128 with 400 tokens: three column blocks, odd-free k.
    const bmat w = values.normal_matrix<float>(3 * 128, 128).cast<bf16>();
    const bmat x = values.normal_matrix<float>(128, 400).cast<bf16>();
    const mha::vector<float> b = values.normal_matrix<float>(3 * 128, 1);
    std::vector<mha::detail::bf16_kernel> kernels{mha::detail::bf16_kernel::portable};
#if defined(MHA_BF16_NATIVE) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512bf16")) kernels.push_back(mha::detail::bf16_kernel::native);
#endif
    const int saved = max_threads();
    for (const auto kernel : kernels)
        for (const int threads : {1, 2}) {
            set_threads(threads);
            mha::bf16_linear_workspace ws;
            mat<float> out(3 * 128, 400);
            bmat out16(3 * 128, 400);
            // Warm-up: sizes every buffer (and starts OpenMP's team).
            mha::detail::linear_bf16(w, b, x, out, ws, 0, kernel);
            mha::detail::linear_bf16(w, b, x, out16, ws, 0, kernel);
            require_no_allocation(allocations_during([&] {
                mha::detail::linear_bf16(w, b, x, out, ws, 0, kernel);
                mha::detail::linear_bf16(w, b, x, out16, ws, 0, kernel);
            }));
        }
    set_threads(saved);
}

TEST_CASE("forward_into allocates nothing: the bfloat16 layer, masks, grouped heads, cross",
          "[alloc]") {
    using bf16 = Eigen::bfloat16;
    using bmat = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;
    mha_test::value_source values(7009);
    mha::attention_config config = config_of(128, 4);
    config.num_kv_heads = 2;
    const bool rotary = GENERATE(false, true);
    if (rotary) config.rotary = mha::rotary_options{};
    INFO("rotary " << rotary);
    const mha::multi_head_attention_bf16 layer(mha::multi_head_attention<float>(config, 15));
    const mha::packed_batch batch({70, 150});
    const bmat x = values.normal_matrix<float>(128, batch.total_queries()).cast<bf16>();
    const mha::attention_mask<float> masks[] = {
        {}, mha::causal{}, mha::attention_mask<float>(mha::causal{}, mha::key_lengths{{50, 0}})};
    const int saved = max_threads();
    for (const int threads : {1, 2})
        for (const auto& mask : masks) {
            set_threads(threads);
            const mat<float> expected = layer.forward(x, batch, mask);
            mha::bf16_forward_workspace ws;
            mat<float> out(128, x.cols());
            layer.forward_into(x, batch, mask, out, ws);  // warm-up: sizes every buffer
            out.setConstant(-1.0f);
            require_no_allocation(
                allocations_during([&] { layer.forward_into(x, batch, mask, out, ws); }));
            REQUIRE(bitwise_equal(out, expected));
            // Cross-attention through the same workspace, after its own warm-up.
            layer.forward_into(x, x, x, batch, mask, out, ws);
            require_no_allocation(
                allocations_during([&] { layer.forward_into(x, x, x, batch, mask, out, ws); }));
        }
    set_threads(saved);
}

TEST_CASE("multi_head_attention_core with a workspace allocates nothing once it has run a shape",
          "[alloc]") {
    // The core on views of one fused QKV matrix, as a caller of repeated calls has them: float
    // on the tiled kernel (causal, grouped heads, a packed batch) and on the materialised one
    // (ReLU), and bfloat16 on the kernel the build selects (its K and V packed once per call:
    // 300 queries are three query blocks). Without weights, the promise of core_workspace.
    using bf16 = Eigen::bfloat16;
    mha_test::value_source values(7010);
    const Index heads = 4, kv_heads = 2, dk = 32;
    const mha::packed_batch batch({300, 45});
    const Index rows = heads * dk + 2 * kv_heads * dk;
    const mat<float> qkv = values.normal_matrix<float>(rows, batch.total_queries());
    const auto q = qkv.topRows(heads * dk);
    const auto k = qkv.middleRows(heads * dk, kv_heads * dk);
    const auto v = qkv.bottomRows(kv_heads * dk);
    const Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic> qkv16 = qkv.cast<bf16>();
    const mha::attention_mask<float> mask(mha::causal{});
    mha::attention_options relu;
    relu.normalize = mha::normalization::relu;
    relu.algorithm = mha::attention_algorithm::materialized;
    const int saved = max_threads();
    for (const int threads : {1, 2}) {
        set_threads(threads);
        mat<float> out(heads * dk, batch.total_queries());
        for (const auto& options : {mha::attention_options{}, relu}) {
            mat<float> expected(out.rows(), out.cols());
            mha::multi_head_attention_core(q, k, v, heads, kv_heads, batch, expected, mask,
                                           options);
            mha::core_workspace<float> ws;
            auto call = [&] {
                mha::multi_head_attention_core(q, k, v, heads, kv_heads, batch, out, mask, options,
                                               {}, ws);
            };
            call();  // warm-up: sizes every buffer
            out.setConstant(-1.0f);
            require_no_allocation(allocations_during(call));
            REQUIRE(bitwise_equal(out, expected));
            // Without it, the same call takes its buffers anew: the counters see them.
            const allocation_counts without = allocations_during([&] {
                mha::multi_head_attention_core(q, k, v, heads, kv_heads, batch, out, mask, options);
            });
            CHECK(without.eigen + without.news > 0);
        }
        mat<float> expected(out.rows(), out.cols());
        const auto q16 = qkv16.topRows(heads * dk);
        const auto k16 = qkv16.middleRows(heads * dk, kv_heads * dk);
        const auto v16 = qkv16.bottomRows(kv_heads * dk);
        mha::multi_head_attention_core(q16, k16, v16, heads, kv_heads, batch, expected, mask);
        mha::bf16_core_workspace ws;
        auto call = [&] {
            mha::multi_head_attention_core(q16, k16, v16, heads, kv_heads, batch, out, mask, {}, {},
                                           ws);
        };
        call();  // warm-up
        out.setConstant(-1.0f);
        require_no_allocation(allocations_during(call));
        REQUIRE(bitwise_equal(out, expected));
        const allocation_counts without = allocations_during([&] {
            mha::multi_head_attention_core(q16, k16, v16, heads, kv_heads, batch, out, mask);
        });
        CHECK(without.eigen + without.news > 0);
    }
    set_threads(saved);
}

TEST_CASE("the allocation counters see allocations (negative controls)", "[alloc]") {
    set_threads(1);
    SECTION("an Eigen matrix is seen by the Eigen counter (and by malloc where counted)") {
        const allocation_counts c = allocations_during([] {
            mat<float> m(100, 100);
            m.setZero();
        });
        CHECK(c.eigen == 1);
        CHECK(c.news == 0);
#if defined(MHA_TEST_COUNT_MALLOC)
        CHECK(c.mallocs == 1);
#endif
    }
    SECTION("a std::vector is seen by the operator new counter") {
        const allocation_counts c = allocations_during([] {
            std::vector<int> v(100);
            v[7] = 1;
        });
        CHECK(c.eigen == 0);
        CHECK(c.news == 1);
#if defined(MHA_TEST_COUNT_MALLOC)
        CHECK(c.mallocs == 1);  // operator new above allocates with malloc
#endif
    }
    SECTION("Eigen's GEMM at the shape of the layer's QKV projection allocates its packing") {
        // The size the cases use (E = 128, 3E × E weights, some 250 tokens): Eigen's own product
        // packs beyond its 128 KiB stack limit, so the layer's zero counts mean its packing
        // buffers are really reused, not merely small enough for the stack.
        mha_test::value_source values(7006);
        const mat<float> w = values.normal_matrix<float>(3 * 128, 128);
        const mat<float> x = values.normal_matrix<float>(128, 249);
        mat<float> out(3 * 128, 249);
        const allocation_counts c = allocations_during([&] { out.noalias() = w * x; });
        CHECK(c.eigen > 0);
        // mha::linear on float matrices stored column-major runs the register tiles
        // (detail/tiled_product.hpp), which copy w into panels on the stack: no allocation at
        // all, with or without a workspace.
        const allocation_counts linear =
            allocations_during([&] { mha::linear(w, mha::vector<float>(), x, out); });
        CHECK(linear.eigen == 0);
        CHECK(linear.news == 0);
    }
    SECTION("the layer allocates without a workspace, and when the shapes change") {
        mha_test::value_source values(7007);
        const mha::multi_head_attention<float> layer(config_of(128, 2), 16);
        const mha::packed_batch batch({70, 29}), more({70, 29, 40});
        const mat<float> x = values.normal_matrix<float>(128, more.total_queries());
        const mha::attention_mask<float> mask(mha::causal{});
        mat<float> out(128, more.total_queries());
        mha::forward_workspace<float> ws;
        layer.forward_into(x.leftCols(99), batch, mask, out.leftCols(99), ws);
        // Without a workspace every buffer is new.
        const allocation_counts plain = allocations_during(
            [&] { out.leftCols(99) = layer.forward(x.leftCols(99), batch, mask); });
        CHECK(plain.eigen > 0);
        CHECK(plain.news > 0);
        // A third sequence: more tokens (Eigen buffers grow) and more slices and tasks (vectors
        // grow) than the warm-up saw.
        const allocation_counts grown =
            allocations_during([&] { layer.forward_into(x, more, mask, out, ws); });
        CHECK(grown.eigen > 0);
        CHECK(grown.news > 0);
        // And once grown, the larger shape is free too.
        require_no_allocation(
            allocations_during([&] { layer.forward_into(x, more, mask, out, ws); }));
    }
}

// ---- decoding steps -----------------------------------------------------------------------------

namespace {

mha::attention_config grouped_config(Index embed, Index heads, Index kv_heads) {
    mha::attention_config c = config_of(embed, heads);
    c.num_kv_heads = kv_heads;
    return c;
}

// The element types and workspace of a layer's decoding steps.
template <class Layer>
struct decode_types;
template <class Scalar>
struct decode_types<mha::multi_head_attention<Scalar>> {
    using in = Scalar;
    using out = Scalar;
    using workspace = mha::forward_workspace<Scalar>;
};
template <>
struct decode_types<mha::multi_head_attention_bf16> {
    using in = Eigen::bfloat16;
    using out = float;
    using workspace = mha::bf16_forward_workspace;
};

template <class In>
mat<In> decode_inputs(mha_test::value_source& values, Index rows, Index cols) {
    if constexpr (std::is_same_v<In, Eigen::bfloat16>)
        return values.normal_matrix<float>(rows, cols).cast<In>();
    else
        return values.normal_matrix<In>(rows, cols);
}

/// Decoding steps into reserved, non-growable caches with a kept workspace: after a prefill and
/// one warm-up step, `measured` more steps must each allocate nothing, and give the bits that
/// `decode` (own workspace) gives on a copy of the caches (the same computation on the same
/// numbers). `new_tokens[b]` tokens of sequence b per step.
template <class Layer>
void check_decode_steps(const Layer& layer, const std::vector<Index>& prefill,
                        const std::vector<Index>& new_tokens, Index window, Index measured,
                        mha_test::value_source& values) {
    using In = typename decode_types<Layer>::in;
    using Out = typename decode_types<Layer>::out;
    const Index embed = layer.config().embed_dim;
    const std::size_t n = prefill.size();
    Index step_tokens = 0, most = 0;
    for (std::size_t b = 0; b < n; ++b) {
        step_tokens += new_tokens[b];
        most = std::max(most, prefill[b] + (measured + 1) * new_tokens[b]);
    }
    std::vector<mha::kv_cache<In>> caches;
    for (std::size_t b = 0; b < n; ++b) {
        caches.push_back(layer.make_cache({window, false}));
        // Room for the prefill; with a window, the least storage beyond that, so that the
        // window moves back to the front within the measured steps.
        caches.back().reserve(window > 0 ? std::max(2 * window, prefill[b] + new_tokens[b]) : most);
    }
    std::vector<mha::kv_cache<In>*> pointers;
    for (auto& c : caches)
        pointers.push_back(&c);
    typename decode_types<Layer>::workspace ws;
    for (std::size_t b = 0; b < n; ++b) {
        const mat<In> x = decode_inputs<In>(values, embed, prefill[b]);
        mat<Out> out(embed, prefill[b]);
        layer.decode_into(x, caches[b], out, ws);
    }
    const bool single = n == 1;
    mat<Out> out(embed, step_tokens);
    auto step = [&](const mat<In>& x) {
        if (single)
            layer.decode_into(x, caches[0], out, ws);
        else
            layer.decode_into(x, new_tokens, pointers, out, ws);
    };
    step(decode_inputs<In>(values, embed, step_tokens));  // warm-up: sizes every buffer
    for (Index s = 0; s < measured; ++s) {
        const mat<In> x = decode_inputs<In>(values, embed, step_tokens);
        std::vector<mha::kv_cache<In>> twins(caches);
        std::vector<mha::kv_cache<In>*> twin_pointers;
        for (auto& c : twins)
            twin_pointers.push_back(&c);
        const mat<Out> expected =
            single ? layer.decode(x, twins[0]) : layer.decode(x, new_tokens, twin_pointers);
        INFO("step " << s);
        require_no_allocation(allocations_during([&] { step(x); }));
        REQUIRE(bitwise_equal(out, expected));
        for (std::size_t b = 0; b < n; ++b)
            REQUIRE(caches[b].position() == twins[b].position());
    }
}

}  // namespace

TEMPLATE_TEST_CASE("decode_into allocates nothing: one sequence, grouped heads", "[alloc][decode]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source values(7101);
    const mha::multi_head_attention<Scalar> layer(grouped_config(128, 4, 2), 21);
    const int saved = max_threads();
    for (const int threads : {1, 2}) {
        set_threads(threads);
        DYNAMIC_SECTION(threads << " thread(s), no window") {
            check_decode_steps(layer, {20}, {1}, 0, 12, values);
        }
        // A window of 8 in 21 columns: its tokens move back to the front at the second step
        // after the prefill and every 14 steps after.
        DYNAMIC_SECTION(threads << " thread(s), window 8") {
            check_decode_steps(layer, {20}, {1}, 8, 12, values);
        }
        DYNAMIC_SECTION(
            threads << " thread(s), multi-query (one key/value head), 3 tokens a step") {
            const mha::multi_head_attention<Scalar> mqa(grouped_config(64, 4, 1), 22);
            check_decode_steps(mqa, {9}, {3}, 0, 6, values);
        }
    }
    set_threads(saved);
}

TEMPLATE_TEST_CASE("decode_into allocates nothing: a batch of sequences, grouped heads",
                   "[alloc][decode]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(7102);
    const mha::multi_head_attention<Scalar> layer(grouped_config(128, 4, 2), 23);
    const int saved = max_threads();
    for (const int threads : {1, 2}) {
        set_threads(threads);
        DYNAMIC_SECTION(threads << " thread(s), caches of 5, 30 and 0 tokens adding 1, 0, 2") {
            check_decode_steps(layer, {5, 30, 0}, {1, 0, 2}, 0, 8, values);
        }
        DYNAMIC_SECTION(threads << " thread(s), windows of 6") {
            check_decode_steps(layer, {5, 30, 1}, {1, 1, 1}, 6, 10, values);
        }
    }
    set_threads(saved);
}

TEST_CASE("decode_into allocates nothing: the bfloat16 layer and its bf16 caches",
          "[alloc][decode]") {
    mha_test::value_source values(7103);
    const mha::multi_head_attention_bf16 layer(
        mha::multi_head_attention<float>(grouped_config(128, 4, 2), 24));
    const int saved = max_threads();
    for (const int threads : {1, 2}) {
        set_threads(threads);
        DYNAMIC_SECTION(threads << " thread(s), one sequence, no window") {
            check_decode_steps(layer, {20}, {1}, 0, 12, values);
        }
        DYNAMIC_SECTION(threads << " thread(s), a batch, windows of 6") {
            check_decode_steps(layer, {5, 30, 1}, {1, 1, 1}, 6, 10, values);
        }
        DYNAMIC_SECTION(threads << " thread(s), rotary positions, a batch") {
            mha::attention_config rotary = grouped_config(128, 4, 2);
            rotary.rotary = mha::rotary_options{};
            const mha::multi_head_attention_bf16 turned(
                mha::multi_head_attention<float>(rotary, 25));
            check_decode_steps(turned, {5, 30, 1}, {1, 1, 1}, 0, 10, values);
        }
    }
    set_threads(saved);
}

TEST_CASE("decode_into allocates nothing: steps over a long cache (split-KV)", "[alloc][decode]") {
    // 2·tiled_split_chunk cached tokens and more: the split path's partials and merge.
    using Scalar = float;
    mha_test::value_source values(7103);
    const mha::multi_head_attention<Scalar> layer(grouped_config(32, 4, 2), 24);
    const Index split = 2 * mha::detail::tiled_split_chunk;
    const int saved = max_threads();
    for (const int threads : {1, 2}) {
        set_threads(threads);
        DYNAMIC_SECTION(threads << " thread(s)") {
            check_decode_steps(layer, {split + 10, 3}, {1, 1}, 0, 4, values);
        }
    }
    set_threads(saved);
}
