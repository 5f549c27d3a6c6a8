// SPDX-License-Identifier: MIT
// Hostile sizes and arguments at each boundary: the largest value that works and the first that
// must fail, for size sums and products (packed_batch, attention_config, split_qkv), windows up to
// INT64_MAX, scales that are finite as doubles but not in float, zero tokens through the fused
// projection, and outputs that share memory with inputs.
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/mha.hpp>

#include "reference.hpp"

using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::Equals;
using mha::Index;

namespace {
constexpr Index index_max = std::numeric_limits<Index>::max();
}  // namespace

TEST_CASE("checked_add and checked_mul: the largest result works, one more throws",
          "[hostile][check]") {
    using mha::detail::checked_add;
    using mha::detail::checked_mul;
    CHECK(checked_add("w", "a + b", index_max - 5, 5) == index_max);
    CHECK(checked_add("w", "a + b", std::numeric_limits<Index>::lowest() + 5, -5) ==
          std::numeric_limits<Index>::lowest());
    REQUIRE_THROWS_AS(checked_add("w", "a + b", index_max - 5, 6), mha::shape_error);
    REQUIRE_THROWS_AS(checked_add<mha::value_error>("w", "a + b", index_max, 1), mha::value_error);
    REQUIRE_THROWS_WITH(checked_add("w", "a + b", index_max, 1),
                        Equals("w: a + b must be in Index's range [-9223372036854775808, "
                               "9223372036854775807], got 9223372036854775807 + 1"));
    // 2^32 · (2^31 − 1) < 2^63 − 1 < 2^32 · 2^31.
    const Index two_32 = Index(1) << 32;
    CHECK(checked_mul("w", "a * b", two_32, (Index(1) << 31) - 1) ==
          two_32 * ((Index(1) << 31) - 1));
    CHECK(checked_mul("w", "a * b", index_max, 1) == index_max);
    CHECK(checked_mul("w", "a * b", 0, index_max) == 0);
    REQUIRE_THROWS_WITH(checked_mul("w", "a * b", two_32, Index(1) << 31),
                        Equals("w: a * b must be at most 9223372036854775807 (Index), got "
                               "4294967296 * 2147483648"));
    REQUIRE_THROWS_AS(checked_mul("w", "a * b", -1, 2), mha::shape_error);
}

TEST_CASE("packed_batch: lengths summing to Index's maximum work, one more throws",
          "[hostile][batch]") {
    const mha::packed_batch largest({index_max - 3, 3}, {0, index_max});
    CHECK(largest.total_queries() == index_max);
    CHECK(largest.total_keys() == index_max);
    REQUIRE_THROWS_WITH(mha::packed_batch(std::vector<Index>{index_max - 3, 4}),
                        Equals("mha::packed_batch: the sum of query_lengths must be in Index's "
                               "range [-9223372036854775808, 9223372036854775807], got "
                               "9223372036854775804 + 4"));
    REQUIRE_THROWS_AS(mha::packed_batch({index_max, 1}, {0, 0}), mha::value_error);
    REQUIRE_THROWS_AS(mha::packed_batch({0, 0}, {index_max, 1}), mha::value_error);
}

TEST_CASE("packed_batch: lengths whose sum wraps to the real column count are refused",
          "[hostile][batch]") {
    // 2·(2^63 − 1) + 4 wraps to 2 modulo 2^64: without the checked sum this batch matched a
    // two-token input and the kernels read and wrote far outside it.
    const std::vector<Index> lengths{index_max, index_max, 4};
    REQUIRE_THROWS_AS(mha::packed_batch(lengths), mha::value_error);
    mha::attention_config config;
    config.embed_dim = 4;
    config.num_heads = 2;
    const mha::multi_head_attention<float> layer(config, 1);
    const mha::matrix<float> x = mha::matrix<float>::Ones(4, 2);
    REQUIRE_THROWS_AS(layer.forward(x, mha::packed_batch(lengths)), mha::value_error);
}

