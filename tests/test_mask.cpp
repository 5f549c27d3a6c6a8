// SPDX-License-Identifier: MIT
// Mask types of mask.hpp, as kernels see them through detail/mask_view.hpp: the keys each
// positional mask allows (checked against explicit index
// formulas), composition, per-sequence / per-head broadcasting, and validation messages.
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/detail/mask_view.hpp>
#include <mha/mask.hpp>

using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::Equals;
using mha::Index;

namespace {

using predicate = std::function<bool(Index j, Index i)>;

/// What a kernel sees of `mask` for sequence b, head h of a batch of num_sequences sequences
/// of lq queries and lk keys (detail::mask_view), kept together with the views it refers to.
template <class Scalar>
class mask_slice {
public:
    mask_slice(const mha::attention_mask<Scalar>& mask, Index b, Index h, Index num_sequences,
               Index num_heads, Index lq, Index lk)
        : batch_(std::vector<Index>(static_cast<std::size_t>(num_sequences), lq),
                 std::vector<Index>(static_cast<std::size_t>(num_sequences), lk)),
          b_(b),
          h_(h) {
        views_.build(mask, num_heads, batch_);
    }
    mask_slice(const mask_slice&) = delete;
    mask_slice& operator=(const mask_slice&) = delete;

    std::pair<Index, Index> key_range(Index i) const { return view().key_range(i); }
    bool allows(Index j, Index i) const { return view().allows(j, i); }
    bool keeps(Index j, Index i) const { return view().keeps(j, i); }
    Scalar bias(Index j, Index i) const { return view().bias(j, i); }
    bool has_keep() const { return view().has_keep(); }
    bool is_unmasked() const { return view().is_unmasked(); }

private:
    const mha::detail::mask_view<Scalar>& view() const { return views_(b_, h_); }
    mha::packed_batch batch_;
    Index b_, h_;
    mha::detail::mask_views<Scalar> views_;
};

/// Requires that the slice allows exactly the (key j, query i) pairs of `expected`, and that
/// its key_range(i) is a valid contiguous range inside [0, Lk) covering the allowed keys.
void require_allows_exactly(const mask_slice<double>& slice, Index lq, Index lk,
                            const predicate& expected) {
    for (Index i = 0; i < lq; ++i) {
        const auto range = slice.key_range(i);
        CAPTURE(lq, lk, i, range.first, range.second);
        REQUIRE(0 <= range.first);
        REQUIRE(range.first <= range.second);
        REQUIRE(range.second <= lk);
        for (Index j = 0; j < lk; ++j) {
            CAPTURE(j);
            REQUIRE(slice.allows(j, i) == expected(j, i));
            if (!slice.has_keep())
                REQUIRE((range.first <= j && j < range.second) == expected(j, i));
        }
    }
}

mask_slice<double> slice_of(const mha::attention_mask<double>& mask, Index lq, Index lk) {
    return {mask, 0, 0, 1, 1, lq, lk};
}

// (Lq, Lk) pairs: equal, fewer queries than keys (decode / chunked prefill) and more queries than
// keys (where bottom-right causal leaves the first queries with no key at all).
const std::vector<std::pair<Index, Index>> shapes = {{1, 1}, {4, 4}, {3, 7}, {1, 5},
                                                     {7, 3}, {5, 1}, {0, 3}, {3, 0}};

}  // namespace

TEST_CASE("causal bottom-right: query i sees keys j <= i + Lk - Lq", "[mask]") {
    for (const auto& shape : shapes) {
        // Plain names, not a structured binding: clang 14 cannot capture bindings in lambdas.
        const Index lq = shape.first, lk = shape.second;
        const mha::attention_mask<double> mask(mha::causal{});  // bottom-right is the default
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk,
                               [&](Index j, Index i) { return j <= i + lk - lq; });
    }
    // The two properties the alignment exists for, stated directly.
    const mha::attention_mask<double> mask(mha::causal{mha::causal_alignment::bottom_right});
    const auto decode = slice_of(mask, 1, 5);  // one new query over a cache of 5 keys
    CHECK(decode.key_range(0) == std::pair<Index, Index>{0, 5});
    const auto more_queries = slice_of(mask, 7, 3);  // queries 0..3 see no key at all
    for (Index i = 0; i < 4; ++i)
        CHECK(more_queries.key_range(i).first == more_queries.key_range(i).second);
    CHECK(more_queries.key_range(4) == std::pair<Index, Index>{0, 1});
    CHECK(more_queries.key_range(6) == std::pair<Index, Index>{0, 3});
}

