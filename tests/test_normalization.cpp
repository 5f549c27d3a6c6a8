// SPDX-License-Identifier: MIT
// Column normalisations of normalization.hpp: softmax, ReLU-normalised and sigmoid, on whole
// matrices, blocks and Maps, including −∞ (excluded keys), NaN, huge logits and empty inputs.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/normalization.hpp>

#include "check.hpp"
#include "reference.hpp"

using mha::Index;
using mha_test::mat;
using mha_test::max_abs_diff;
using mha_test::unit_roundoff;

namespace {

template <class Scalar>
constexpr Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();

template <class Scalar>
constexpr Scalar quiet_nan = std::numeric_limits<Scalar>::quiet_NaN();

/// The long-double reference normalisation of every column of `scores` (all keys allowed unless
/// the score is −∞, which is how the library marks an excluded key).
template <class Scalar>
mat<long double> reference_columns(const mat<Scalar>& scores, mha_test::norm_kind kind) {
    mat<long double> out(scores.rows(), scores.cols());
    for (Index i = 0; i < scores.cols(); ++i) {
        std::vector<long double> s(static_cast<std::size_t>(scores.rows()));
        std::vector<bool> ok(s.size());
        for (Index j = 0; j < scores.rows(); ++j) {
            s[static_cast<std::size_t>(j)] = scores(j, i);
            ok[static_cast<std::size_t>(j)] = scores(j, i) != minus_inf<Scalar>;
        }
        mha_test::reference_normalize(s, ok, kind);
        for (Index j = 0; j < scores.rows(); ++j)
            out(j, i) = s[static_cast<std::size_t>(j)];
    }
    return out;
}

/// Error bound of a max-subtracted softmax over a column of n scores, as an absolute error on
/// weights ≤ 1: exp (≤ 2u) + rounding of s − m (u·|s − m| relative, times a weight e^-|s-m| ≤
/// 1/e) + an n-term sum ((n − 1)·u) + reciprocal and product (2u) ≤ (n + 4)·u; doubled as margin.
template <class Scalar>
long double softmax_bound(Index n) {
    return 2 * static_cast<long double>(n + 4) * unit_roundoff<Scalar>();
}

/// ReLU normalisation: an n-term sum ((n − 1)·u) + reciprocal and product (2u) ≤ (n + 1)·u on
/// weights ≤ 1; doubled as margin.
template <class Scalar>
long double relu_bound(Index n) {
    return 2 * static_cast<long double>(n + 1) * unit_roundoff<Scalar>();
}

}  // namespace

TEMPLATE_TEST_CASE("softmax_columns: worked example", "[softmax]", float, double) {
    using Scalar = TestType;
    // Column 0 holds [0, ln 3, −∞]: exp gives [1, 3, 0], the sum is 4, weights [1/4, 3/4, 0].
    // Column 1 holds [ln 2, 0, ln 5]: exp gives [2, 1, 5], the sum is 8, weights [1/4, 1/8, 5/8].
    mat<Scalar> scores(3, 2);
    scores << 0, static_cast<Scalar>(std::log(2.0L)),  //
        static_cast<Scalar>(std::log(3.0L)), 0,        //
        minus_inf<Scalar>, static_cast<Scalar>(std::log(5.0L));
    mat<long double> expected(3, 2);
    expected << 0.25L, 0.25L,  //
        0.75L, 0.125L,         //
        0.0L, 0.625L;

    mha::softmax_columns(scores);

    // Rounding ln 3 and ln 5 to Scalar (≤ 1.7u relative in the exp's result), exp (≤ 2u), a
    // 3-term sum, reciprocal and product: about 8u in all on weights ≤ 1; 16u is twice that.
    CHECK(max_abs_diff(scores, expected) <= 16 * unit_roundoff<Scalar>());
    CHECK(scores(2, 0) == Scalar(0));  // an excluded key gets exactly 0, not a tiny number
}