TEMPLATE_TEST_CASE("sliding_window up to INT64_MAX reaches every key on its side",
                   "[hostile][mask]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(15);
    for (const auto& [lq, lk] : std::vector<std::pair<Index, Index>>{{7, 7}, {3, 11}, {9, 4}})
        for (const auto alignment :
             {mha::causal_alignment::bottom_right, mha::causal_alignment::top_left}) {
            CAPTURE(lq, lk, alignment == mha::causal_alignment::top_left);
            const mha::matrix<Scalar> q = source.normal_matrix<Scalar>(5, lq);
            const mha::matrix<Scalar> k = source.normal_matrix<Scalar>(5, lk);
            const mha::matrix<Scalar> v = source.normal_matrix<Scalar>(3, lk);
            // lq + lk is as wide as a window can matter: the same key ranges, hence the same
            // arithmetic and bitwise the same outputs.
            const Index wide = lq + lk;
            for (const auto algorithm :
                 {mha::attention_algorithm::tiled, mha::attention_algorithm::materialized}) {
                mha::attention_options options;
                options.algorithm = algorithm;
                const auto run = [&](Index left, Index right) {
                    return mha::scaled_dot_product_attention(
                        q, k, v,
                        mha::attention_mask<Scalar>(mha::sliding_window{left, right, alignment}),
                        options);
                };
                const mha::matrix<Scalar> both = run(index_max, index_max);
                CHECK(both == run(wide, wide));
                CHECK(run(0, index_max) == run(0, wide));
                CHECK(run(index_max, 0) == run(wide, 0));
                // Every query sees every key with the window open on both sides.
                for (Index i = 0; i < lq; ++i)
                    CHECK(both.col(i).cwiseAbs().maxCoeff() > 0);
            }
        }
}

TEST_CASE("attention_config: head products up to Index's maximum resolve, one more throws",
          "[hostile][config]") {
    mha::attention_config c;
    c.embed_dim = 8;
    c.num_heads = 1;
    // 2·head_dim + value_head_dim = 2^63 − 1 exactly.
    c.head_dim = index_max / 3;
    c.value_head_dim = index_max - 2 * (index_max / 3);
    CHECK(c.resolved().value_head_dim == c.value_head_dim);
    c.value_head_dim += 1;
    REQUIRE_THROWS_WITH(c.resolved(),
                        ContainsSubstring("mha::attention_config: 2 * num_heads * head_dim + "
                                          "num_heads * value_head_dim must be in Index's range"));
    c.num_heads = Index(1) << 62;
    c.head_dim = 2;
    c.value_head_dim = 1;
    REQUIRE_THROWS_WITH(c.resolved(),
                        Equals("mha::attention_config: num_heads * head_dim must be at most "
                               "9223372036854775807 (Index), got 4611686018427387904 * 2"));
    c.head_dim = 1;
    c.value_head_dim = 2;
    REQUIRE_THROWS_AS(c.resolved(), mha::value_error);
}

TEST_CASE("split_qkv: widths whose sum overflows throw; zero tokens give empty views",
          "[hostile][projection]") {
    mha::matrix<float> qkv(10, 0);  // no storage: data() may be null
    auto views = mha::split_qkv(qkv, 3, 4);
    CHECK(views.q.rows() == 3);
    CHECK(views.k.rows() == 3);
    CHECK(views.v.rows() == 4);
    CHECK(views.v.cols() == 0);
    REQUIRE_THROWS_AS(mha::split_qkv(qkv, index_max / 2 + 1, 0), mha::value_error);
    REQUIRE_THROWS_AS(mha::split_qkv(qkv, index_max / 2, 2), mha::value_error);
    // And through the layer: zero tokens in the fused self-attention path.
    mha::attention_config config;
    config.embed_dim = 6;
    config.num_heads = 2;
    const mha::multi_head_attention<float> layer(config, 3);
    const mha::matrix<float> none(6, 0);
    const mha::matrix<float> out = layer.forward(none, mha::packed_batch(std::vector<Index>{0, 0}));
    CHECK(out.rows() == 6);
    CHECK(out.cols() == 0);
}