TEST_CASE("causal top-left: query i sees keys j <= i", "[mask]") {
    const mha::attention_mask<double> mask(mha::causal{mha::causal_alignment::top_left});
    for (const auto& [lq, lk] : shapes)
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk,
                               [](Index j, Index i) { return j <= i; });
    CHECK(slice_of(mask, 1, 5).key_range(0) == std::pair<Index, Index>{0, 1});
}

TEST_CASE("sliding_window{left, right}: keys within the window around the aligned position",
          "[mask]") {
    const auto alignment =
        GENERATE(mha::causal_alignment::bottom_right, mha::causal_alignment::top_left);
    const bool bottom_right = alignment == mha::causal_alignment::bottom_right;
    for (const auto& window :
         std::vector<std::pair<Index, Index>>{{0, 0}, {2, 0}, {0, 2}, {1, 3}, {100, 100}}) {
        const Index left = window.first, right = window.second;
        const mha::attention_mask<double> mask(mha::sliding_window{left, right, alignment});
        for (const auto& shape : shapes) {
            const Index lq = shape.first, lk = shape.second;
            CAPTURE(bottom_right, left, right);
            require_allows_exactly(slice_of(mask, lq, lk), lq, lk, [&](Index j, Index i) {
                const Index c = i + (bottom_right ? lk - lq : 0);
                return c - left <= j && j <= c + right;
            });
        }
    }
}

TEST_CASE("key_lengths: sequence b sees its first lengths[b] keys", "[mask]") {
    const mha::attention_mask<double> mask(mha::key_lengths{{0, 3, 6}});
    const std::vector<Index> limit = {0, 3, 6};
    for (Index b = 0; b < 3; ++b) {
        const auto slice = mask_slice(mask, b, 0, 3, 1, 4, 6);
        require_allows_exactly(slice, 4, 6, [&](Index j, Index) { return j < limit[b]; });
    }
    // A length equal to the key count masks nothing.
    CHECK(mask_slice(mask, 2, 0, 3, 1, 4, 6).is_unmasked());
    CHECK_FALSE(mask_slice(mask, 1, 0, 3, 1, 4, 6).is_unmasked());
}

TEST_CASE("masks compose by intersection", "[mask]") {
    const Index lq = 5, lk = 8;
    const auto causal_br = [&](Index j, Index i) { return j <= i + lk - lq; };
    mha::bool_matrix keep(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            keep(j, i) = (i + 2 * j) % 3 != 0;

    SECTION("constructor with several masks") {
        const mha::attention_mask<double> mask(mha::causal{}, mha::key_lengths{{6}});
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk,
                               [&](Index j, Index i) { return causal_br(j, i) && j < 6; });
    }
    SECTION("operator& with masks and with another mask set") {
        const auto mask = mha::attention_mask<double>(mha::causal{}) & mha::sliding_window{2, 0} &
                          mha::attention_mask<double>(mha::keep_mask(keep));
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk, [&](Index j, Index i) {
            return causal_br(j, i) && j >= i + lk - lq - 2 && keep(j, i);
        });
    }
    SECTION("two windows intersect") {
        auto mask = mha::attention_mask<double>(mha::sliding_window{3, 3});
        mask.add(mha::sliding_window{1, 4});
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk, [&](Index j, Index i) {
            const Index c = i + lk - lq;
            return c - 1 <= j && j <= c + 3;
        });
    }
    SECTION("two keep masks and two biases") {
        mha::bool_matrix keep2 = mha::bool_matrix::Constant(lk, lq, true);
        keep2(7, 4) = false;
        keep2(0, 0) = false;
        mha::matrix<double> bias1 = mha::matrix<double>::Constant(lk, lq, 0.5);
        mha::matrix<double> bias2 = mha::matrix<double>::Constant(lk, lq, 0.25);
        bias2(3, 2) = -4;
        const mha::attention_mask<double> mask{mha::keep_mask(keep), mha::keep_mask(keep2),
                                               mha::additive_bias<double>(bias1),
                                               mha::additive_bias<double>(bias2)};
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk,
                               [&](Index j, Index i) { return keep(j, i) && keep2(j, i); });
        const auto slice = slice_of(mask, lq, lk);
        CHECK(slice.bias(3, 2) == -3.5);  // 0.5 + (-4): biases add up
        CHECK(slice.bias(0, 0) == 0.75);
    }
    SECTION("the same causal alignment twice is one causal mask") {
        const mha::attention_mask<double> mask(mha::causal{}, mha::causal{});
        require_allows_exactly(slice_of(mask, lq, lk), lq, lk, causal_br);
    }
}

