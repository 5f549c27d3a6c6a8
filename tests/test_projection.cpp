// SPDX-License-Identifier: MIT
// Projections of projection.hpp: linear against the reference (check B), bias on and off, the
// fused QKV projection and its zero-copy split, and error messages.
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/projection.hpp>

#include "check.hpp"
#include "reference.hpp"

using Catch::Matchers::Equals;
using mha::Index;
using mha_test::mat;
using mha_test::vec;

namespace {

/// y = w·x + b against the a-priori dot-product bound of check.hpp (check G), which holds for
/// any summation order, blocking or FMA use.
template <class Scalar>
void require_linear_close(const mat<Scalar>& out, const mat<Scalar>& w, const vec<Scalar>& b,
                          const mat<Scalar>& x, const std::string& what) {
    mha_test::require_linear_within_bound(out, w, b, x, what);
}

}  // namespace

TEMPLATE_TEST_CASE("linear: y = W·x + b against the reference", "[projection]", float, double) {
    using Scalar = TestType;
    const auto [d_out, d_in, tokens] =
        GENERATE(table<Index, Index, Index>({{1, 1, 1}, {5, 7, 13}, {64, 48, 33}, {3, 129, 2}}));
    const bool with_bias = GENERATE(true, false);
    CAPTURE(d_out, d_in, tokens, with_bias);
    mha_test::value_source source(static_cast<std::uint64_t>(d_out * 1000 + d_in));
    const mat<Scalar> w = source.normal_matrix<Scalar>(d_out, d_in);
    const mat<Scalar> x = source.normal_matrix<Scalar>(d_in, tokens);
    const vec<Scalar> b =
        with_bias ? vec<Scalar>(source.normal_matrix<Scalar>(d_out, 1, 3.0)) : vec<Scalar>();

    mat<Scalar> out(d_out, tokens);
    mha::linear(w, b, x, out);
    require_linear_close(out, w, b, x, "linear");
    // The returning overload runs the same code.
    CHECK(mha::linear(w, b, x) == out);
    if (with_bias) {
        // The bias is added after the same GEMM: out = fl(no_bias + b), one rounding apart,
        // so |out − no_bias − b| ≤ u·|out|; doubled for margin. (A missing or misplaced bias
        // is off by |b| ~ 3.)
        mat<Scalar> no_bias(d_out, tokens);
        mha::linear(w, vec<Scalar>(), x, no_bias);
        const mat<Scalar> bias_cols = b.replicate(1, tokens);
        const mat<long double> difference =
            out.template cast<long double>() - no_bias.template cast<long double>();
        CHECK(mha_test::max_abs_diff(difference, bias_cols.template cast<long double>()) <=
              2 * mha_test::unit_roundoff<Scalar>() * out.cwiseAbs().maxCoeff());
    }
}

TEMPLATE_TEST_CASE("linear writes into blocks and Maps, and accepts them as inputs", "[projection]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source source(12);
    const mat<Scalar> w = source.normal_matrix<Scalar>(4, 6);
    const mat<Scalar> x = source.normal_matrix<Scalar>(6, 5);
    const vec<Scalar> b = source.normal_matrix<Scalar>(4, 1);
    const Scalar sentinel(42);

    // x and the output are disjoint blocks of one matrix (rows 4..9 and rows 0..3, partly the
    // same columns): no aliasing, no copies, and nothing else may be written.
    mat<Scalar> big = mat<Scalar>::Constant(10, 8, sentinel);
    big.block(4, 1, 6, 5) = x;
    mha::linear(w, b, big.block(4, 1, 6, 5), big.block(0, 2, 4, 5));
    require_linear_close<Scalar>(big.block(0, 2, 4, 5), w, b, x, "block");
    CHECK(big.block(4, 1, 6, 5) == x);
    big.block(4, 1, 6, 5).setConstant(sentinel);
    big.block(0, 2, 4, 5).setConstant(sentinel);
    CHECK((big.array() == sentinel).all());

    std::vector<Scalar> buffer(static_cast<std::size_t>(4 * 5), sentinel);
    Eigen::Map<mat<Scalar>> out_map(buffer.data(), 4, 5);
    mha::linear(Eigen::Map<const mat<Scalar>>(w.data(), 4, 6), b, x, out_map);
    require_linear_close<Scalar>(out_map, w, b, x, "map");
}

