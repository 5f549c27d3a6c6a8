// SPDX-License-Identifier: MIT
// The key/value cache on its own (append, truncate, clear, reserve, capacity, the sliding
// window and when it moves its columns, non-growable caches, errors), then the layer's decoding
// steps: token by token, after a prefill, around a rejected draft, in window mode, several
// sequences in one call, across the split-KV threshold on 1 and 2 threads, with poisoned unused
// cache slots, and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/multi_head_attention.hpp>

#include "check.hpp"
#include "layer_setup.hpp"
#include "reference.hpp"

using Catch::Matchers::Equals;
using mha::Index;
using mha_test::mat;
using mha_test::max_threads;
using mha_test::random_parameters;
using mha_test::set_threads;
using mha_test::to_reference;

namespace {

/// Token t of a hand-made sequence: key column (t, t + 0.5, t + 0.25) and value column
/// (−t, 10 t), so every stored column says which token it is.
mat<double> hand_keys(Index first, Index count) {
    mat<double> k(3, count);
    for (Index c = 0; c < count; ++c) {
        const double t = static_cast<double>(first + c);
        k.col(c) << t, t + 0.5, t + 0.25;
    }
    return k;
}
mat<double> hand_values(Index first, Index count) {
    mat<double> v(2, count);
    for (Index c = 0; c < count; ++c) {
        const double t = static_cast<double>(first + c);
        v.col(c) << -t, 10 * t;
    }
    return v;
}

/// The cache holds exactly tokens [first, first + count) of the hand-made sequence.
void require_holds(const mha::kv_cache<double>& cache, Index first, Index count) {
    INFO("expected tokens [" << first << ", " << first + count << ")");
    REQUIRE(cache.size() == count);
    REQUIRE(cache.first_position() == first);
    REQUIRE(cache.position() == first + count);
    REQUIRE(mat<double>(cache.keys()) == hand_keys(first, count));
    REQUIRE(mat<double>(cache.values()) == hand_values(first, count));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// (1) The cache alone.
// ---------------------------------------------------------------------------------------------

TEST_CASE("kv_cache: append, truncate, clear, reserve, capacity and fits", "[kv_cache]") {
    mha::kv_cache<double> cache(3, 2);
    CHECK(cache.key_rows() == 3);
    CHECK(cache.value_rows() == 2);
    CHECK(cache.window() == 0);
    CHECK(cache.empty());
    CHECK(cache.capacity() == 0);
    CHECK(cache.fits(0));
    CHECK_FALSE(cache.fits(1));

    cache.reserve(10);
    CHECK(cache.capacity() == 10);
    CHECK(cache.fits(10));
    CHECK_FALSE(cache.fits(11));
    cache.append(hand_keys(0, 4), hand_values(0, 4));
    require_holds(cache, 0, 4);
    const double* storage = cache.keys().data();
    CHECK(cache.fits(6));
    CHECK_FALSE(cache.fits(7));

    cache.append(hand_keys(4, 2), hand_values(4, 2));
    require_holds(cache, 0, 6);
    CHECK(cache.keys().data() == storage);  // within the reserved capacity: no reallocation
    CHECK(cache.capacity() == 10);

    cache.truncate(3);  // roll back tokens 3, 4, 5
    require_holds(cache, 0, 3);
    cache.append(hand_keys(3, 1), hand_values(3, 1));
    require_holds(cache, 0, 4);
    cache.truncate(4);  // truncating at the end changes nothing
    require_holds(cache, 0, 4);
    cache.truncate(0);
    require_holds(cache, 0, 0);

    cache.append(hand_keys(0, 5), hand_values(0, 5));
    cache.clear();
    CHECK(cache.empty());
    CHECK(cache.position() == 0);
    CHECK(cache.capacity() == 10);  // clear keeps the storage
    cache.append(hand_keys(0, 2), hand_values(0, 2));
    require_holds(cache, 0, 2);
    CHECK(cache.keys().data() == storage);

    // A growable cache grows past its capacity and keeps what it held.
    cache.append(hand_keys(2, 12), hand_values(2, 12));
    require_holds(cache, 0, 14);
    CHECK(cache.capacity() >= 14);
    // reserve never shrinks and keeps the tokens.
    const Index grown = cache.capacity();
    cache.reserve(3);
    CHECK(cache.capacity() == grown);
    cache.reserve(grown + 7);
    CHECK(cache.capacity() == grown + 7);
    require_holds(cache, 0, 14);
    // An append of no tokens is valid.
    cache.append(hand_keys(14, 0), hand_values(14, 0));
    require_holds(cache, 0, 14);
}

TEST_CASE("kv_cache: a window keeps the last tokens, moving them to the front only at the end",
          "[kv_cache][window]") {
    // W = 4, capacity 8. After each single-token append the cache holds the last 4 tokens. The
    // stored columns slide right by one per step from the front of the storage; when they reach
    // its end (after step 8, columns 4..7) the next step moves the 3 kept ones to the front:
    // steps 9, 14, 19, 24, 29 (once every 8 − 3 = 5 tokens). Expected column offset of the
    // oldest stored token after step s: 0 for s ≤ 4, else (s − 4) mod 5.
    const Index window = 4;
    mha::kv_cache<double> cache(3, 2, {window, true});
    cache.reserve(8);
    REQUIRE(cache.capacity() == 8);
    cache.append(hand_keys(0, 1), hand_values(0, 1));
    // A cache that was empty stores from the front: these are the storage's first columns.
    const double* key_base = cache.keys().data();
    const double* value_base = cache.values().data();
    int moves = 0;
    Index previous_offset = 0;
    for (Index step = 1; step <= 30; ++step) {
        if (step > 1) cache.append(hand_keys(step - 1, 1), hand_values(step - 1, 1));
        CAPTURE(step);
        const Index count = std::min(step, window);
        require_holds(cache, step - count, count);
        REQUIRE(cache.capacity() == 8);
        const Index offset = (cache.keys().data() - key_base) / 3;
        const Index expected = step <= window ? 0 : (step - window) % (8 - window + 1);
        REQUIRE(offset == expected);
        REQUIRE(cache.values().data() == value_base + 2 * expected);
        if (offset < previous_offset) ++moves;
        previous_offset = offset;
    }
    CHECK(moves == 5);

    SECTION("an append of several tokens keeps W - 1 earlier ones plus all new ones") {
        cache.append(hand_keys(30, 3), hand_values(30, 3));
        require_holds(cache, 27, 6);
        cache.append(hand_keys(33, 1), hand_values(33, 1));
        require_holds(cache, 30, 4);
    }
    SECTION("truncate within the stored window, and not before it") {
        cache.truncate(28);
        require_holds(cache, 26, 2);
        REQUIRE_THROWS_AS(cache.truncate(25), mha::value_error);
        REQUIRE_THROWS_WITH(cache.truncate(25),
                            Equals("mha::kv_cache::truncate: position must be in [26, 28] (the "
                                   "stored positions), got 25"));
        require_holds(cache, 26, 2);
    }
    SECTION("reserve in window mode gives at least 2·W columns") {
        mha::kv_cache<double> small(3, 2, {5, true});
        small.reserve(3);
        CHECK(small.capacity() == 10);
    }
}

TEST_CASE("kv_cache: a non-growable cache refuses to grow, changing nothing", "[kv_cache]") {
    mha::kv_cache<double> cache(3, 2, {0, false});
    cache.reserve(4);
    cache.append(hand_keys(0, 3), hand_values(0, 3));
    const std::string refusal =
        "mha::kv_cache::append: the number of new tokens must be <= 1 (the reserved capacity 4 "
        "less the 3 tokens kept; the cache is not growable), got 2";
    REQUIRE_THROWS_AS(cache.append(hand_keys(3, 2), hand_values(3, 2)), mha::shape_error);
    REQUIRE_THROWS_WITH(cache.append(hand_keys(3, 2), hand_values(3, 2)), Equals(refusal));
    require_holds(cache, 0, 3);
    REQUIRE(cache.capacity() == 4);
    REQUIRE_THROWS_WITH(cache.check_append(2), Equals(refusal));
    REQUIRE_NOTHROW(cache.check_append(1));
    REQUIRE_THROWS_WITH(cache.check_append(-1),
                        Equals("mha::kv_cache::append: tokens must be >= 0, got -1"));
    cache.append(hand_keys(3, 1), hand_values(3, 1));
    require_holds(cache, 0, 4);

    SECTION("a non-growable window counts only the W - 1 kept tokens") {
        mha::kv_cache<double> w(3, 2, {3, false});
        w.reserve(6);  // 2·W
        w.append(hand_keys(0, 5), hand_values(0, 5));
        // Kept before the next append: 2 tokens; room for 4 more.
        REQUIRE(w.fits(4));
        REQUIRE_FALSE(w.fits(5));
        REQUIRE_THROWS_WITH(w.append(hand_keys(5, 5), hand_values(5, 5)),
                            Equals("mha::kv_cache::append: the number of new tokens must be <= 4 "
                                   "(the reserved capacity 6 less the 2 tokens kept; the cache is "
                                   "not growable), got 5"));
        require_holds(w, 0, 5);
        w.append(hand_keys(5, 4), hand_values(5, 4));
        require_holds(w, 3, 6);
    }
}

namespace {

/// The VmFlags line of the mapping of this process that holds `address`, from /proc/self/smaps;
/// empty where there is no such file (not Linux) or no such mapping.
std::string vm_flags_at(const void* address) {
    std::ifstream smaps("/proc/self/smaps");
    const auto at = reinterpret_cast<std::uintptr_t>(address);
    bool inside = false;
    for (std::string line; std::getline(smaps, line);) {
        std::uintptr_t lo = 0, hi = 0;
        char dash = 0;
        std::istringstream range(line);
        // A mapping's first line: "lo-hi perms offset dev inode [path]" in hexadecimal.
        if (range >> std::hex >> lo >> dash >> hi && dash == '-' && line.find(':') > 20) {
            inside = lo <= at && at < hi;
            continue;
        }
        if (inside && line.rfind("VmFlags:", 0) == 0) return line;
    }
    return {};
}

}  // namespace

TEST_CASE("kv_cache: large storage is advised onto huge pages unless asked not to", "[kv_cache]") {
    // madvise(MADV_HUGEPAGE) marks the mapping "hg" in /proc/self/smaps whatever the system's
    // transparent huge page mode (which decides whether huge pages then back it). 8 MiB of keys
    // hold whole 2 MiB pages wherever the allocation starts.
    CHECK(mha::kv_cache_options{}.huge_pages);
    const Index rows = 1024, tokens = 2048;  // 8 MiB of float keys
    mha::kv_cache<float> advised(rows, rows);
    advised.reserve(tokens);
    mha::kv_cache_options plain_options;
    plain_options.huge_pages = false;
    mha::kv_cache<float> plain(rows, rows, plain_options);
    plain.reserve(tokens);
    // Either way the cache holds what was appended.
    const mat<float> k = mat<float>::Random(rows, 3), v = mat<float>::Random(rows, 3);
    for (auto* cache : {&advised, &plain}) {
        cache->append(k, v);
        CHECK(cache->keys() == k);
        CHECK(cache->values() == v);
    }
    // The middle of the storage lies on a whole 2 MiB page of an advised mapping.
    const float* middle_advised = advised.keys().data() + rows * tokens / 2;
    const std::string flags = vm_flags_at(middle_advised);
    if (flags.empty()) SKIP("no /proc/self/smaps to read the advice from");
    INFO(flags);
    CHECK(flags.find(" hg") != std::string::npos);
    const std::string plain_flags = vm_flags_at(plain.keys().data() + rows * tokens / 2);
    INFO(plain_flags);
    CHECK(plain_flags.find(" hg") == std::string::npos);
}

TEST_CASE("kv_cache: bad arguments throw with the usual message", "[kv_cache][errors]") {
    using Catch::Matchers::Equals;
    REQUIRE_THROWS_AS(mha::kv_cache<float>(0, 2), mha::value_error);
    REQUIRE_THROWS_WITH(mha::kv_cache<float>(0, 2),
                        Equals("mha::kv_cache: key_rows must be >= 1, got 0"));
    REQUIRE_THROWS_WITH(mha::kv_cache<float>(3, -1),
                        Equals("mha::kv_cache: value_rows must be >= 1, got -1"));
    REQUIRE_THROWS_WITH(mha::kv_cache<float>(3, 2, {-1, true}),
                        Equals("mha::kv_cache: options.window must be >= 0 (0: keep every token), "
                               "got -1"));
    mha::kv_cache<double> cache(3, 2);
    REQUIRE_THROWS_WITH(cache.reserve(-1),
                        Equals("mha::kv_cache::reserve: tokens must be >= 0, got -1"));
    cache.append(hand_keys(0, 2), hand_values(0, 2));
    REQUIRE_THROWS_AS(cache.append(mat<double>::Zero(4, 1), hand_values(2, 1)), mha::shape_error);
    REQUIRE_THROWS_WITH(cache.append(mat<double>::Zero(4, 1), hand_values(2, 1)),
                        Equals("mha::kv_cache::append: keys.rows() must be 3 (the cache's "
                               "key_rows), got 4"));
    REQUIRE_THROWS_WITH(cache.append(hand_keys(2, 1), mat<double>::Zero(3, 1)),
                        Equals("mha::kv_cache::append: values.rows() must be 2 (the cache's "
                               "value_rows), got 3"));
    REQUIRE_THROWS_WITH(cache.append(hand_keys(2, 1), hand_values(2, 2)),
                        Equals("mha::kv_cache::append: values.cols() must be 1 (keys.cols()), "
                               "got 2"));
    REQUIRE_THROWS_AS(cache.truncate(3), mha::value_error);
    REQUIRE_THROWS_WITH(cache.truncate(3),
                        Equals("mha::kv_cache::truncate: position must be in [0, 2] (the stored "
                               "positions), got 3"));
    REQUIRE_THROWS_WITH(cache.truncate(-1),
                        Equals("mha::kv_cache::truncate: position must be in [0, 2] (the stored "
                               "positions), got -1"));
    require_holds(cache, 0, 2);
}

// ---------------------------------------------------------------------------------------------
// (2) The layer's decoding steps.
// ---------------------------------------------------------------------------------------------

namespace {

/// Check B's k for decoding: the layer tests' rule (test_multi_head_attention.cpp,
/// layer_baseline_k = 4, calibrated on the same chain of four GEMMs and a softmax). A decode
/// step is that chain on fewer columns, so the same rule applies; every comparison pools all
/// steps of a sequence (at least 16·40 outputs), the size at which those tests found the ratio
/// of maxima stable.
constexpr long double decode_k = 4;

mha::attention_config decode_config(Index kv_heads, bool bias) {
    mha::attention_config c;
    c.embed_dim = 16;
    c.num_heads = 4;
    c.head_dim = 4;
    c.value_head_dim = 3;
    c.num_kv_heads = kv_heads;
    c.bias = bias;
    return c;
}

/// A layer with random parameters, and its reference over a whole token sequence.
template <class Scalar>
struct decode_setup {
    mha::attention_config config;
    mha::attention_parameters<Scalar> params;
    mha::multi_head_attention<Scalar> layer;

    decode_setup(const mha::attention_config& c, mha_test::value_source& values)
        : config(c.resolved()), params(random_parameters<Scalar>(c, values)), layer(c, params) {}

    Scalar scale() const {
        return static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(config.head_dim)));
    }

    /// R and R_lp (check.hpp) of the last xq.cols() tokens of a sequence whose tokens are xk
    /// (xq being its last columns), causal, and within a window of W tokens if W > 0. A causal
    /// query reads only the keys up to itself, so the outputs are those of each prefix's last
    /// token, in the same order of operations.
    struct reference {
        mat<long double> out;
        mat<Scalar> base;
    };
    reference of(const mat<Scalar>& xq, const mat<Scalar>& xk, Index window = 0) const {
        const Index shift = xk.cols() - xq.cols();
        const auto allowed = [shift, window](Index, Index j, Index i) {
            return j <= i + shift && (window == 0 || j > i + shift - window);
        };
        reference r;
        r.out = mha_test::reference_layer<long double>(
            to_reference<long double>(params), config.num_heads, xq.template cast<long double>(),
            xk.template cast<long double>(), xk.template cast<long double>(),
            static_cast<long double>(scale()), allowed, nullptr, mha_test::norm_kind::softmax,
            nullptr, config.num_kv_heads);
        r.base = mha_test::reference_layer<Scalar>(
            to_reference<Scalar>(params), config.num_heads, xq, xk, xk, scale(), allowed, nullptr,
            mha_test::norm_kind::softmax, nullptr, config.num_kv_heads);
        return r;
    }
    reference of(const mat<Scalar>& x, Index window = 0) const { return of(x, x, window); }
};

/// What a cache holds, to show that a throwing call changed nothing.
template <class Scalar>
struct cache_state {
    Index size, position, capacity;
    mat<Scalar> keys, values;
    explicit cache_state(const mha::kv_cache<Scalar>& c)
        : size(c.size()),
          position(c.position()),
          capacity(c.capacity()),
          keys(c.keys()),
          values(c.values()) {}
    bool operator==(const cache_state& o) const {
        return size == o.size && position == o.position && capacity == o.capacity &&
               keys == o.keys && values == o.values;
    }
};

/// Writes `poison` into every storage column of `cache` that holds no stored token: the columns
/// before its oldest token (dropped window tokens) and after its newest (truncated or free).
/// `base` is the storage's first column (keys().data() of a cache that started empty and has not
/// grown since). The storage belongs to a non-const cache, so writing through the const view's
/// pointer is defined; it stands for stale memory that a kernel must never read.
template <class Scalar>
void poison_unused(mha::kv_cache<Scalar>& cache, const Scalar* key_base, const Scalar* value_base,
                   Scalar poison) {
    auto* keys = const_cast<Scalar*>(key_base);
    auto* values = const_cast<Scalar*>(value_base);
    const Index kr = cache.key_rows(), vr = cache.value_rows();
    const Index begin = cache.size() == 0 ? 0 : (cache.keys().data() - key_base) / kr;
    for (Index c = 0; c < cache.capacity(); ++c) {
        if (c >= begin && c < begin + cache.size()) continue;
        std::fill(keys + c * kr, keys + (c + 1) * kr, poison);
        std::fill(values + c * vr, values + (c + 1) * vr, poison);
    }
}

}  // namespace