TEST_CASE("attention_mask reports what it holds", "[mask]") {
    const mha::attention_mask<float> none;
    CHECK(none.empty());
    CHECK_FALSE(none.has_elementwise());
    CHECK(mask_slice(none, 0, 0, 1, 1, 3, 4).is_unmasked());

    const mha::attention_mask<float> window(mha::sliding_window{1, 1});
    CHECK_FALSE(window.empty());
    CHECK(window.windows().size() == 1);
    CHECK_FALSE(window.causal_mask().has_value());
    CHECK_FALSE(mask_slice(window, 0, 0, 1, 1, 3, 4).is_unmasked());

    const mha::attention_mask<float> bias(
        mha::additive_bias<float>(mha::matrix<float>::Zero(4, 3)));
    CHECK(bias.has_elementwise());
    CHECK_FALSE(mask_slice(bias, 0, 0, 1, 1, 3, 4).is_unmasked());

    const mha::attention_mask<float> top_left(mha::causal{mha::causal_alignment::top_left});
    REQUIRE(top_left.causal_mask().has_value());
    CHECK(top_left.causal_mask()->alignment == mha::causal_alignment::top_left);
    const mha::attention_mask<float> lengths(mha::key_lengths{{2, 4}});
    REQUIRE(lengths.lengths().has_value());
    CHECK(lengths.lengths()->lengths == std::vector<Index>{2, 4});
}

TEST_CASE("keep_mask and additive_bias broadcast 1, B or B*H matrices", "[mask]") {
    const Index batch = 2, heads = 3, lq = 2, lk = 3;
    // Matrix number n keeps exactly key n % lk for every query, and bias n is the constant n:
    // from what a slice allows and adds one can read which matrix it picked.
    auto keep_only = [&](Index n) {
        mha::bool_matrix m = mha::bool_matrix::Constant(lk, lq, false);
        m.row(n % lk).setConstant(true);
        return m;
    };
    for (const Index count : {Index(1), batch, batch * heads}) {
        CAPTURE(count);
        std::vector<mha::bool_matrix> keeps;
        std::vector<mha::matrix<double>> biases;
        for (Index n = 0; n < count; ++n) {
            keeps.push_back(keep_only(n));
            biases.push_back(mha::matrix<double>::Constant(lk, lq, static_cast<double>(n)));
        }
        const mha::attention_mask<double> mask{mha::keep_mask(keeps),
                                               mha::additive_bias<double>(biases)};
        REQUIRE_NOTHROW(mask.validate("mha::test", heads, {lq, lq}, {lk, lk}));
        for (Index b = 0; b < batch; ++b)
            for (Index h = 0; h < heads; ++h) {
                const Index picked = count == 1 ? 0 : (count == batch ? b : b * heads + h);
                CAPTURE(b, h, picked);
                const auto slice = mask_slice(mask, b, h, batch, heads, lq, lk);
                CHECK(slice.bias(0, 0) == static_cast<double>(picked));
                for (Index j = 0; j < lk; ++j)
                    CHECK(slice.keeps(j, 1) == (j == picked % lk));
            }
    }
}

