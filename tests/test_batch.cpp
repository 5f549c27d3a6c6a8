// SPDX-License-Identifier: MIT
// packed_batch of batch.hpp: lengths, offsets and totals of packed sequences, and validation.
#include <vector>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/batch.hpp>

#include "reference.hpp"

using Catch::Matchers::Equals;
using mha::Index;

TEST_CASE("packed_batch::single is one sequence", "[batch]") {
    const auto batch = mha::packed_batch::single(3, 5);
    CHECK(batch.size() == 1);
    CHECK(batch.query_length(0) == 3);
    CHECK(batch.key_length(0) == 5);
    CHECK(batch.query_offset(0) == 0);
    CHECK(batch.key_offset(0) == 0);
    CHECK(batch.total_queries() == 3);
    CHECK(batch.total_keys() == 5);
}

TEST_CASE("packed_batch: self-attention offsets are running sums of the lengths", "[batch]") {
    // Sequences of 3, 0 and 4 tokens: columns [0, 3), [3, 3) and [3, 7).
    const mha::packed_batch batch(std::vector<Index>{3, 0, 4});
    REQUIRE(batch.size() == 3);
    CHECK(batch.query_lengths() == std::vector<Index>{3, 0, 4});
    CHECK(batch.key_lengths() == std::vector<Index>{3, 0, 4});
    CHECK(batch.query_offset(0) == 0);
    CHECK(batch.query_offset(1) == 3);
    CHECK(batch.query_offset(2) == 3);
    CHECK(batch.key_offset(2) == 3);
    CHECK(batch.total_queries() == 7);
    CHECK(batch.total_keys() == 7);
}

TEST_CASE("packed_batch: cross-attention keeps query and key columns apart", "[batch]") {
    // Queries 2, 1, 4; keys 5, 0, 3: query columns [0,2) [2,3) [3,7); key columns [0,5) [5,5)
    // [5,8).
    const mha::packed_batch batch({2, 1, 4}, {5, 0, 3});
    CHECK(batch.query_offset(1) == 2);
    CHECK(batch.query_offset(2) == 3);
    CHECK(batch.key_offset(1) == 5);
    CHECK(batch.key_offset(2) == 5);
    CHECK(batch.total_queries() == 7);
    CHECK(batch.total_keys() == 8);

    // Random lengths: offsets partition the columns without gaps or overlaps.
    mha_test::value_source source(9);
    std::vector<Index> queries, keys;
    for (int b = 0; b < 20; ++b) {
        queries.push_back(static_cast<Index>(source.next() % 6));
        keys.push_back(static_cast<Index>(source.next() % 9));
    }
    const mha::packed_batch random(queries, keys);
    Index query_end = 0, key_end = 0;
    for (Index b = 0; b < random.size(); ++b) {
        CHECK(random.query_offset(b) == query_end);
        CHECK(random.key_offset(b) == key_end);
        query_end += random.query_length(b);
        key_end += random.key_length(b);
    }
    CHECK(random.total_queries() == query_end);
    CHECK(random.total_keys() == key_end);
}

TEST_CASE("packed_batch: an empty batch is valid", "[batch]") {
    const mha::packed_batch batch(std::vector<Index>{});
    CHECK(batch.size() == 0);
    CHECK(batch.total_queries() == 0);
    CHECK(batch.total_keys() == 0);
}

TEST_CASE("packed_batch: error messages", "[batch]") {
    REQUIRE_THROWS_AS(mha::packed_batch({1, 2}, {1, 2, 3}), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::packed_batch({1, 2}, {1, 2, 3}),
                        Equals("mha::packed_batch: key_lengths.size() must be 2 "
                               "(query_lengths.size()), got 3"));
    REQUIRE_THROWS_AS(mha::packed_batch(std::vector<Index>{4, -1}), mha::value_error);
    REQUIRE_THROWS_WITH(mha::packed_batch(std::vector<Index>{4, -1}),
                        Equals("mha::packed_batch: query_lengths[1] must be >= 0, got -1"));
    REQUIRE_THROWS_WITH(mha::packed_batch({4, 1}, {2, -3}),
                        Equals("mha::packed_batch: key_lengths[1] must be >= 0, got -3"));
    REQUIRE_THROWS_AS(mha::packed_batch::single(-2, 3), mha::value_error);
}