TEMPLATE_TEST_CASE("decode token by token equals the causal forward over each prefix",
                   "[kv_cache][decode]", float, double) {
    // Tolerance: check B against the long-double reference of the whole sequence (see
    // decode_setup::of), pooled over all steps, for the decoded outputs and for the forward
    // outputs over each prefix alike: the rule the layer tests hold forward to.
    using Scalar = TestType;
    const Index kv_heads = GENERATE(4, 2, 1);
    const bool bias = GENERATE(true, false);
    mha_test::value_source values(3000 + static_cast<std::uint64_t>(kv_heads) * 2 + bias);
    const decode_setup<Scalar> s(decode_config(kv_heads, bias), values);
    const Index length = 40;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    mha::kv_cache<Scalar> cache = s.layer.make_cache();
    REQUIRE(cache.key_rows() == kv_heads * 4);
    REQUIRE(cache.value_rows() == kv_heads * 3);
    mat<Scalar> decoded(16, length), forwarded(16, length);
    for (Index t = 0; t < length; ++t) {
        decoded.col(t) = s.layer.decode(x.col(t), cache);
        REQUIRE(cache.size() == t + 1);
        forwarded.col(t) = s.layer.forward(x.leftCols(t + 1), mha::causal{}).col(t);
    }
    const auto ref = s.of(x);
    CAPTURE(kv_heads, bias);
    mha_test::require_within_baseline<Scalar>(decoded, ref.out, ref.base, decode_k, "decode");
    mha_test::require_within_baseline<Scalar>(forwarded, ref.out, ref.base, decode_k,
                                              "forward over the prefix");
}