TEMPLATE_TEST_CASE(
    "linear: the register-tiled product across its row blocks and inner chunks, in "
    "blocks of larger matrices, the same bits on 1 and 2 threads",
    "[projection]", float, double) {
    // detail/tiled_product.hpp takes w's rows 64 at a time and its columns in chunks (each
    // chunk continuing the sums the one before left in out): 512 read in place for up to 6
    // tokens, 256 (float) or 128 (double) copied into panels of one micro tile's rows for more,
    // and tiles of 6 tokens with a narrower tile for the rest: these shapes put a partial block,
    // chunk, panel and tile at each end, on both paths.
    using Scalar = TestType;
    const auto [d_out, d_in, tokens] = GENERATE(table<Index, Index, Index>(
        {{130, 1100, 7}, {64, 512, 1}, {65, 513, 13}, {200, 40, 6}, {17, 1025, 11}}));
    CAPTURE(d_out, d_in, tokens);
    mha_test::value_source source(static_cast<std::uint64_t>(d_out * 7 + d_in * 3 + tokens));
    // w, x and out are blocks of larger matrices: outer strides that are not their row counts.
    const mat<Scalar> w_big = source.normal_matrix<Scalar>(d_out + 3, d_in + 2);
    const mat<Scalar> x_big = source.normal_matrix<Scalar>(d_in + 5, tokens + 1);
    const vec<Scalar> b = source.normal_matrix<Scalar>(d_out, 1, 3.0);
    const auto w = w_big.block(2, 1, d_out, d_in);
    const auto x = x_big.block(3, 1, d_in, tokens);
    const Scalar sentinel(42);
    mat<Scalar> out_big = mat<Scalar>::Constant(d_out + 4, tokens + 2, sentinel);
    auto out = out_big.block(1, 1, d_out, tokens);
    mha::linear(w, b, x, out);
    // The bound of check G (any summation order, blocking or FMA use).
    require_linear_close<Scalar>(out, w, b, x, "tiled linear");
    // Nothing outside the output block is written.
    mat<Scalar> written = out_big;
    written.block(1, 1, d_out, tokens).setConstant(sentinel);
    CHECK((written.array() == sentinel).all());
    // Each entry is one chain over d_in whatever the split of the row blocks over threads (a
    // build without OpenMP runs both on one thread).
    mat<Scalar> one(d_out, tokens), two(d_out, tokens);
    mha::detail::tiled_product(d_out, tokens, d_in, w.data(), w.outerStride(), x.data(),
                               x.outerStride(), one.data(), one.outerStride(), 1);
    mha::detail::tiled_product(d_out, tokens, d_in, w.data(), w.outerStride(), x.data(),
                               x.outerStride(), two.data(), two.outerStride(), 2);
    CHECK(one == two);
    // Packed or read in place, each entry is the same chain: one token at a time (in place)
    // gives the bits of all tokens at once (packed where there are more than 6).
    mat<Scalar> by_token(d_out, tokens);
    for (Index t = 0; t < tokens; ++t)
        mha::detail::tiled_product(d_out, Index(1), d_in, w.data(), w.outerStride(),
                                   x.data() + t * x.outerStride(), x.outerStride(),
                                   by_token.data() + t * d_out, d_out, 1);
    CHECK(one == by_token);
    // Packed once beforehand (row_panels, as the layer keeps its weights): the same chains, so
    // the same bits, for every number of tokens (one at a time included) and on 2 threads.
    const mha::detail::row_panels<Scalar> panels(w);
    mat<Scalar> prepacked(d_out, tokens), prepacked_two(d_out, tokens);
    mha::detail::tiled_product(panels.all(), tokens, x.data(), x.outerStride(), prepacked.data(),
                               d_out, 1);
    mha::detail::tiled_product(panels.all(), tokens, x.data(), x.outerStride(),
                               prepacked_two.data(), d_out, 2);
    CHECK(prepacked == one);
    CHECK(prepacked_two == one);
    mat<Scalar> prepacked_by_token(d_out, tokens);
    for (Index t = 0; t < tokens; ++t)
        mha::detail::tiled_product(panels.all(), Index(1), x.data() + t * x.outerStride(),
                                   x.outerStride(), prepacked_by_token.data() + t * d_out, d_out,
                                   1);
    CHECK(prepacked_by_token == one);
    // The layer's projection (linear_into on the panels), with the bias as linear adds it, and
    // the panels unpacked: w exactly.
    mat<Scalar> through_panels(d_out, tokens), through_linear(d_out, tokens);
    mha::detail::linear_into(panels, b, x, through_panels);
    mha::linear(w, b, x, through_linear);
    CHECK(through_panels == through_linear);
    CHECK(panels.unpacked() == w);
    // A view from a panel boundary on is the product of those rows of w; off a boundary there
    // is no view (the layer then reads w as linear does).
    constexpr Index panel = mha::detail::product_panel_rows<Scalar>;
    if (d_out > panel) {
        const auto lower = panels.rows(panel, d_out - panel);
        REQUIRE(lower.data != nullptr);
        mat<Scalar> lower_out(d_out - panel, tokens);
        mha::detail::tiled_product(lower, tokens, x.data(), x.outerStride(), lower_out.data(),
                                   d_out - panel, 1);
        CHECK(lower_out == one.bottomRows(d_out - panel));
        CHECK(panels.rows(1, d_out - 1).data == nullptr);
    }
    mat<Scalar> without_bias(d_out, tokens);
    mha::linear(w, vec<Scalar>(), x, without_bias);
    CHECK(one == without_bias);
}