TEMPLATE_TEST_CASE("softmax_columns: matches the long-double reference and sums to 1", "[softmax]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source source(101);
    for (const Index rows : {1, 2, 7, 17, 64, 129}) {
        CAPTURE(rows);
        const mat<Scalar> scores = source.normal_matrix<Scalar>(rows, 5, 3.0);
        mat<Scalar> weights = scores;
        mha::softmax_columns(weights);
        const mat<long double> ref = reference_columns(scores, mha_test::norm_kind::softmax);
        CHECK(max_abs_diff(weights, ref) <= softmax_bound<Scalar>(rows));
        for (Index i = 0; i < weights.cols(); ++i) {
            long double sum = 0;
            for (Index j = 0; j < rows; ++j) {
                CHECK(weights(j, i) > Scalar(0));
                sum += weights(j, i);
            }
            // Each weight is within softmax_bound of its exact value, relative to its size
            // (the bound's terms are all relative to w), so the sum is within it of 1.
            CHECK(std::fabs(sum - 1.0L) <= softmax_bound<Scalar>(rows));
        }
    }
}

TEMPLATE_TEST_CASE("softmax_columns: adding a constant to a column changes nothing", "[softmax]",
                   float, double) {
    using Scalar = TestType;
    // Scores are multiples of 1/8 in [-4, 4] and the shift is 1024, so every s + c and every
    // (s + c) − (m + c) is exact in float and double: the weights must be bitwise identical.
    mha_test::value_source source(7);
    mat<Scalar> scores(9, 4);
    for (Index i = 0; i < scores.cols(); ++i)
        for (Index j = 0; j < scores.rows(); ++j)
            scores(j, i) = static_cast<Scalar>(std::round(source.uniform(-32, 32)) / 8);
    mat<Scalar> shifted = scores;
    shifted.col(1).array() += Scalar(1024);
    shifted.col(3).array() -= Scalar(1024);
    mha::softmax_columns(scores);
    mha::softmax_columns(shifted);
    CHECK(shifted == scores);
}

TEMPLATE_TEST_CASE("softmax_columns: huge logits neither overflow nor lose the answer", "[softmax]",
                   float, double) {
    using Scalar = TestType;
    const Scalar big = std::numeric_limits<Scalar>::max();
    mat<Scalar> scores(3, 5);
    scores << Scalar(1e4), Scalar(1e30), Scalar(-1e30), big, Scalar(-1e4),  //
        Scalar(-1e4), Scalar(0), Scalar(-1e30), -big, Scalar(-1e4),         //
        Scalar(1e4), Scalar(1e30), minus_inf<Scalar>, big, Scalar(-1e4) + Scalar(1);
    // exp(1e4) or exp(1e30) would overflow; after subtracting the column max the exponents are
    // 0 or hugely negative, so each column is a set of equal winners sharing weight 1.
    mat<long double> expected(3, 5);
    expected << 0.5L, 0.5L, 0.5L, 0.5L, 0.0L,  //
        0.0L, 0.0L, 0.5L, 0.0L, 0.0L,          //
        0.5L, 0.5L, 0.0L, 0.5L, 0.0L;
    // Column 4 is [-1e4, -1e4, -9999] (exact in float and double): the last entry beats each
    // of the others by a factor e, so the weights are [1, 1, e] / (2 + e).
    const long double e = std::exp(1.0L);
    expected(0, 4) = expected(1, 4) = 1 / (2 + e);
    expected(2, 4) = e / (2 + e);
    mha::softmax_columns(scores);
    CHECK(scores.allFinite());
    // The same few roundings as the worked example (a 3-term column): 16u.
    CHECK(max_abs_diff(scores, expected) <= 16 * unit_roundoff<Scalar>());
}

TEMPLATE_TEST_CASE("softmax_columns: excluded keys, empty columns and empty matrices", "[softmax]",
                   float, double) {
    using Scalar = TestType;
    SECTION("−∞ entries get exactly 0") {
        mha_test::value_source source(3);
        mat<Scalar> scores = source.normal_matrix<Scalar>(6, 3);
        scores(1, 0) = scores(5, 0) = scores(0, 2) = minus_inf<Scalar>;
        mha::softmax_columns(scores);
        CHECK(scores(1, 0) == Scalar(0));
        CHECK(scores(5, 0) == Scalar(0));
        CHECK(scores(0, 2) == Scalar(0));
        CHECK(scores.col(1).minCoeff() > Scalar(0));
    }
    SECTION("a column of only −∞ becomes 0, not NaN") {
        mat<Scalar> scores(4, 2);
        scores.col(0).setConstant(minus_inf<Scalar>);
        scores.col(1) << 1, 2, 3, 4;
        mha::softmax_columns(scores);
        CHECK(scores.col(0).isZero(0));
        CHECK(scores.col(1).allFinite());
        CHECK(scores.col(1).minCoeff() > Scalar(0));
    }
    SECTION("no keys (0 rows) and no queries (0 columns) are valid") {
        mat<Scalar> no_keys(0, 3);
        mat<Scalar> no_queries(4, 0);
        mha::softmax_columns(no_keys);
        mha::softmax_columns(no_queries);
        CHECK(no_keys.rows() == 0);
        CHECK(no_keys.cols() == 3);
        CHECK(no_queries.size() == 0);
    }
}