TEMPLATE_TEST_CASE("decode: a prefill of many tokens, then single steps", "[kv_cache][decode]",
                   float, double) {
    using Scalar = TestType;
    const Index kv_heads = GENERATE(4, 2);
    mha_test::value_source values(3100 + static_cast<std::uint64_t>(kv_heads));
    const decode_setup<Scalar> s(decode_config(kv_heads, true), values);
    const Index length = 48, prefill = 29;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    mha::kv_cache<Scalar> cache = s.layer.make_cache();
    mat<Scalar> decoded(16, length);
    decoded.leftCols(prefill) = s.layer.decode(x.leftCols(prefill), cache);
    // The prefill's outputs are the causal forward's (bottom-right over an empty cache), the same
    // computation on the same numbers.
    REQUIRE(decoded.leftCols(prefill) == s.layer.forward(x.leftCols(prefill), mha::causal{}));
    for (Index t = prefill; t < length; ++t)
        decoded.col(t) = s.layer.decode(x.col(t), cache);
    REQUIRE(cache.position() == length);
    const auto ref = s.of(x);
    mha_test::require_within_baseline<Scalar>(decoded, ref.out, ref.base, decode_k,
                                              "prefill and steps");
}

TEMPLATE_TEST_CASE("decode: a rejected draft rolled back with truncate leaves no trace",
                   "[kv_cache][decode][draft]", float, double) {
    // Tokens 0..11 prefilled, 12 and 13 decoded, then 3 draft tokens of which the first is the
    // sequence's token 14 and the other two are rejected (truncate 2), then tokens 15..29 one by
    // one. The drafts' outputs for token 14 and every later output must be those of the
    // sequence that never saw the rejected drafts: check B against its reference (the rule of
    // the test above). The rejected drafts are NaN or 1e30 tokens, so their keys and values in
    // the truncated slots are too; a kernel reading them would turn the outputs non-finite or
    // far off.
    using Scalar = TestType;
    const Scalar poison =
        GENERATE(Scalar(0.5), std::numeric_limits<Scalar>::quiet_NaN(), Scalar(1e30));
    mha_test::value_source values(3200);
    const decode_setup<Scalar> s(decode_config(2, true), values);
    const Index length = 30;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    mha::kv_cache<Scalar> cache = s.layer.make_cache();
    mat<Scalar> decoded(16, length);
    decoded.leftCols(12) = s.layer.decode(x.leftCols(12), cache);
    decoded.col(12) = s.layer.decode(x.col(12), cache);
    decoded.col(13) = s.layer.decode(x.col(13), cache);
    mat<Scalar> draft(16, 3);
    draft.col(0) = x.col(14);
    draft.rightCols(2).setConstant(poison);
    const mat<Scalar> draft_out = s.layer.decode(draft, cache);
    REQUIRE(cache.position() == 17);
    cache.truncate(cache.position() - 2);
    REQUIRE(cache.position() == 15);
    decoded.col(14) = draft_out.col(0);
    for (Index t = 15; t < length; ++t)
        decoded.col(t) = s.layer.decode(x.col(t), cache);
    CAPTURE(poison);
    REQUIRE(decoded.allFinite());
    const auto ref = s.of(x);
    mha_test::require_within_baseline<Scalar>(decoded, ref.out, ref.base, decode_k,
                                              "decode around a rejected draft");
}