TEST_CASE("scale: the largest float works in a float layer, the next double is a value_error",
          "[hostile][scale]") {
    const double largest = std::numeric_limits<float>::max();
    const double next = std::nextafter(largest, std::numeric_limits<double>::infinity());
    mha::attention_config config;
    config.embed_dim = 4;
    config.num_heads = 1;
    config.attention.scale = largest;
    CHECK_NOTHROW(mha::multi_head_attention<float>(config, 1));
    config.attention.scale = -largest;
    CHECK_NOTHROW(mha::multi_head_attention<float>(config, 1));
    for (const double bad : {next, -next, 1e39}) {
        CAPTURE(bad);
        config.attention.scale = bad;
        REQUIRE_THROWS_AS(mha::multi_head_attention<float>(config, 1), mha::value_error);
        REQUIRE_THROWS_WITH(mha::multi_head_attention<float>(config, 1),
                            ContainsSubstring("mha::multi_head_attention: config.attention.scale "
                                              "must be finite in the scalar type"));
        // Finite in double: a double layer takes it.
        CHECK_NOTHROW(mha::multi_head_attention<double>(config, 1));
    }
    config.attention.scale = 1e39;
    REQUIRE_THROWS_AS(mha::multi_head_attention<float>(config, mha::attention_parameters<float>{}),
                      mha::value_error);

    mha_test::value_source source(3);
    // Entries near 1e-19, so that scores at the largest float scale are of order one: the call
    // must run and give finite outputs.
    const mha::matrix<float> q = source.normal_matrix<float>(2, 3) * 1e-19f;
    mha::attention_options options;
    options.scale = largest;
    CHECK(mha::scaled_dot_product_attention(q, q, q, {}, options).allFinite());
    options.scale = 1e39;
    REQUIRE_THROWS_WITH(mha::scaled_dot_product_attention(q, q, q, {}, options),
                        ContainsSubstring("mha::scaled_dot_product_attention: options.scale must "
                                          "be finite in the scalar type"));
    const mha::matrix<double> qd = q.cast<double>();
    CHECK_NOTHROW(mha::scaled_dot_product_attention(qd, qd, qd, {}, options));
}

TEST_CASE("views_overlap agrees with the element sets of the two views", "[hostile][alias]") {
    // Every view of a 48-element buffer with up to 4 rows, 4 columns and strides 1..6 against every
    // other: exhaustive on a small grid, compared with the sets of addresses each view touches.
    std::vector<double> buffer(48);
    struct view {
        Index offset, rows, cols, stride;
    };
    std::vector<view> views;
    for (Index stride = 1; stride <= 6; ++stride)
        for (Index rows = 0; rows <= std::min<Index>(stride, 4); ++rows)
            for (Index cols = 0; cols <= 4; ++cols)
                for (Index offset = 0; offset + (cols > 0 ? (cols - 1) * stride + rows : 0) <= 48;
                     offset += 3)
                    views.push_back({offset, rows, cols, stride});
    const auto elements = [](const view& w) {
        std::set<Index> s;
        for (Index j = 0; j < w.cols; ++j)
            for (Index i = 0; i < w.rows; ++i)
                s.insert(w.offset + i + j * w.stride);
        return s;
    };
    std::size_t overlapping = 0, checked = 0, conservative = 0;
    for (const auto& a : views)
        for (const auto& b : views) {
            const auto ea = elements(a), eb = elements(b);
            bool shared = false;
            for (Index e : ea)
                shared = shared || eb.count(e) != 0;
            const bool reported =
                mha::detail::views_overlap(buffer.data() + a.offset, a.rows, a.cols, a.stride,
                                           buffer.data() + b.offset, b.rows, b.cols, b.stride);
            // Never a missed overlap; a false alarm only for different strides (documented).
            if (shared) CHECK(reported);
            const bool same_layout = a.stride == b.stride || a.cols <= 1 || b.cols <= 1;
            if (!shared && reported) {
                CHECK(!same_layout);
                ++conservative;
            }
            overlapping += shared ? 1 : 0;
            ++checked;
        }
    CHECK(overlapping > 1000);  // the grid exercises both answers
    CHECK(checked - overlapping > 1000);
    CHECK(conservative < checked / 4);
}

