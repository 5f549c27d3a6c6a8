// SPDX-License-Identifier: MIT
// Heads (mha/projection.hpp): head_view is a writable view into the stacked matrix, concat_heads
// stacks by rows, the output projection (linear) against the reference (check B), and error
// messages.
#include <string>
#include <type_traits>
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

TEMPLATE_TEST_CASE("head_view is a view of rows [h·d, (h+1)·d)", "[heads]", float, double) {
    using Scalar = TestType;
    const Index heads = 4, d = 3, tokens = 5;
    mha_test::value_source source(1);
    mat<Scalar> stacked = source.normal_matrix<Scalar>(heads * d, tokens);
    const mat<Scalar> original = stacked;
    for (Index h = 0; h < heads; ++h) {
        CAPTURE(h);
        auto view = mha::head_view(stacked, h, heads);
        CHECK(view.rows() == d);
        CHECK(view.cols() == tokens);
        // Inside the parent's storage, at row h·d, with the parent's column stride.
        CHECK(view.data() == stacked.data() + h * d);
        CHECK(view.outerStride() == stacked.rows());
        CHECK(view == original.middleRows(h * d, d));
        // Writes go through to the parent, and only to the head's rows.
        view(d - 1, tokens - 1) = Scalar(1000 + h);
        CHECK(stacked(h * d + d - 1, tokens - 1) == Scalar(1000 + h));
    }
    mat<Scalar> expected = original;
    for (Index h = 0; h < heads; ++h)
        expected(h * d + d - 1, tokens - 1) = Scalar(1000 + h);
    CHECK(stacked == expected);

    // The const overload gives a read-only view of the same storage.
    const mat<Scalar>& read_only = stacked;
    auto const_view = mha::head_view(read_only, 2, heads);
    STATIC_REQUIRE(std::is_const_v<std::remove_pointer_t<decltype(const_view.data())>>);
    CHECK(const_view.data() == stacked.data() + 2 * d);
}

TEST_CASE("head_view: error messages", "[heads]") {
    mat<double> stacked = mat<double>::Zero(10, 2);
    REQUIRE_NOTHROW(mha::head_view(stacked, 4, 5));
    REQUIRE_THROWS_AS(mha::head_view(stacked, 0, 0), mha::value_error);
    REQUIRE_THROWS_WITH(mha::head_view(stacked, 0, 0),
                        Equals("mha::head_view: num_heads must be >= 1, got 0"));
    REQUIRE_THROWS_AS(mha::head_view(stacked, 0, 4), mha::shape_error);
    REQUIRE_THROWS_WITH(
        mha::head_view(stacked, 0, 4),
        Equals("mha::head_view: rows() must be a multiple of num_heads = 4, got 10"));
    REQUIRE_THROWS_AS(mha::head_view(stacked, 5, 5), mha::value_error);
    REQUIRE_THROWS_WITH(mha::head_view(stacked, 5, 5),
                        Equals("mha::head_view: h must be in [0, 5), got 5"));
    REQUIRE_THROWS_WITH(mha::head_view(stacked, -1, 5),
                        Equals("mha::head_view: h must be in [0, 5), got -1"));
}

TEMPLATE_TEST_CASE("concat_heads stacks heads by rows", "[heads]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(2);
    // Heads of different widths are allowed (each keeps its own rows).
    const std::vector<mat<Scalar>> heads = {source.normal_matrix<Scalar>(2, 5),
                                            source.normal_matrix<Scalar>(3, 5),
                                            source.normal_matrix<Scalar>(1, 5)};
    const mat<Scalar> stacked = mha::concat_heads(heads);
    REQUIRE(stacked.rows() == 6);
    REQUIRE(stacked.cols() == 5);
    // A copy, so bitwise equal.
    CHECK(stacked.topRows(2) == heads[0]);
    CHECK(stacked.middleRows(2, 3) == heads[1]);
    CHECK(stacked.bottomRows(1) == heads[2]);

    // Splitting with head_view and concatenating again is the identity.
    mat<Scalar> uniform = source.normal_matrix<Scalar>(12, 4);
    std::vector<mat<Scalar>> split;
    for (Index h = 0; h < 3; ++h)
        split.emplace_back(mha::head_view(uniform, h, 3));
    CHECK(mha::concat_heads(split) == uniform);

    const mat<Scalar> none = mha::concat_heads(std::vector<mat<Scalar>>{});
    CHECK(none.size() == 0);
}

TEST_CASE("concat_heads: error messages", "[heads]") {
    const std::vector<mat<float>> heads = {mat<float>::Zero(2, 5), mat<float>::Zero(2, 4)};
    REQUIRE_THROWS_AS(mha::concat_heads(heads), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::concat_heads(heads),
                        Equals("mha::concat_heads: heads[1].cols() must be 5 (heads[0].cols()), "
                               "got 4"));
}

TEMPLATE_TEST_CASE(
    "output projection: linear(W_o, b_o, heads) = W_o·heads + b_o against the reference", "[heads]",
    float, double) {
    using Scalar = TestType;
    const Index embed = 8, heads = 3, dv = 5, tokens = 7;
    const bool with_bias = GENERATE(true, false);
    CAPTURE(with_bias);
    mha_test::value_source source(3);
    const mat<Scalar> w_o = source.normal_matrix<Scalar>(embed, heads * dv);
    const vec<Scalar> b_o =
        with_bias ? vec<Scalar>(source.normal_matrix<Scalar>(embed, 1)) : vec<Scalar>();
    mat<Scalar> concatenated = source.normal_matrix<Scalar>(heads * dv, tokens);
    mat<Scalar> out(embed, tokens);
    mha::linear(w_o, b_o, concatenated, out);
    // The a-priori dot-product bound of check.hpp (check G): holds for any summation order.
    mha_test::require_linear_within_bound(out, w_o, b_o, concatenated, "output projection");

    // It reads the heads' rows in order: swapping two heads' blocks changes the result.
    mat<Scalar> swapped = concatenated;
    swapped.topRows(dv).swap(swapped.middleRows(dv, dv));
    mat<Scalar> out_swapped(embed, tokens);
    mha::linear(w_o, b_o, swapped, out_swapped);
    CHECK(out_swapped != out);

    REQUIRE_THROWS_AS(mha::linear(w_o, b_o, mat<Scalar>::Zero(heads * dv - 1, tokens), out),
                      mha::shape_error);
    REQUIRE_THROWS_WITH(mha::linear(w_o, b_o, mat<Scalar>::Zero(heads * dv - 1, tokens), out),
                        Equals("mha::linear: x.rows() must be 15 (w.cols()), got 14"));
}