TEMPLATE_TEST_CASE("decode with a window equals forward with sliding_window{W - 1, 0}",
                   "[kv_cache][decode][window]", float, double) {
    // Tolerance: check B against the reference with the window, pooled over steps (as above).
    using Scalar = TestType;
    const Index kv_heads = GENERATE(4, 1);
    const Index window = 5;
    mha_test::value_source values(3300 + static_cast<std::uint64_t>(kv_heads));
    const decode_setup<Scalar> s(decode_config(kv_heads, true), values);
    const Index length = 40, prefill = 7;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    mha::kv_cache<Scalar> cache = s.layer.make_cache({window, true});
    cache.reserve(12);
    mat<Scalar> decoded(16, length), forwarded(16, length);
    decoded.leftCols(prefill) = s.layer.decode(x.leftCols(prefill), cache);
    const mha::attention_mask<Scalar> mask(mha::sliding_window{window - 1, 0});
    forwarded.leftCols(prefill) = s.layer.forward(x.leftCols(prefill), mask);
    for (Index t = prefill; t < length; ++t) {
        decoded.col(t) = s.layer.decode(x.col(t), cache);
        REQUIRE(cache.size() == window);
        REQUIRE(cache.capacity() == 12);  // the window never grows its storage
        forwarded.col(t) = s.layer.forward(x.leftCols(t + 1), mask).col(t);
    }
    const auto ref = s.of(x, window);
    CAPTURE(kv_heads);
    mha_test::require_within_baseline<Scalar>(decoded, ref.out, ref.base, decode_k,
                                              "decode with a window");
    mha_test::require_within_baseline<Scalar>(forwarded, ref.out, ref.base, decode_k,
                                              "forward with the sliding window");
}