TEMPLATE_TEST_CASE("normalisations: NaN in a score turns its column NaN and no other", "[softmax]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source source(11);
    const mat<Scalar> clean = source.normal_matrix<Scalar>(5, 3);
    mat<Scalar> poisoned = clean;
    poisoned(2, 1) = quiet_nan<Scalar>;
    poisoned(4, 1) = minus_inf<Scalar>;  // even an excluded key of that column: the NaN wins

    // Sigmoid is per element, so only the NaN entry itself is NaN.
    for (const auto kind : {mha::normalization::softmax, mha::normalization::relu}) {
        CAPTURE(mha::to_string(kind));
        mat<Scalar> weights = poisoned;
        mat<Scalar> expected = clean;
        mha::normalize_columns(weights, kind);
        mha::normalize_columns(expected, kind);
        CHECK(weights.col(1).array().isNaN().all());
        // The other columns went through the same code on the same values: bitwise equal.
        CHECK(weights.col(0) == expected.col(0));
        CHECK(weights.col(2) == expected.col(2));
    }
    mat<Scalar> sig = poisoned;
    mha::sigmoid_columns(sig);
    CHECK(std::isnan(sig(2, 1)));
    CHECK(sig(4, 1) == Scalar(0));
    CHECK(sig.col(0).allFinite());
    CHECK(std::isfinite(sig(0, 1)));
}

TEMPLATE_TEST_CASE("softmax_columns: works in place on blocks and Maps, writing only them",
                   "[softmax]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(5);
    const mat<Scalar> values = source.normal_matrix<Scalar>(4, 3, 2.0);
    const mat<long double> ref = reference_columns(values, mha_test::norm_kind::softmax);
    const Scalar sentinel(7.5);

    SECTION("block of a larger matrix") {
        mat<Scalar> big = mat<Scalar>::Constant(9, 7, sentinel);
        big.block(2, 3, 4, 3) = values;
        mha::softmax_columns(big.block(2, 3, 4, 3));
        CHECK(max_abs_diff(big.block(2, 3, 4, 3), ref) <= softmax_bound<Scalar>(4));
        big.block(2, 3, 4, 3).setConstant(sentinel);
        CHECK((big.array() == sentinel).all());
    }
    SECTION("Map with an outer stride over a raw buffer") {
        std::vector<Scalar> buffer(6 * 3, sentinel);  // columns of 6, of which 4 are used
        using strided_map = Eigen::Map<mat<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
        strided_map view(buffer.data() + 1, 4, 3, Eigen::OuterStride<>(6));
        view = values;
        mha::softmax_columns(view);
        CHECK(max_abs_diff(view, ref) <= softmax_bound<Scalar>(4));
        for (Index c = 0; c < 3; ++c) {
            CHECK(buffer[static_cast<std::size_t>(6 * c)] == sentinel);
            CHECK(buffer[static_cast<std::size_t>(6 * c + 5)] == sentinel);
        }
    }
}

TEMPLATE_TEST_CASE("relu_normalize_columns: worked example and reference", "[softmax]", float,
                   double) {
    using Scalar = TestType;
    // Column 0: [-1, 0, -3] has no positive score, so every weight is 0 (not NaN from 0/0).
    // Column 1: [2, -1, 6] → ReLU [2, 0, 6], sum 8 → [1/4, 0, 3/4].
    // Column 2: [1, −∞, 1] → ReLU [1, 0, 1], sum 2 → [1/2, 0, 1/2].
    mat<Scalar> scores(3, 3);
    scores << -1, 2, 1,  //
        0, -1, minus_inf<Scalar>, -3, 6, 1;
    mha::relu_normalize_columns(scores);
    mat<Scalar> expected(3, 3);
    expected << 0, 0.25, 0.5,  //
        0, 0, 0,               //
        0, 0.75, 0.5;
    // Every step is exact here (sums of small integers, reciprocals of powers of two).
    CHECK(scores == expected);

    mha_test::value_source source(17);
    for (const Index rows : {1, 3, 17, 65}) {
        CAPTURE(rows);
        const mat<Scalar> random = source.normal_matrix<Scalar>(rows, 6);
        mat<Scalar> weights = random;
        mha::relu_normalize_columns(weights);
        CHECK(max_abs_diff(weights, reference_columns(random, mha_test::norm_kind::relu)) <=
              relu_bound<Scalar>(rows));
    }
}