TEST_CASE("linear: error messages", "[projection]") {
    using M = mat<double>;
    const M w = M::Zero(5, 7), x = M::Zero(7, 13);
    const vec<double> b = vec<double>::Zero(5);
    M out(5, 13);
    REQUIRE_NOTHROW(mha::linear(w, b, x, out));
    REQUIRE_THROWS_AS(mha::linear(w, b, M::Zero(6, 13), out), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::linear(w, b, M::Zero(6, 13), out),
                        Equals("mha::linear: x.rows() must be 7 (w.cols()), got 6"));
    REQUIRE_THROWS_WITH(mha::linear(w, vec<double>::Zero(4), x, out),
                        Equals("mha::linear: b.size() must be 5 (w.rows() or 0), got 4"));
    M wrong_rows(4, 13), wrong_cols(5, 12);
    REQUIRE_THROWS_WITH(mha::linear(w, b, x, wrong_rows),
                        Equals("mha::linear: out.rows() must be 5 (w.rows()), got 4"));
    REQUIRE_THROWS_WITH(mha::linear(w, b, x, wrong_cols),
                        Equals("mha::linear: out.cols() must be 13 (x.cols()), got 12"));
}

TEMPLATE_TEST_CASE("prepacked_weight: linear gives the bits of linear with w, for any operands",
                   "[projection]", float, double) {
    // The weight packed once is multiplied on the same register tiles, each entry the same chain
    // over d_in, so every shape (a decoding step's 1 to 6 tokens, which linear with w reads in
    // place, and more, which it packs per call) gives the bits of linear with w itself; so do
    // operands that are not plain column-major (copied, or written through a copy).
    using Scalar = TestType;
    const auto [d_out, d_in] = GENERATE(table<Index, Index>({{1, 1}, {17, 9}, {70, 130}}));
    CAPTURE(d_out, d_in);
    mha_test::value_source source(static_cast<std::uint64_t>(d_out * 100 + d_in));
    const mat<Scalar> w = source.normal_matrix<Scalar>(d_out, d_in);
    const vec<Scalar> b = source.normal_matrix<Scalar>(d_out, 1);
    const mha::prepacked_weight<Scalar> packed(w);
    CHECK(packed.rows() == d_out);
    CHECK(packed.cols() == d_in);
    CHECK(packed.unpacked() == w);
    for (Index tokens : {Index(0), Index(1), Index(3), Index(6), Index(7), Index(40)}) {
        CAPTURE(tokens);
        const mat<Scalar> x = source.normal_matrix<Scalar>(d_in, tokens);
        const mat<Scalar> want = mha::linear(w, b, x);
        CHECK(mha::linear(packed, b, x) == want);
        mat<Scalar> without_bias(d_out, tokens);
        mha::linear(packed, vec<Scalar>(), x, without_bias);
        CHECK(without_bias == mha::linear(w, vec<Scalar>(), x));
        // Into a block of a larger matrix (in place), and into a row-major matrix (a copy).
        mat<Scalar> big = mat<Scalar>::Constant(d_out + 3, tokens + 2, Scalar(7));
        mha::linear(packed, b, x, big.block(1, 2, d_out, tokens));
        CHECK(big.block(1, 2, d_out, tokens) == want);
        CHECK((big.topRows(1).array() == Scalar(7)).all());
        Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major(d_out,
                                                                                         tokens);
        mha::linear(packed, b, x, row_major);
        CHECK(mat<Scalar>(row_major) == want);
        // x as an expression (a transpose of its row-major copy).
        const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> xt =
            x.transpose();
        CHECK(mha::linear(packed, b, xt.transpose()) == want);
        // x as an expression with no storage (×1 is exact): copied, then written in place, or
        // through a copy into the row-major output.
        mat<Scalar> from_expression(d_out, tokens);
        mha::linear(packed, b, x * Scalar(1), from_expression);
        CHECK(from_expression == want);
        mha::linear(packed, b, x * Scalar(1), row_major);
        CHECK(mat<Scalar>(row_major) == want);
    }
    // A weight given as a row-major matrix or as a block packs the same weight.
    const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> w_rows = w;
    CHECK(mha::prepacked_weight<Scalar>(w_rows).unpacked() == w);
    mat<Scalar> padded = mat<Scalar>::Zero(d_out + 2, d_in + 1);
    padded.block(2, 1, d_out, d_in) = w;
    CHECK(mha::prepacked_weight<Scalar>(padded.block(2, 1, d_out, d_in)).unpacked() == w);
}