TEMPLATE_TEST_CASE("decode: NaN and 1e30 in unused cache slots never reach the output",
                   "[kv_cache][decode][poison]", float, double) {
    // Before every step, every storage column of the cache that holds no stored token (free,
    // truncated, or dropped from the window) is overwritten with the poison. The outputs must be
    // bitwise those of the same steps on an unpoisoned cache (the kernels read stored tokens
    // only, so they see the same numbers).
    using Scalar = TestType;
    const Scalar poison = GENERATE(std::numeric_limits<Scalar>::quiet_NaN(), Scalar(1e30),
                                   -std::numeric_limits<Scalar>::infinity());
    const Index window = GENERATE(0, 4);
    mha_test::value_source values(3400);
    const decode_setup<Scalar> s(decode_config(2, true), values);
    const Index length = 30;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    const mha::kv_cache_options options{window, false};
    mha::kv_cache<Scalar> clean = s.layer.make_cache(options), dirty = s.layer.make_cache(options);
    // Without a window, room for every token; with one, the least storage (2·W), so that the
    // window moves back to the front every W + 1 steps and its old columns get poisoned.
    clean.reserve(window > 0 ? 2 * window : length);
    dirty.reserve(window > 0 ? 2 * window : length);
    // Start with one token so that keys().data() is the storage's first column.
    mat<Scalar> out_clean = s.layer.decode(x.col(0), clean);
    mat<Scalar> out_dirty = s.layer.decode(x.col(0), dirty);
    const Scalar* key_base = dirty.keys().data();
    const Scalar* value_base = dirty.values().data();
    CAPTURE(poison, window);
    for (Index t = 1; t < length; ++t) {
        poison_unused(dirty, key_base, value_base, poison);
        out_clean = s.layer.decode(x.col(t), clean);
        out_dirty = s.layer.decode(x.col(t), dirty);
        INFO("step " << t);
        REQUIRE(out_dirty.allFinite());
        REQUIRE(out_dirty == out_clean);
        if (t % 7 == 6) {  // roll back two tokens now and then: their slots are poisoned next
            clean.truncate(clean.position() - 2);
            dirty.truncate(dirty.position() - 2);
        }
    }
    REQUIRE(dirty.keys().data() - key_base < dirty.capacity() * dirty.key_rows());
}