TEST_CASE("merging mask sets keeps each group's broadcasting", "[mask]") {
    const Index batch = 2, heads = 2, lq = 1, lk = 2;
    // A per-sequence group (B = 2 matrices) merged with a shared one (1 matrix): sequence 1 must
    // still get the per-sequence matrix 1 and the shared matrix, not matrix 0 of the merged list.
    mha::bool_matrix seq0 = mha::bool_matrix::Constant(lk, lq, true);
    mha::bool_matrix seq1 = seq0;
    seq1(0, 0) = false;
    mha::bool_matrix shared = seq0;
    shared(1, 0) = false;
    const auto mask =
        mha::attention_mask<double>(mha::keep_mask(std::vector<mha::bool_matrix>{seq0, seq1})) &
        mha::attention_mask<double>(mha::keep_mask(shared));
    REQUIRE_NOTHROW(mask.validate("mha::test", heads, {lq, lq}, {lk, lk}));
    const auto s0 = mask_slice(mask, 0, 1, batch, heads, lq, lk);
    const auto s1 = mask_slice(mask, 1, 1, batch, heads, lq, lk);
    CHECK(s0.keeps(0, 0));
    CHECK_FALSE(s0.keeps(1, 0));
    CHECK_FALSE(s1.keeps(0, 0));
    CHECK_FALSE(s1.keeps(1, 0));
}

TEST_CASE("mask validation: exact messages", "[mask]") {
    SECTION("a negative window is a value_error") {
        REQUIRE_THROWS_AS(mha::attention_mask<float>(mha::sliding_window{-1, 0}), mha::value_error);
        REQUIRE_THROWS_WITH(mha::attention_mask<float>(mha::sliding_window{-1, 0}),
                            Equals("mha::sliding_window: left must be >= 0, got -1"));
        REQUIRE_THROWS_WITH(mha::attention_mask<float>(mha::sliding_window{0, -3}),
                            Equals("mha::sliding_window: right must be >= 0, got -3"));
    }
    SECTION("a negative key length is a value_error") {
        REQUIRE_THROWS_AS(mha::attention_mask<float>(mha::key_lengths{{2, -2}}), mha::value_error);
        REQUIRE_THROWS_WITH(mha::attention_mask<float>(mha::key_lengths{{2, -2}}),
                            Equals("mha::key_lengths: lengths[1] must be >= 0, got -2"));
    }
    SECTION("conflicting or repeated masks are value_errors") {
        REQUIRE_THROWS_AS(
            mha::attention_mask<float>(mha::causal{}, mha::causal{mha::causal_alignment::top_left}),
            mha::value_error);
        REQUIRE_THROWS_WITH(
            mha::attention_mask<float>(mha::causal{}, mha::causal{mha::causal_alignment::top_left}),
            Equals("mha::attention_mask: a second causal mask's alignment must be the same as "
                   "the first, got a different one"));
        REQUIRE_THROWS_WITH(
            mha::attention_mask<float>(mha::key_lengths{{1}}) & mha::key_lengths{{1}},
            Equals("mha::attention_mask: key_lengths must be given at most once, "
                   "got a second one"));
    }
    SECTION("key_lengths: one per sequence, none longer than the sequence") {
        const mha::attention_mask<float> mask(mha::key_lengths{{3}});
        REQUIRE_THROWS_AS(mask.validate("mha::f", 1, {2, 2}, {4, 4}), mha::shape_error);
        REQUIRE_THROWS_WITH(mask.validate("mha::f", 1, {2, 2}, {4, 4}),
                            Equals("mha::f: key_lengths.lengths.size() must be 2 (one per "
                                   "sequence), got 1"));
        REQUIRE_NOTHROW(mask.validate("mha::f", 1, {2}, {3}));
        REQUIRE_THROWS_AS(mask.validate("mha::f", 1, {2}, {2}), mha::shape_error);
        REQUIRE_THROWS_WITH(mask.validate("mha::f", 1, {2}, {2}),
                            Equals("mha::f: key_lengths.lengths[0] must be <= 2 (keys in "
                                   "sequence), got 3"));
    }
    SECTION("keep_mask and additive_bias: count and shape") {
        const std::vector<mha::bool_matrix> four(4, mha::bool_matrix::Constant(3, 2, true));
        const mha::attention_mask<float> wrong_count(mha::keep_mask{four});
        REQUIRE_THROWS_AS(wrong_count.validate("mha::f", 3, {2, 2}, {3, 3}), mha::shape_error);
        REQUIRE_THROWS_WITH(wrong_count.validate("mha::f", 3, {2, 2}, {3, 3}),
                            Equals("mha::f: keep_mask count must be 1, 2 (sequences) or 6 "
                                   "(sequences x heads), got 4"));

        const mha::attention_mask<float> shared(
            mha::keep_mask(mha::bool_matrix::Constant(3, 2, true)));
        REQUIRE_NOTHROW(shared.validate("mha::f", 3, {2, 2}, {3, 3}));
        // A shared matrix must fit every sequence; here sequence 1 has 4 keys.
        REQUIRE_THROWS_WITH(shared.validate("mha::f", 3, {2, 2}, {3, 4}),
                            Equals("mha::f: keep_mask[0].rows() must be 4 (keys in sequence), "
                                   "got 3"));
        REQUIRE_THROWS_WITH(shared.validate("mha::f", 3, {2, 5}, {3, 3}),
                            Equals("mha::f: keep_mask[0].cols() must be 5 (queries in "
                                   "sequence), got 2"));

        // Per sequence: matrix b is checked against sequence b.
        const mha::attention_mask<float> per_sequence(mha::additive_bias<float>(
            std::vector<mha::matrix<float>>(2, mha::matrix<float>::Zero(3, 2))));
        REQUIRE_NOTHROW(per_sequence.validate("mha::f", 1, {2, 2}, {3, 3}));
        REQUIRE_THROWS_AS(per_sequence.validate("mha::f", 1, {2, 2}, {3, 5}), mha::shape_error);
        REQUIRE_THROWS_WITH(per_sequence.validate("mha::f", 1, {2, 2}, {3, 5}),
                            Equals("mha::f: additive_bias[1].rows() must be 5 (keys in "
                                   "sequence), got 3"));
        // Per head: matrix b·H + h belongs to sequence b.
        std::vector<mha::matrix<float>> per_head(4, mha::matrix<float>::Zero(3, 2));
        per_head[3] = mha::matrix<float>::Zero(3, 1);
        const mha::attention_mask<float> heads(mha::additive_bias<float>{per_head});
        REQUIRE_THROWS_WITH(heads.validate("mha::f", 2, {2, 1}, {3, 3}),
                            ContainsSubstring("additive_bias[2].cols() must be 1"));
    }
}