TEST_CASE("prepacked_weight: error messages name the argument", "[projection]") {
    using M = mat<double>;
    const mha::prepacked_weight<double> w(M::Zero(5, 7));
    const vec<double> b = vec<double>::Zero(5);
    M out(5, 13);
    REQUIRE_NOTHROW(mha::linear(w, b, M::Zero(7, 13), out));
    REQUIRE_THROWS_WITH(mha::linear(w, b, M::Zero(6, 13), out),
                        Equals("mha::linear: x.rows() must be 7 (w.cols()), got 6"));
    REQUIRE_THROWS_WITH(mha::linear(w, vec<double>::Zero(4), M::Zero(7, 13), out),
                        Equals("mha::linear: b.size() must be 5 (w.rows() or 0), got 4"));
    M wrong_cols(5, 12);
    REQUIRE_THROWS_WITH(mha::linear(w, b, M::Zero(7, 13), wrong_cols),
                        Equals("mha::linear: out.cols() must be 13 (x.cols()), got 12"));
    // The copying path checks before it copies.
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> wrong_rows(4, 13);
    REQUIRE_THROWS_WITH(mha::linear(w, b, M::Zero(7, 13), wrong_rows),
                        Equals("mha::linear: out.rows() must be 5 (w.rows()), got 4"));
}