TEMPLATE_TEST_CASE("decode: a batch of sequences in one call equals one call per sequence",
                   "[kv_cache][decode][batch]", float, double) {
    // Three sequences with caches of 5, 17 and 9 tokens add 1, 0 and 3 tokens in one call.
    // The same step made sequence by sequence projects each sequence's tokens in a product of
    // other column counts, whose GEMM micro-kernels may round differently; so the two are each
    // held to check B against the reference of their own sequence (pooled over the three
    // sequences' new outputs and several steps), which a mixed-up cache or length fails by far.
    using Scalar = TestType;
    const Index kv_heads = GENERATE(4, 2);
    mha_test::value_source values(3500 + static_cast<std::uint64_t>(kv_heads));
    const decode_setup<Scalar> s(decode_config(kv_heads, true), values);
    const std::vector<Index> prefill{5, 17, 9};
    const std::vector<std::vector<Index>> steps{{1, 0, 3}, {1, 1, 1}, {0, 2, 1}, {1, 1, 0}};
    std::vector<mat<Scalar>> seq;
    std::vector<Index> total(3);
    for (std::size_t b = 0; b < 3; ++b) {
        total[b] = prefill[b];
        for (const auto& step : steps)
            total[b] += step[b];
        seq.push_back(values.normal_matrix<Scalar>(16, total[b]));
    }
    std::vector<mha::kv_cache<Scalar>> batched, separate;
    for (std::size_t b = 0; b < 3; ++b) {
        batched.push_back(s.layer.make_cache());
        separate.push_back(s.layer.make_cache());
        s.layer.decode(seq[b].leftCols(prefill[b]), batched[b]);
        s.layer.decode(seq[b].leftCols(prefill[b]), separate[b]);
    }
    std::vector<Index> at = prefill;
    mat<Scalar> out_batched(16, 0), out_separate(16, 0), base(16, 0);
    mat<long double> ref(16, 0);
    auto append = [](auto& all, const auto& more) {
        const Index c = all.cols();
        all.conservativeResize(Eigen::NoChange, c + more.cols());
        all.rightCols(more.cols()) = more;
    };
    for (const auto& step : steps) {
        Index n = 0;
        for (Index k : step)
            n += k;
        mat<Scalar> x(16, n);
        Index column = 0;
        for (std::size_t b = 0; b < 3; ++b) {
            x.middleCols(column, step[b]) = seq[b].middleCols(at[b], step[b]);
            column += step[b];
        }
        const mat<Scalar> out = s.layer.decode(
            x, step, std::vector<mha::kv_cache<Scalar>*>{&batched[0], &batched[1], &batched[2]});
        REQUIRE(out.cols() == n);
        column = 0;
        for (std::size_t b = 0; b < 3; ++b) {
            const mat<Scalar> mine = seq[b].middleCols(at[b], step[b]);
            const mat<Scalar> alone = s.layer.decode(mine, separate[b]);
            REQUIRE(batched[b].position() == at[b] + step[b]);
            REQUIRE(separate[b].position() == at[b] + step[b]);
            const auto r = s.of(mine, mat<Scalar>(seq[b].leftCols(at[b] + step[b])));
            append(out_batched, mat<Scalar>(out.middleCols(column, step[b])));
            append(out_separate, alone);
            append(ref, r.out);
            append(base, r.base);
            column += step[b];
            at[b] += step[b];
        }
    }
    CAPTURE(kv_heads);
    mha_test::require_within_baseline<Scalar>(out_batched, ref, base, decode_k, "batched");
    mha_test::require_within_baseline<Scalar>(out_separate, ref, base, decode_k, "separate");
}