TEMPLATE_TEST_CASE("scaled_dot_product_attention: an output overlapping q, k or v is refused",
                   "[hostile][alias]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(7);
    mha::matrix<Scalar> q = source.normal_matrix<Scalar>(4, 6);
    mha::matrix<Scalar> k = source.normal_matrix<Scalar>(4, 6);
    mha::matrix<Scalar> v = source.normal_matrix<Scalar>(4, 6);
    const std::string where = "mha::scaled_dot_product_attention: out must be memory that ";
    REQUIRE_THROWS_WITH(mha::scaled_dot_product_attention(q, k, v, v),
                        Equals(where + "v does not use, got a view overlapping v"));
    REQUIRE_THROWS_WITH(mha::scaled_dot_product_attention(q, k, v, k),
                        Equals(where + "k does not use, got a view overlapping k"));
    REQUIRE_THROWS_WITH(mha::scaled_dot_product_attention(q, k, v, q),
                        Equals(where + "q does not use, got a view overlapping q"));
    // One shared column is enough.
    mha::matrix<Scalar> wide = source.normal_matrix<Scalar>(4, 11);
    REQUIRE_THROWS_AS(mha::scaled_dot_product_attention(q, k, wide.leftCols(6), wide.rightCols(6)),
                      mha::value_error);
    // Adjacent, not overlapping: allowed, and the same as into a separate matrix.
    mha::matrix<Scalar> expected(4, 5);
    mha::scaled_dot_product_attention(q.leftCols(5), k.leftCols(6), wide.leftCols(6), expected);
    mha::scaled_dot_product_attention(q.leftCols(5), k.leftCols(6), wide.leftCols(6),
                                      wide.rightCols(5));
    CHECK(mha::matrix<Scalar>(wide.rightCols(5)) == expected);
}

TEMPLATE_TEST_CASE(
    "multi_head_attention_core: disjoint row blocks of one buffer work, overlap "
    "throws",
    "[hostile][alias]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(11);
    const mha::packed_batch batch(std::vector<Index>{3, 5});
    // Rows: Q (4), K (4), V (4), then room for the output (4): a fused QKV buffer.
    mha::matrix<Scalar> buffer = source.normal_matrix<Scalar>(16, 8);
    auto q = buffer.middleRows(0, 4);
    auto k = buffer.middleRows(4, 4);
    auto v = buffer.middleRows(8, 4);
    mha::matrix<Scalar> expected(4, 8);
    mha::multi_head_attention_core(q, k, v, 2, batch, expected, mha::causal{});
    mha::multi_head_attention_core(q, k, v, 2, batch, buffer.middleRows(12, 4), mha::causal{});
    CHECK(mha::matrix<Scalar>(buffer.middleRows(12, 4)) == expected);
    REQUIRE_THROWS_WITH(
        mha::multi_head_attention_core(q, k, v, 2, batch, buffer.middleRows(10, 4)),
        Equals("mha::multi_head_attention_core: out must be memory that v does not use, got a "
               "view overlapping v"));
    REQUIRE_THROWS_AS(mha::multi_head_attention_core(q, k, v, 2, batch, buffer.middleRows(2, 4)),
                      mha::value_error);
}

TEMPLATE_TEST_CASE("forward_into: out may be the input itself", "[hostile][alias]", float, double) {
    using Scalar = TestType;
    mha::attention_config config;
    config.embed_dim = 6;
    config.num_heads = 3;
    const mha::multi_head_attention<Scalar> layer(config, 5);
    mha_test::value_source source(13);
    const mha::packed_batch batch(std::vector<Index>{4, 3});
    const mha::matrix<Scalar> x = source.normal_matrix<Scalar>(6, 7);
    mha::forward_workspace<Scalar> workspace;
    // Deterministic for a thread count (the library's promise), so the comparison is exact.
    mha::matrix<Scalar> expected(6, 7);
    layer.forward_into(x, batch, mha::causal{}, expected, workspace);
    mha::matrix<Scalar> inout = x;
    layer.forward_into(inout, batch, mha::causal{}, inout, workspace);
    CHECK(inout == expected);
    // Cross-attention with out overlapping the key input.
    mha::matrix<Scalar> both(6, 14);
    both << x, x;
    mha::matrix<Scalar> cross(6, 7);
    layer.forward_into(x, x, x, batch, {}, cross, workspace);
    auto keys = both.leftCols(7);
    layer.forward_into(x, keys, x, batch, {}, keys, workspace);
    CHECK(mha::matrix<Scalar>(both.leftCols(7)) == cross);
}
