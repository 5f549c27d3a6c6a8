// SPDX-License-Identifier: MIT
// Error types and the message format every check in the library uses.
#include <type_traits>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/core.hpp>

using Catch::Matchers::Equals;

TEST_CASE("error types derive from std::invalid_argument", "[config]") {
    STATIC_REQUIRE(std::is_base_of_v<std::invalid_argument, mha::invalid_argument>);
    STATIC_REQUIRE(std::is_base_of_v<mha::invalid_argument, mha::shape_error>);
    STATIC_REQUIRE(std::is_base_of_v<mha::invalid_argument, mha::value_error>);
}

TEST_CASE("check_size names the argument, the expected and the actual value", "[config]") {
    REQUIRE_NOTHROW(mha::detail::check_size("f", "x.rows()", 3, 3));
    REQUIRE_THROWS_AS(mha::detail::check_size("f", "x.rows()", 3, 4), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::detail::check_size("mha::f", "x.rows()", 3, 4, "w.cols()"),
                        Equals("mha::f: x.rows() must be 3 (w.cols()), got 4"));
    REQUIRE_THROWS_WITH(mha::detail::check_size("mha::f", "x.rows()", 3, 4),
                        Equals("mha::f: x.rows() must be 3, got 4"));
}

TEST_CASE("fail raises the requested exception type", "[config]") {
    REQUIRE_THROWS_AS(mha::detail::fail<mha::value_error>("w", "a", ">= 0", -1), mha::value_error);
    REQUIRE_THROWS_WITH(mha::detail::fail<mha::value_error>("w", "a", ">= 0", -1),
                        Equals("w: a must be >= 0, got -1"));
}

TEST_CASE("matrix aliases are column-major whatever the build's default", "[config]") {
    STATIC_REQUIRE(!mha::matrix<float>::IsRowMajor);
    STATIC_REQUIRE(!mha::bool_matrix::IsRowMajor);
}