TEMPLATE_TEST_CASE("decode across the split-KV threshold: 1 and 2 threads give identical bits",
                   "[kv_cache][decode][split][threads]", float, double) {
    // A one-token step over 2·tiled_split_chunk cached tokens or more takes the split path
    // (partials per chunk merged by log-sum-exp); the steps below go from just under to past
    // that threshold. Every step must give the same bits on 1 and 2 threads (the kernels
    // promise results independent of the thread count) and, pooled, pass check B against the
    // reference (the rule of the tests above).
    using Scalar = TestType;
    mha_test::value_source values(3600);
    const decode_setup<Scalar> s(decode_config(2, true), values);
    const Index threshold = 2 * mha::detail::tiled_split_chunk;
    const Index prefill = threshold - 6, length = threshold + 6;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    const int saved = max_threads();
    std::vector<mat<Scalar>> runs;
    for (const int threads : {1, 2}) {
        set_threads(threads);
        mha::kv_cache<Scalar> cache = s.layer.make_cache();
        cache.reserve(length);
        mha::forward_workspace<Scalar> ws;
        mat<Scalar> out(16, length - prefill);
        mat<Scalar> first(16, prefill);
        s.layer.decode_into(x.leftCols(prefill), cache, first, ws);
        for (Index t = prefill; t < length; ++t)
            s.layer.decode_into(x.col(t), cache, out.col(t - prefill), ws);
        runs.push_back(out);
    }
    set_threads(saved);
    REQUIRE(runs[0] == runs[1]);
    const auto ref = s.of(mat<Scalar>(x.rightCols(length - prefill)), x);
    mha_test::require_within_baseline<Scalar>(runs[0], ref.out, ref.base, decode_k,
                                              "steps across the split-KV threshold");
}