TEST_CASE("padded_keys: row b excludes its true keys from every query of sequence b", "[mask]") {
    // 3 sequences of 4 queries over 5 keys; sequence 1 is all padding, sequence 2 none.
    mha::bool_matrix padding(3, 5);
    padding << true, false, true, false, false,  //
        true, true, true, true, true,            //
        false, false, false, false, false;
    const mha::attention_mask<double> mask(mha::padded_keys{padding});
    CHECK_FALSE(mask.empty());
    CHECK(mask.has_elementwise());
    REQUIRE(mask.padding().has_value());
    for (Index b = 0; b < 3; ++b)
        for (Index h = 0; h < 2; ++h) {
            CAPTURE(b, h);
            const auto slice = mask_slice(mask, b, h, 3, 2, 4, 5);
            require_allows_exactly(slice, 4, 5, [&](Index j, Index) { return !padding(b, j); });
        }
    // Composes with a positional mask by intersection.
    const auto both = mha::attention_mask<double>(mha::causal{mha::causal_alignment::top_left}) &
                      mha::padded_keys{padding};
    require_allows_exactly(mask_slice(both, 0, 0, 3, 1, 4, 5), 4, 5,
                           [&](Index j, Index i) { return j <= i && !padding(0, j); });
}

TEST_CASE("padded_keys validation: exact messages", "[mask]") {
    const mha::attention_mask<float> mask(mha::padded_keys{mha::bool_matrix::Zero(2, 4)});
    // Sequences of 3 and 4 keys: S = 4.
    CHECK_NOTHROW(mask.validate("mha::f", 1, {2, 2}, {3, 4}));
    REQUIRE_THROWS_AS(mask.validate("mha::f", 1, {2, 2, 2}, {3, 4, 4}), mha::shape_error);
    REQUIRE_THROWS_WITH(mask.validate("mha::f", 1, {2, 2, 2}, {3, 4, 4}),
                        Equals("mha::f: padded_keys.padding.rows() must be 3 (one row per "
                               "sequence), got 2"));
    REQUIRE_THROWS_WITH(mask.validate("mha::f", 1, {2, 2}, {3, 5}),
                        Equals("mha::f: padded_keys.padding.cols() must be 5 (the longest key "
                               "length of the batch), got 4"));
    REQUIRE_THROWS_WITH(mha::attention_mask<float>(mha::padded_keys{}) & mha::padded_keys{},
                        Equals("mha::attention_mask: padded_keys must be given at most once, "
                               "got a second one"));
}