TEMPLATE_TEST_CASE("sigmoid_columns: logistic function per element", "[softmax]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(23);
    mat<Scalar> scores = source.normal_matrix<Scalar>(7, 4, 4.0);
    scores(0, 0) = 0;
    scores(1, 0) = Scalar(1e4);
    scores(2, 0) = Scalar(-1e4);
    scores(3, 0) = minus_inf<Scalar>;
    scores(4, 0) = static_cast<Scalar>(std::log(3.0L));
    const mat<Scalar> input = scores;
    mha::sigmoid_columns(scores);

    CHECK(scores(0, 0) == Scalar(0.5));  // 1 / (1 + e^0), exact
    CHECK(scores(1, 0) == Scalar(1));    // 1 / (1 + e^-1e4) rounds to 1
    CHECK(scores(2, 0) == Scalar(0));    // e^1e4 overflows to +inf, 1 / inf = 0: no NaN
    CHECK(scores(3, 0) == Scalar(0));    // an excluded key
    // 1 / (1 + 1/3) = 3/4, up to the rounding of ln 3 (≤ u·ln 3·σ' ≤ u) and 3 more roundings.
    CHECK(std::fabs(scores(4, 0) - 0.75L) <= 4 * unit_roundoff<Scalar>());
    // Not normalised across keys: a column of sigmoids does not sum to 1 in general.
    CHECK(std::fabs(scores.col(1).template cast<long double>().sum() - 1.0L) > 0.01L);
    for (Index i = 0; i < scores.cols(); ++i)
        for (Index j = 0; j < scores.rows(); ++j) {
            if (input(j, i) == minus_inf<Scalar>) continue;
            const long double exact =
                1.0L / (1.0L + std::exp(-static_cast<long double>(input(j, i))));
            // exp (≤ 1 ulp, relative u on e^-s whose effect on σ is ≤ u/4), 1 + e (u), the
            // division (u): ≤ 2.25u relative on σ ≤ 1; 4u as absolute margin.
            CHECK(std::fabs(scores(j, i) - exact) <= 4 * unit_roundoff<Scalar>());
        }
}

TEMPLATE_TEST_CASE("normalize_columns dispatches on the kind", "[softmax]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(29);
    // Some scores negative, so the three normalisations give three different results.
    const mat<Scalar> scores = source.normal_matrix<Scalar>(5, 4);
    mat<Scalar> by_softmax = scores, by_relu = scores, by_sigmoid = scores;
    mha::softmax_columns(by_softmax);
    mha::relu_normalize_columns(by_relu);
    mha::sigmoid_columns(by_sigmoid);
    REQUIRE(by_softmax != by_relu);
    REQUIRE(by_relu != by_sigmoid);
    REQUIRE(by_softmax != by_sigmoid);

    mat<Scalar> dispatched = scores;
    mha::normalize_columns(dispatched, mha::normalization::softmax);
    CHECK(dispatched == by_softmax);
    dispatched = scores;
    mha::normalize_columns(dispatched, mha::normalization::relu);
    CHECK(dispatched == by_relu);
    dispatched = scores;
    mha::normalize_columns(dispatched, mha::normalization::sigmoid);
    CHECK(dispatched == by_sigmoid);

    dispatched = scores;
    REQUIRE_THROWS_AS(mha::normalize_columns(dispatched, static_cast<mha::normalization>(7)),
                      mha::value_error);
    REQUIRE_THROWS_WITH(
        mha::normalize_columns(dispatched, static_cast<mha::normalization>(7)),
        Catch::Matchers::Equals("mha::normalize_columns: kind must be softmax, relu or sigmoid, "
                                "got 7"));
}

TEST_CASE("to_string names each normalisation", "[softmax]") {
    CHECK(std::string(mha::to_string(mha::normalization::softmax)) == "softmax");
    CHECK(std::string(mha::to_string(mha::normalization::relu)) == "relu");
    CHECK(std::string(mha::to_string(mha::normalization::sigmoid)) == "sigmoid");
}