TEMPLATE_TEST_CASE("fused projection (linear) + split_qkv: views equal separate projections",
                   "[projection]", float, double) {
    using Scalar = TestType;
    const Index d_in = 10, qk = 6, vw = 4, tokens = 9;
    const bool with_bias = GENERATE(true, false);
    CAPTURE(with_bias);
    mha_test::value_source source(34);
    const mat<Scalar> w_q = source.normal_matrix<Scalar>(qk, d_in);
    const mat<Scalar> w_k = source.normal_matrix<Scalar>(qk, d_in);
    const mat<Scalar> w_v = source.normal_matrix<Scalar>(vw, d_in);
    const vec<Scalar> b_q =
        with_bias ? vec<Scalar>(source.normal_matrix<Scalar>(qk, 1)) : vec<Scalar>();
    const vec<Scalar> b_k =
        with_bias ? vec<Scalar>(source.normal_matrix<Scalar>(qk, 1)) : vec<Scalar>();
    const vec<Scalar> b_v =
        with_bias ? vec<Scalar>(source.normal_matrix<Scalar>(vw, 1)) : vec<Scalar>();
    const mat<Scalar> x = source.normal_matrix<Scalar>(d_in, tokens);

    mat<Scalar> w_qkv(2 * qk + vw, d_in);
    w_qkv << w_q, w_k, w_v;
    vec<Scalar> b_qkv(with_bias ? 2 * qk + vw : 0);
    if (with_bias) b_qkv << b_q, b_k, b_v;

    mat<Scalar> qkv(2 * qk + vw, tokens);
    mha::linear(w_qkv, b_qkv, x, qkv);
    auto views = mha::split_qkv(qkv, qk, vw);

    // Views, not copies: they point into qkv at rows 0, qk and 2·qk, with qkv's column stride.
    CHECK(views.q.data() == qkv.data());
    CHECK(views.k.data() == qkv.data() + qk);
    CHECK(views.v.data() == qkv.data() + 2 * qk);
    CHECK(views.k.outerStride() == qkv.rows());
    CHECK(views.q.rows() == qk);
    CHECK(views.v.rows() == vw);
    CHECK(views.v.cols() == tokens);

    // Each view is the projection with its own weights (check B each), i.e. what three separate
    // linear calls give.
    require_linear_close<Scalar>(views.q, w_q, b_q, x, "q view");
    require_linear_close<Scalar>(views.k, w_k, b_k, x, "k view");
    require_linear_close<Scalar>(views.v, w_v, b_v, x, "v view");
    mat<Scalar> k_separate(qk, tokens);
    mha::linear(w_k, b_k, x, k_separate);
    require_linear_close(k_separate, w_k, b_k, x, "separate k");

    // Writing through a view changes qkv.
    views.v(1, 2) = Scalar(-77);
    CHECK(qkv(2 * qk + 1, 2) == Scalar(-77));
}

TEST_CASE("split_qkv: error messages", "[projection]") {
    mat<float> qkv = mat<float>::Zero(16, 3);
    REQUIRE_NOTHROW(mha::split_qkv(qkv, 6, 4));
    REQUIRE_THROWS_AS(mha::split_qkv(qkv, 6, 3), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::split_qkv(qkv, 6, 3),
                        Equals("mha::split_qkv: qkv.rows() must be 15 (2*qk_width + v_width), "
                               "got 16"));
    REQUIRE_THROWS_AS(mha::split_qkv(qkv, -1, 18), mha::value_error);
    REQUIRE_THROWS_WITH(mha::split_qkv(qkv, -1, 18),
                        Equals("mha::split_qkv: qk_width must be >= 0, got -1"));
    REQUIRE_THROWS_WITH(mha::split_qkv(qkv, 9, -2),
                        Equals("mha::split_qkv: v_width must be >= 0, got -2"));
}