TEST_CASE("decode: bad input throws with the usual message and changes no cache",
          "[kv_cache][decode][errors]") {
    mha_test::value_source values(3700);
    const decode_setup<float> s(decode_config(2, true), values);  // key_width 8, value_width 6
    const std::string where = "mha::multi_head_attention::decode: ";
    const mat<float> x = values.normal_matrix<float>(16, 3);
    mha::kv_cache<float> a = s.layer.make_cache(), b = s.layer.make_cache();
    s.layer.decode(values.normal_matrix<float>(16, 4), a);
    s.layer.decode(values.normal_matrix<float>(16, 2), b);
    const cache_state<float> a0(a), b0(b);
    using caches = std::vector<mha::kv_cache<float>*>;
    auto unchanged = [&] {
        REQUIRE(cache_state<float>(a) == a0);
        REQUIRE(cache_state<float>(b) == b0);
    };

    SECTION("a cache of the wrong width") {
        mha::kv_cache<float> wide_keys(16, 6), wide_values(8, 12);
        REQUIRE_THROWS_AS(s.layer.decode(x.leftCols(1), wide_keys), mha::shape_error);
        REQUIRE_THROWS_WITH(s.layer.decode(x.leftCols(1), wide_keys),
                            Equals(where + "caches[0]->key_rows() must be 8 (the layer's "
                                           "key_width(), H_kv·d_k), got 16"));
        REQUIRE_THROWS_WITH(s.layer.decode(x, {2, 1}, caches{&a, &wide_values}),
                            Equals(where + "caches[1]->value_rows() must be 6 (the layer's "
                                           "value_width(), H_kv·d_v), got 12"));
        unchanged();
        REQUIRE(wide_keys.empty());
    }
    SECTION("caches with different windows") {
        mha::kv_cache<float> windowed = s.layer.make_cache({4, true});
        REQUIRE_THROWS_AS(s.layer.decode(x, {2, 1}, caches{&a, &windowed}), mha::shape_error);
        REQUIRE_THROWS_WITH(s.layer.decode(x, {2, 1}, caches{&a, &windowed}),
                            Equals(where + "caches[1]->window() must be 0 (caches[0]->window(): "
                                           "one step has one mask), got 4"));
        unchanged();
        REQUIRE(windowed.empty());
    }
    SECTION("the same cache twice") {
        REQUIRE_THROWS_AS(s.layer.decode(x, {1, 1, 1}, caches{&a, &b, &a}), mha::value_error);
        REQUIRE_THROWS_WITH(s.layer.decode(x, {1, 1, 1}, caches{&a, &b, &a}),
                            Equals(where + "caches[2] must be a cache no other sequence of the "
                                           "step uses, got the cache of sequence 0"));
        unchanged();
    }
    SECTION("new_tokens that do not add up to x.cols()") {
        REQUIRE_THROWS_AS(s.layer.decode(x, {1, 1}, caches{&a, &b}), mha::shape_error);
        REQUIRE_THROWS_WITH(s.layer.decode(x, {1, 1}, caches{&a, &b}),
                            Equals(where + "x.cols() must be 2 (the sum of new_tokens), got 3"));
        REQUIRE_THROWS_WITH(s.layer.decode(x, {2, 2}, caches{&a, &b}),
                            Equals(where + "x.cols() must be 4 (the sum of new_tokens), got 3"));
        REQUIRE_THROWS_WITH(s.layer.decode(x, {4, -1}, caches{&a, &b}),
                            Equals(where + "new_tokens[1] must be >= 0, got -1"));
        REQUIRE_THROWS_WITH(s.layer.decode(x, {3}, caches{&a, &b}),
                            Equals(where + "caches.size() must be 1 (new_tokens.size()), got 2"));
        REQUIRE_THROWS_WITH(s.layer.decode(x, {3}, caches{nullptr}),
                            Equals(where + "caches[0] must be a cache, got null"));
        REQUIRE_THROWS_WITH(s.layer.decode(values.normal_matrix<float>(15, 1), a),
                            Equals(where + "x.rows() must be 16 (embed_dim), got 15"));
        unchanged();
    }
    SECTION("a non-growable cache without room, checked before any cache changes") {
        mha::kv_cache<float> full = s.layer.make_cache({0, false});
        full.reserve(4);
        s.layer.decode(values.normal_matrix<float>(16, 3), full);
        const cache_state<float> full0(full);
        // Sequence 0 (cache a) fits; sequence 1 does not: a must not have been appended to.
        REQUIRE_THROWS_AS(s.layer.decode(x, {1, 2}, caches{&a, &full}), mha::shape_error);
        REQUIRE_THROWS_WITH(s.layer.decode(x, {1, 2}, caches{&a, &full}),
                            Equals("mha::kv_cache::append: the number of new tokens must be <= 1 "
                                   "(the reserved capacity 4 less the 3 tokens kept; the cache is "
                                   "not growable), got 2"));
        unchanged();
        REQUIRE(cache_state<float>(full) == full0);
        // One more token fits.
        REQUIRE_NOTHROW(s.layer.decode(x.leftCols(1), full));
        REQUIRE(full.size() == 4);
    }
    SECTION("an output of the wrong shape") {
        mha::forward_workspace<float> ws;
        mat<float> out(16, 2);
        REQUIRE_THROWS_WITH(s.layer.decode_into(x, a, out, ws),
                            Equals(where + "out.cols() must be 3 (x.cols()), got 2"));
        unchanged();
    }
}
