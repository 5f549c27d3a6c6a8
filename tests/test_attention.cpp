// SPDX-License-Identifier: MIT
// Scaled dot-product attention and the multi-head core of attention.hpp: worked examples, a sweep
// against the long-double reference over shapes, masks and normalisations, properties (key
// permutation, score shift, poisoned masked keys, fully masked queries, empty inputs, NaN
// propagation, huge logits), error messages, and Map / block inputs.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/attention.hpp>

#include "check.hpp"
#include "reference.hpp"

using Catch::Generators::as;
using Catch::Matchers::Equals;
using mha::Index;
using mha_test::mat;
using mha_test::max_abs_diff;
using mha_test::require_attention_close;
using mha_test::unit_roundoff;

namespace {

template <class Scalar>
constexpr Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();

template <class Scalar>
mat<long double> wide(const mat<Scalar>& m) {
    return m.template cast<long double>();
}

mha_test::norm_kind reference_kind(mha::normalization n) {
    switch (n) {
        case mha::normalization::relu:
            return mha_test::norm_kind::relu;
        case mha::normalization::sigmoid:
            return mha_test::norm_kind::sigmoid;
        default:
            return mha_test::norm_kind::softmax;
    }
}

/// The scale the library uses, as the value it really multiplies by: options.scale or 1/√d_k,
/// rounded to Scalar. The reference gets exactly this value (inputs are round-tripped through
/// Scalar, as check.hpp's method requires).
template <class Scalar>
long double library_scale(const mha::attention_options& options, Index dk) {
    if (options.scale) return static_cast<long double>(static_cast<Scalar>(*options.scale));
    return static_cast<long double>(
        static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(dk))));
}

/// A mask in the library's form and, independently, as the reference's predicate and bias.
template <class Scalar>
struct mask_case {
    std::string name;
    mha::attention_mask<Scalar> mask;
    mha_test::allowed_fn allowed = mha_test::allow_all();
    mha_test::bias_fn bias = nullptr;
};

/// Random keep matrix (Lk × Lq), true with probability `p`.
inline mha::bool_matrix random_keep(Index lk, Index lq, double p, mha_test::value_source& source) {
    mha::bool_matrix keep(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            keep(j, i) = source.uniform(0, 1) < p;
    return keep;
}

/// Random N(0, 1) bias (Lk × Lq) with about one entry in ten set to −∞.
template <class Scalar>
mat<Scalar> random_bias(Index lk, Index lq, mha_test::value_source& source) {
    mat<Scalar> bias = source.normal_matrix<Scalar>(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            if (source.uniform(0, 1) < 0.1) bias(j, i) = minus_inf<Scalar>;
    return bias;
}

template <class Scalar>
mha_test::bias_fn bias_of(const mat<Scalar>& bias) {
    return [bias](Index j, Index i) { return static_cast<long double>(bias(j, i)); };
}

/// The mask named `name` for Lq queries and Lk keys, with seeded random contents.
template <class Scalar>
mask_case<Scalar> make_mask(const std::string& name, Index lq, Index lk,
                            mha_test::value_source& source) {
    mask_case<Scalar> m;
    m.name = name;
    const Index shift = lk - lq;  // bottom-right alignment: query i sits at key i + Lk − Lq
    if (name == "none") return m;
    if (name == "causal bottom-right") {
        m.mask = mha::causal{};
        m.allowed = mha_test::causal_bottom_right(lq, lk);
    } else if (name == "causal top-left") {
        m.mask = mha::causal{mha::causal_alignment::top_left};
        m.allowed = mha_test::causal_top_left();
    } else if (name == "sliding window") {
        m.mask = mha::sliding_window{3, 1};
        m.allowed = [shift](Index j, Index i) { return i + shift - 3 <= j && j <= i + shift + 1; };
    } else if (name == "key_lengths") {
        const Index length = 2 * lk / 3;  // 0 for Lk = 1: every query fully masked
        m.mask = mha::key_lengths{{length}};
        m.allowed = [length](Index j, Index) { return j < length; };
    } else if (name == "keep_mask") {
        const mha::bool_matrix keep = random_keep(lk, lq, 0.7, source);
        m.mask = mha::keep_mask(keep);
        m.allowed = [keep](Index j, Index i) { return keep(j, i); };
    } else if (name == "padded_keys") {
        // One row of an N × S padding mask: about 3 keys in 10 padded, true = excluded.
        const mha::bool_matrix padded = random_keep(lk, 1, 0.3, source).transpose();
        m.mask = mha::padded_keys{padded};
        m.allowed = [padded](Index j, Index) { return !padded(0, j); };
    } else if (name == "additive_bias") {
        const mat<Scalar> bias = random_bias<Scalar>(lk, lq, source);
        m.mask = mha::additive_bias<Scalar>(bias);
        m.bias = bias_of(bias);
    } else if (name == "combined") {
        const Index length = lk - lk / 4;
        const mha::bool_matrix keep = random_keep(lk, lq, 0.8, source);
        const mat<Scalar> bias = random_bias<Scalar>(lk, lq, source);
        m.mask = mha::attention_mask<Scalar>(mha::causal{}, mha::key_lengths{{length}}) &
                 mha::sliding_window{5, 0, mha::causal_alignment::bottom_right} &
                 mha::keep_mask(keep) & mha::additive_bias<Scalar>(bias);
        m.allowed = [=](Index j, Index i) {
            return j <= i + shift && j >= i + shift - 5 && j < length && keep(j, i);
        };
        m.bias = bias_of(bias);
    } else {
        FAIL("unknown mask " << name);
    }
    return m;
}

/// The two kernels: the materialised reference path and the tiled online-softmax path (what
/// `automatic` picks for softmax). Other normalisations run materialised whatever is asked.
const std::vector<mha::attention_algorithm> both_algorithms = {
    mha::attention_algorithm::materialized, mha::attention_algorithm::tiled};

std::string algorithm_name(mha::attention_algorithm algorithm) {
    switch (algorithm) {
        case mha::attention_algorithm::materialized:
            return "materialized";
        case mha::attention_algorithm::tiled:
            return "tiled";
        default:
            return "automatic";
    }
}

mha::attention_options with_algorithm(mha::attention_options options,
                                      mha::attention_algorithm algorithm) {
    options.algorithm = algorithm;
    return options;
}

template <class Scalar>
struct attention_run {
    mat<Scalar> out;
    mat<Scalar> weights;
};

template <class Scalar>
attention_run<Scalar> run_attention(const mat<Scalar>& q, const mat<Scalar>& k,
                                    const mat<Scalar>& v, const mha::attention_mask<Scalar>& mask,
                                    const mha::attention_options& options = {}) {
    attention_run<Scalar> r;
    r.out.resize(v.rows(), q.cols());
    r.weights = mha::scaled_dot_product_attention(q, k, v, r.out, mask, options,
                                                  {mha::weights_mode::per_head})
                    .weights.front();
    return r;
}

/// Output and weights of both kernels against the long-double reference, with check A. The weights
/// are the attention output for V = identity, so check A applies to them with Vmax = 1 (check A
/// reads V only for Vmax, hence the 1 × Lk row of ones in place of the identity).
template <class Scalar>
void require_matches_reference(const mat<Scalar>& q, const mat<Scalar>& k, const mat<Scalar>& v,
                               const mask_case<Scalar>& m, const mha::attention_options& options,
                               const std::string& what) {
    const long double scale = library_scale<Scalar>(options, q.rows());
    const mat<long double> Q = wide(q), K = wide(k), V = wide(v);
    mat<long double> ref_weights;
    const mat<long double> ref = mha_test::reference_attention<long double>(
        Q, K, V, scale, m.allowed, m.bias, reference_kind(options.normalize), &ref_weights);
    for (const auto algorithm : both_algorithms) {
        const std::string label = what + " [" + algorithm_name(algorithm) + "]";
        const attention_run<Scalar> run =
            run_attention(q, k, v, m.mask, with_algorithm(options, algorithm));
        require_attention_close(run.out, ref, Q, K, V, scale, m.allowed, m.bias, label);
        require_attention_close(run.weights, ref_weights, Q, K, mat<long double>::Ones(1, k.cols()),
                                scale, m.allowed, m.bias, label + " (weights)");
    }
}

template <class Scalar>
mat<Scalar> columns(const mat<Scalar>& m, const std::vector<Index>& which) {
    mat<Scalar> out(m.rows(), static_cast<Index>(which.size()));
    for (std::size_t c = 0; c < which.size(); ++c)
        out.col(static_cast<Index>(c)) = m.col(which[c]);
    return out;
}

const std::vector<mha::normalization> all_normalizations = {
    mha::normalization::softmax, mha::normalization::relu, mha::normalization::sigmoid};

}  // namespace

// ---------------------------------------------------------------------------------------------
// (1) Worked examples: expected numbers typed in from the arithmetic in the comments.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("worked example: two queries, two keys, default scale", "[attention]", float,
                   double) {
    using Scalar = TestType;
    // d_k = 2, so the default scale is 1/√2. Keys k0 = (0, 1), k1 = (1, 0).
    // Query q0 = (√2·ln 3, 0): k0·q0 = 0, k1·q0 = √2·ln 3; scaled: 0 and ln 3.
    //   softmax: e^0 = 1, e^ln3 = 3, sum 4 → weights (1/4, 3/4).
    // Query q1 = (0, √2·ln 2): k0·q1 = √2·ln 2, k1·q1 = 0; scaled: ln 2 and 0.
    //   softmax: 2 and 1, sum 3 → weights (2/3, 1/3).
    // Values v0 = (1, 2), v1 = (5, −2):
    //   out0 = 1/4·(1, 2) + 3/4·(5, −2) = (1/4 + 15/4, 2/4 − 6/4) = (4, −1)
    //   out1 = 2/3·(1, 2) + 1/3·(5, −2) = (2/3 + 5/3, 4/3 − 2/3) = (7/3, 2/3)
    const long double sqrt2 = std::sqrt(2.0L);
    mat<Scalar> q(2, 2), k(2, 2), v(2, 2);
    q << static_cast<Scalar>(sqrt2 * std::log(3.0L)), 0,  //
        0, static_cast<Scalar>(sqrt2 * std::log(2.0L));
    k << 0, 1,  //
        1, 0;
    v << 1, 5,  //
        2, -2;
    mat<long double> expected_out(2, 2), expected_weights(2, 2);
    expected_out << 4.0L, 7.0L / 3,  //
        -1.0L, 2.0L / 3;
    expected_weights << 1.0L / 4, 2.0L / 3,  //
        3.0L / 4, 1.0L / 3;

    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    const auto run = run_attention<Scalar>(q, k, v, {}, with_algorithm({}, algorithm));
    // Check A: the expected values come from the exact (unrounded) q, but rounding √2·ln 3 to
    // Scalar moves a score by ≤ 2u, far inside the bound's 8u·Vmax·(1 + Smax).
    const long double scale = library_scale<Scalar>({}, 2);
    require_attention_close(run.out, expected_out, wide(q), wide(k), wide(v), scale);
    require_attention_close(run.weights, expected_weights, wide(q), wide(k),
                            mat<long double>::Ones(1, 2), scale);
}

TEMPLATE_TEST_CASE("worked example: causal self-attention over three tokens", "[attention]", float,
                   double) {
    using Scalar = TestType;
    // d_k = d_v = 1, default scale 1/√1 = 1, so score(j, i) = k_j·q_i.
    // k = (0, 1, 2), q = (5, ln 2, ln 2), v = (7, 14, −7); causal: query i sees keys j ≤ i.
    // Query 0 sees key 0 only: weight 1, out0 = 7. (Unmasked it would see scores 0, 5, 10.)
    // Query 1 sees keys 0, 1 with scores 0, ln 2: e^s = 1, 2, sum 3 → (1/3, 2/3),
    //   out1 = 7/3 + 28/3 = 35/3.
    // Query 2 sees keys 0, 1, 2 with scores 0, ln 2, 2·ln 2: e^s = 1, 2, 4, sum 7 →
    //   (1/7, 2/7, 4/7), out2 = (7 + 28 − 28)/7 = 1.
    const Scalar ln2 = static_cast<Scalar>(std::log(2.0L));
    mat<Scalar> q(1, 3), k(1, 3), v(1, 3);
    q << 5, ln2, ln2;
    k << 0, 1, 2;
    v << 7, 14, -7;
    mat<long double> expected_out(1, 3), expected_weights(3, 3);
    expected_out << 7.0L, 35.0L / 3, 1.0L;
    expected_weights << 1.0L, 1.0L / 3, 1.0L / 7,  //
        0.0L, 2.0L / 3, 2.0L / 7,                  //
        0.0L, 0.0L, 4.0L / 7;

    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    const auto run = run_attention<Scalar>(q, k, v, mha::causal{}, with_algorithm({}, algorithm));
    const auto allowed = mha_test::causal_top_left();  // Lq = Lk: both alignments agree
    // Check A; rounding ln 2 to Scalar moves a score by ≤ 2u·ln 2, inside the bound.
    require_attention_close(run.out, expected_out, wide(q), wide(k), wide(v), 1.0L, allowed);
    require_attention_close(run.weights, expected_weights, wide(q), wide(k),
                            mat<long double>::Ones(1, 3), 1.0L, allowed);
    CHECK(run.weights(1, 0) == Scalar(0));  // masked weights are exactly 0
    CHECK(run.weights(2, 1) == Scalar(0));
}

TEMPLATE_TEST_CASE("worked example: causal alignment when one query meets three keys",
                   "[attention]", float, double) {
    using Scalar = TestType;
    // Lq = 1, Lk = 3, d_k = 1, scale 1; q = 0 so every allowed key scores 0 (uniform weights).
    // v = (3, 6, 12).
    // Bottom-right: query 0 sits at key 0 + 3 − 1 = 2 and sees keys 0..2: out = (3+6+12)/3 = 7.
    // Top-left: query 0 sees key 0 only: out = 3.
    mat<Scalar> q(1, 1), k(1, 3), v(1, 3);
    q << 0;
    k << 1, -2, 4;
    v << 3, 6, 12;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    const auto bottom_right =
        run_attention<Scalar>(q, k, v, mha::causal{}, with_algorithm({}, algorithm));
    const auto top_left = run_attention<Scalar>(
        q, k, v, mha::causal{mha::causal_alignment::top_left}, with_algorithm({}, algorithm));
    // Weights of 1/3 rounded, a 3-term sum of products ≤ 12: a few u·12; 8u·Vmax is check A's
    // bound at Smax = 0.
    CHECK(std::fabs(bottom_right.out(0, 0) - 7.0L) <= 8 * unit_roundoff<Scalar>() * 12);
    CHECK(top_left.out(0, 0) == Scalar(3));  // weight exactly 1 on a single key
}

TEMPLATE_TEST_CASE("worked examples: ReLU and sigmoid normalisation", "[attention]", float,
                   double) {
    using Scalar = TestType;
    // d_k = 1, scale 1, q = 1, so the scores are the keys.
    mat<Scalar> q(1, 1), v(1, 3);
    q << 1;
    v << 10, 20, 40;
    mha::attention_options options;
    options.scale = 1.0;
    SECTION("relu") {
        // Scores (−1, 1, 3) → ReLU (0, 1, 3), sum 4 → weights (0, 1/4, 3/4);
        // out = 0·10 + 20/4 + 3·40/4 = 5 + 30 = 35. Every step is exact in binary.
        mat<Scalar> k(1, 3);
        k << -1, 1, 3;
        options.normalize = mha::normalization::relu;
        const auto run = run_attention<Scalar>(q, k, v, {}, options);
        CHECK(run.out(0, 0) == Scalar(35));
        CHECK(run.weights(0, 0) == Scalar(0));
    }
    SECTION("sigmoid") {
        // Scores (0, ln 3, −∞ via the bias): σ(0) = 1/2, σ(ln 3) = 1/(1 + 1/3) = 3/4, σ(−∞) = 0;
        // not normalised: out = 10/2 + 3·20/4 + 0 = 5 + 15 = 20.
        mat<Scalar> k(1, 3);
        k << 0, static_cast<Scalar>(std::log(3.0L)), 2;
        mat<Scalar> bias = mat<Scalar>::Zero(3, 1);
        bias(2, 0) = minus_inf<Scalar>;
        options.normalize = mha::normalization::sigmoid;
        const auto run = run_attention<Scalar>(q, k, v, mha::additive_bias<Scalar>(bias), options);
        // σ(ln 3) is within ~3u of 3/4 (rounded ln 3, exp, add, divide), times v = 20, plus the
        // rounding of the 2-term sum at 20: 8u·20 is check A's bound at Smax ≈ 0 (margin ≥ 2).
        CHECK(std::fabs(run.out(0, 0) - 20.0L) <= 8 * unit_roundoff<Scalar>() * 20);
        CHECK(run.weights(0, 0) == Scalar(0.5));
        CHECK(run.weights(2, 0) == Scalar(0));
    }
}

// ---------------------------------------------------------------------------------------------
// (2) Against the long-double reference.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("scaled_dot_product_attention vs reference: shapes", "[attention][sweep]", float,
                   double) {
    using Scalar = TestType;
    // Lq ≠ Lk both ways, 1, odd and just-past-power-of-two lengths; d_k not a SIMD multiple.
    const auto [lq, lk] = GENERATE(table<Index, Index>({{1, 1},
                                                        {1, 64},
                                                        {3, 7},
                                                        {7, 3},
                                                        {17, 17},
                                                        {64, 65},
                                                        {65, 64},
                                                        {129, 17},
                                                        {17, 129},
                                                        {129, 129}}));
    const auto [dk, dv] = GENERATE(table<Index, Index>({{1, 2}, {3, 5}, {8, 8}, {64, 33}}));
    const std::string mask_name = GENERATE(as<std::string>{}, "none", "causal bottom-right");
    mha_test::value_source source(1000 * static_cast<std::uint64_t>(lq) + 10 * lk + dk);
    const mat<Scalar> q = source.normal_matrix<Scalar>(dk, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(dv, lk);
    const auto m = make_mask<Scalar>(mask_name, lq, lk, source);
    CAPTURE(lq, lk, dk, dv, mask_name);
    require_matches_reference(q, k, v, m, {}, mask_name);
}

TEMPLATE_TEST_CASE("scaled_dot_product_attention vs reference: masks", "[attention][sweep]", float,
                   double) {
    using Scalar = TestType;
    const auto [lq, lk] =
        GENERATE(table<Index, Index>({{1, 1}, {7, 3}, {3, 7}, {17, 64}, {65, 17}, {64, 64}}));
    const auto [dk, dv] = GENERATE(table<Index, Index>({{8, 5}, {64, 33}}));
    const std::string mask_name = GENERATE(as<std::string>{}, "none", "causal bottom-right",
                                           "causal top-left", "sliding window", "key_lengths",
                                           "keep_mask", "padded_keys", "additive_bias", "combined");
    mha_test::value_source source(7000 + 100 * static_cast<std::uint64_t>(lq) + lk);
    // q scaled by 4: logits up to ~15, where the softmax amplifies score errors (check A's
    // (1 + Smax) factor is exercised, not just its constant).
    const mat<Scalar> q = source.normal_matrix<Scalar>(dk, lq, 4.0);
    const mat<Scalar> k = source.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(dv, lk);
    const auto m = make_mask<Scalar>(mask_name, lq, lk, source);
    CAPTURE(lq, lk, dk, dv, mask_name);
    require_matches_reference(q, k, v, m, {}, mask_name);
}

TEMPLATE_TEST_CASE("scaled_dot_product_attention vs reference: ReLU and sigmoid",
                   "[attention][sweep]", float, double) {
    using Scalar = TestType;
    const auto normalize = GENERATE(mha::normalization::relu, mha::normalization::sigmoid);
    const auto [lq, lk] =
        GENERATE(table<Index, Index>({{1, 1}, {7, 3}, {3, 7}, {17, 64}, {65, 65}}));
    const std::string mask_name = GENERATE(as<std::string>{}, "none", "causal bottom-right",
                                           "keep_mask", "additive_bias", "combined");
    mha_test::value_source source(9000 + 100 * static_cast<std::uint64_t>(lq) + lk);
    const mat<Scalar> q = source.normal_matrix<Scalar>(8, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(8, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(5, lk);
    const auto m = make_mask<Scalar>(mask_name, lq, lk, source);
    mha::attention_options options;
    options.normalize = normalize;
    CAPTURE(lq, lk, mask_name, mha::to_string(normalize));
    require_matches_reference(q, k, v, m, options, mask_name + " " + mha::to_string(normalize));
}

TEMPLATE_TEST_CASE("scaled_dot_product_attention vs reference: custom scale", "[attention]", float,
                   double) {
    using Scalar = TestType;
    // 0 gives uniform weights, a negative scale favours the least similar keys.
    const double scale = GENERATE(0.37, 2.0, -1.5, 0.0);
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    mha_test::value_source source(4242);
    const mat<Scalar> q = source.normal_matrix<Scalar>(3, 7);
    const mat<Scalar> k = source.normal_matrix<Scalar>(3, 9);
    const mat<Scalar> v = source.normal_matrix<Scalar>(2, 9);
    const auto m = make_mask<Scalar>("causal bottom-right", 7, 9, source);
    mha::attention_options options;
    options.scale = scale;
    options.normalize = normalize;
    CAPTURE(scale, mha::to_string(normalize));
    require_matches_reference(q, k, v, m, options, "custom scale");
}

TEMPLATE_TEST_CASE("score and weighted-sum kernels vs plain loops", "[attention]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(77);
    const mat<Scalar> q = source.normal_matrix<Scalar>(5, 4);
    const mat<Scalar> k = source.normal_matrix<Scalar>(5, 6);
    const mat<Scalar> v = source.normal_matrix<Scalar>(3, 6);
    const Scalar scale(0.5);  // a power of two: scaling adds no rounding
    mat<Scalar> scores(6, 4);
    mha::attention_scores(k, q, scale, scores);
    const mat<Scalar> weights = source.uniform_matrix<Scalar>(6, 4, 0, 1);
    mat<Scalar> out(3, 4);
    mha::weighted_sum_of_values(v, weights, out);
    // Each entry is a dot product of n = 5 or 6 terms of size ≤ |a|·|b|: the classic bound
    // n·u·Σ|a·b| (Higham, γ_n), computed per entry here rather than guessed.
    for (Index i = 0; i < 4; ++i) {
        for (Index j = 0; j < 6; ++j) {
            long double exact = 0, magnitude = 0;
            for (Index c = 0; c < 5; ++c) {
                exact += static_cast<long double>(k(c, j)) * q(c, i);
                magnitude += std::fabs(static_cast<long double>(k(c, j)) * q(c, i));
            }
            CHECK(std::fabs(scores(j, i) - exact * 0.5L) <=
                  5 * unit_roundoff<Scalar>() * magnitude * 0.5L);
        }
        for (Index r = 0; r < 3; ++r) {
            long double exact = 0, magnitude = 0;
            for (Index j = 0; j < 6; ++j) {
                exact += static_cast<long double>(v(r, j)) * weights(j, i);
                magnitude += std::fabs(static_cast<long double>(v(r, j)) * weights(j, i));
            }
            CHECK(std::fabs(out(r, i) - exact) <= 6 * unit_roundoff<Scalar>() * magnitude);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (3) The multi-head core over a packed batch.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("multi_head_attention_core vs reference per sequence and head",
                   "[attention][multi_head]", float, double) {
    using Scalar = TestType;
    const Index heads = 3, dk = 5, dv = 3;
    // Cross-attention lengths, including a sequence with no queries, one with no keys, and
    // Lq > Lk, Lq < Lk, Lq = Lk.
    const std::vector<Index> query_lengths = {3, 0, 7, 1, 4};
    const std::vector<Index> key_lengths = {5, 2, 7, 0, 4};
    const mha::packed_batch batch(query_lengths, key_lengths);
    const Index batch_size = batch.size();
    mha_test::value_source source(31337);
    const mat<Scalar> q = source.normal_matrix<Scalar>(heads * dk, batch.total_queries(), 2.0);
    const mat<Scalar> k = source.normal_matrix<Scalar>(heads * dk, batch.total_keys());
    const mat<Scalar> v = source.normal_matrix<Scalar>(heads * dv, batch.total_keys());

    // Per (b, h): the reference's predicate and bias.
    using allowed_bh = std::function<bool(Index b, Index h, Index j, Index i)>;
    using bias_bh = std::function<long double(Index b, Index h, Index j, Index i)>;
    const std::string mask_name = GENERATE(as<std::string>{}, "none", "causal", "key_lengths",
                                           "keep per head", "bias per sequence", "combined");
    mha::attention_mask<Scalar> mask;
    allowed_bh allowed = [](Index, Index, Index, Index) { return true; };
    bias_bh bias = nullptr;
    const std::vector<Index> valid_keys = {2, 0, 5, 0, 4};
    std::vector<mha::bool_matrix> keeps;
    for (Index b = 0; b < batch_size; ++b)
        for (Index h = 0; h < heads; ++h)
            keeps.push_back(random_keep(key_lengths[b], query_lengths[b], 0.6, source));
    std::vector<mat<Scalar>> biases;
    for (Index b = 0; b < batch_size; ++b)
        biases.push_back(random_bias<Scalar>(key_lengths[b], query_lengths[b], source));
    auto causal_top_left = [](Index, Index, Index j, Index i) { return j <= i; };
    auto causal_bottom_right = [&](Index b, Index, Index j, Index i) {
        return j <= i + key_lengths[b] - query_lengths[b];
    };
    auto keep_per_head = [&](Index b, Index h, Index j, Index i) {
        return keeps[b * heads + h](j, i);
    };
    auto within_length = [&](Index b, Index, Index j, Index) { return j < valid_keys[b]; };
    auto bias_per_sequence = [&](Index b, Index, Index j, Index i) {
        return static_cast<long double>(biases[b](j, i));
    };
    if (mask_name == "causal") {
        mask = mha::causal{};
        allowed = causal_bottom_right;
    } else if (mask_name == "key_lengths") {
        mask = mha::key_lengths{valid_keys};
        allowed = within_length;
    } else if (mask_name == "keep per head") {
        mask = mha::keep_mask(keeps);
        allowed = keep_per_head;
    } else if (mask_name == "bias per sequence") {
        mask = mha::additive_bias<Scalar>(biases);
        bias = bias_per_sequence;
    } else if (mask_name == "combined") {
        mask = mha::attention_mask<Scalar>(mha::causal{mha::causal_alignment::top_left},
                                           mha::key_lengths{valid_keys}, mha::keep_mask(keeps),
                                           mha::additive_bias<Scalar>(biases));
        allowed = [&](Index b, Index h, Index j, Index i) {
            return causal_top_left(b, h, j, i) && within_length(b, h, j, i) &&
                   keep_per_head(b, h, j, i);
        };
        bias = bias_per_sequence;
    }
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::sigmoid);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    mha::attention_options options;
    options.normalize = normalize;
    options.algorithm = algorithm;
    CAPTURE(mask_name, mha::to_string(normalize));

    mat<Scalar> out(heads * dv, batch.total_queries());
    std::vector<mat<Scalar>> per_head, averaged;
    per_head = mha::multi_head_attention_core(q, k, v, heads, batch, out, mask, options,
                                              {mha::weights_mode::per_head})
                   .weights;
    mat<Scalar> out_averaged(heads * dv, batch.total_queries());
    averaged = mha::multi_head_attention_core(q, k, v, heads, batch, out_averaged, mask, options,
                                              {mha::weights_mode::averaged})
                   .weights;
    mat<Scalar> out_plain(heads * dv, batch.total_queries());
    mha::multi_head_attention_core(q, k, v, heads, batch, out_plain, mask, options);
    // Asking for weights does not change the computation: the same path, bitwise.
    CHECK(out_averaged == out);
    CHECK(out_plain == out);
    REQUIRE(per_head.size() == static_cast<std::size_t>(batch_size * heads));
    REQUIRE(averaged.size() == static_cast<std::size_t>(batch_size));

    const long double scale = library_scale<Scalar>(options, dk);
    for (Index b = 0; b < batch_size; ++b) {
        const Index lq = batch.query_length(b), lk = batch.key_length(b);
        const Index q0 = batch.query_offset(b), k0 = batch.key_offset(b);
        mat<long double> mean = mat<long double>::Zero(lk, lq);
        for (Index h = 0; h < heads; ++h) {
            CAPTURE(b, h);
            const mat<long double> Q = wide<Scalar>(q.block(h * dk, q0, dk, lq));
            const mat<long double> K = wide<Scalar>(k.block(h * dk, k0, dk, lk));
            const mat<long double> V = wide<Scalar>(v.block(h * dv, k0, dv, lk));
            const mha_test::allowed_fn a = [&, b, h](Index j, Index i) {
                return allowed(b, h, j, i);
            };
            const mha_test::bias_fn bf =
                bias ? mha_test::bias_fn([&, b, h](Index j, Index i) { return bias(b, h, j, i); })
                     : nullptr;
            mat<long double> ref_weights;
            const mat<long double> ref = mha_test::reference_attention<long double>(
                Q, K, V, scale, a, bf, reference_kind(normalize), &ref_weights);
            const std::string what = "sequence " + std::to_string(b) + " head " + std::to_string(h);
            require_attention_close<Scalar>(out.block(h * dv, q0, dv, lq), ref, Q, K, V, scale, a,
                                            bf, what);
            const mat<Scalar>& w = per_head[static_cast<std::size_t>(b * heads + h)];
            require_attention_close(w, ref_weights, Q, K, mat<long double>::Ones(1, lk), scale, a,
                                    bf, what + " (weights)");
            mean += w.template cast<long double>() / heads;
        }
        // The averaged weights are the mean of the per-head weights (checked above), summed in
        // another order: H roundings of terms ≤ 1/H plus the division: (H + 1)·u.
        CHECK(max_abs_diff(averaged[static_cast<std::size_t>(b)], mean) <=
              (heads + 1) * unit_roundoff<Scalar>());
    }
}

// ---------------------------------------------------------------------------------------------
// (4) Properties.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("permuting keys and values together leaves the output unchanged",
                   "[attention][property]", float, double) {
    using Scalar = TestType;
    const Index lq = 9, lk = 13;
    mha_test::value_source source(555);
    const mat<Scalar> q = source.normal_matrix<Scalar>(4, lq, 2.0);
    const mat<Scalar> k = source.normal_matrix<Scalar>(4, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(3, lk);
    const mha::bool_matrix keep = random_keep(lk, lq, 0.7, source);
    const mat<Scalar> bias = random_bias<Scalar>(lk, lq, source);
    std::vector<Index> perm(static_cast<std::size_t>(lk));
    std::iota(perm.begin(), perm.end(), 0);
    for (Index j = lk - 1; j > 0; --j)  // Fisher-Yates with the seeded source
        std::swap(
            perm[static_cast<std::size_t>(j)],
            perm[static_cast<std::size_t>(source.next() % static_cast<std::uint64_t>(j + 1))]);
    // Key j of the permuted problem is key perm[j] of the original; masks follow their keys.
    mat<Scalar> k_perm(k.rows(), lk), v_perm(v.rows(), lk), bias_perm(lk, lq);
    mha::bool_matrix keep_perm(lk, lq);
    for (Index j = 0; j < lk; ++j) {
        const Index from = perm[static_cast<std::size_t>(j)];
        k_perm.col(j) = k.col(from);
        v_perm.col(j) = v.col(from);
        keep_perm.row(j) = keep.row(from);
        bias_perm.row(j) = bias.row(from);
    }
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    mha::attention_options options;
    options.normalize = normalize;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    options.algorithm = algorithm;
    const auto run =
        run_attention<Scalar>(q, k_perm, v_perm,
                              mha::attention_mask<Scalar>(mha::keep_mask(keep_perm),
                                                          mha::additive_bias<Scalar>(bias_perm)),
                              options);
    // The permuted run must match the reference of the *original* order (check A): a mask
    // applied to the wrong key, or weights mixed up between keys, moves the output by O(Vmax).
    const long double scale = library_scale<Scalar>(options, 4);
    const mha_test::allowed_fn allowed = [&](Index j, Index i) { return keep(j, i); };
    const mha_test::bias_fn bf = bias_of(bias);
    mat<long double> ref_weights;
    const mat<long double> ref = mha_test::reference_attention<long double>(
        wide(q), wide(k), wide(v), scale, allowed, bf, reference_kind(normalize), &ref_weights);
    CAPTURE(mha::to_string(normalize));
    require_attention_close(run.out, ref, wide(q), wide(k), wide(v), scale, allowed, bf,
                            "permuted keys");
    mat<Scalar> weights_back(lk, lq);
    for (Index j = 0; j < lk; ++j)
        weights_back.row(perm[static_cast<std::size_t>(j)]) = run.weights.row(j);
    require_attention_close(weights_back, ref_weights, wide(q), wide(k),
                            mat<long double>::Ones(1, lk), scale, allowed, bf,
                            "permuted keys (weights)");
}

TEMPLATE_TEST_CASE("adding a constant to a query's scores changes nothing (softmax)",
                   "[attention][property]", float, double) {
    using Scalar = TestType;
    const Index lq = 6, lk = 11;
    mha_test::value_source source(808);
    const mat<Scalar> q = source.normal_matrix<Scalar>(8, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(8, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(4, lk);
    // A different constant per query (column), some large: softmax(s + c) = softmax(s).
    mat<Scalar> shift(lk, lq);
    for (Index i = 0; i < lq; ++i)
        shift.col(i).setConstant(static_cast<Scalar>(25.0 * i - 60.0));
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    const auto run = run_attention<Scalar>(q, k, v, mha::additive_bias<Scalar>(shift),
                                           with_algorithm({}, algorithm));
    // Compared with the reference *without* the shift; check A still gets the shifted scores for
    // Smax, since rounding happens at the magnitude of s + c.
    const long double scale = library_scale<Scalar>({}, 8);
    mat<long double> ref_weights;
    const mat<long double> ref = mha_test::reference_attention<long double>(
        wide(q), wide(k), wide(v), scale, mha_test::allow_all(), nullptr,
        mha_test::norm_kind::softmax, &ref_weights);
    require_attention_close(run.out, ref, wide(q), wide(k), wide(v), scale, mha_test::allow_all(),
                            bias_of(shift), "shifted scores");
    require_attention_close(run.weights, ref_weights, wide(q), wide(k),
                            mat<long double>::Ones(1, lk), scale, mha_test::allow_all(),
                            bias_of(shift), "shifted scores (weights)");
}

TEMPLATE_TEST_CASE("poisoned keys and values at masked positions never leak",
                   "[attention][property][poison]", float, double) {
    using Scalar = TestType;
    const Index lq = 6, lk = 10, dk = 4, dv = 3;
    mha_test::value_source source(2024);
    const mat<Scalar> q = source.normal_matrix<Scalar>(dk, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(dv, lk);

    // Each mask excludes the poisoned keys for *every* query.
    const std::string mask_name = GENERATE(as<std::string>{}, "causal top-left", "key_lengths",
                                           "keep_mask", "additive_bias -inf", "sliding window");
    mha::attention_mask<Scalar> mask;
    mha_test::allowed_fn allowed = mha_test::allow_all();
    mha_test::bias_fn bias = nullptr;
    std::vector<Index> poisoned;
    if (mask_name == "causal top-left") {  // query i ≤ 5 sees j ≤ i: keys 6..9 are never seen
        mask = mha::causal{mha::causal_alignment::top_left};
        allowed = mha_test::causal_top_left();
        poisoned = {6, 8, 9};
    } else if (mask_name == "key_lengths") {  // keys 7..9 are padding
        mask = mha::key_lengths{{7}};
        allowed = [](Index j, Index) { return j < 7; };
        poisoned = {7, 8, 9};
    } else if (mask_name == "keep_mask") {  // rows 2 and 5 all false, some other entries too
        mha::bool_matrix keep = random_keep(lk, lq, 0.8, source);
        keep.row(2).setConstant(false);
        keep.row(5).setConstant(false);
        mask = mha::keep_mask(keep);
        allowed = [keep](Index j, Index i) { return keep(j, i); };
        poisoned = {2, 5};
    } else if (mask_name == "additive_bias -inf") {  // rows 1 and 4 are −∞, the rest finite
        mat<Scalar> b = source.normal_matrix<Scalar>(lk, lq);
        b.row(1).setConstant(minus_inf<Scalar>);
        b.row(4).setConstant(minus_inf<Scalar>);
        mask = mha::additive_bias<Scalar>(b);
        bias = bias_of(b);
        poisoned = {1, 4};
    } else {  // window {1, 0} bottom-right: query i sees keys i + 3 and i + 4; keys 0..2 never
        mask = mha::sliding_window{1, 0};
        allowed = [](Index j, Index i) { return i + 3 <= j && j <= i + 4; };
        poisoned = {0, 1, 2};
    }
    const Scalar poison =
        GENERATE(std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
                 -std::numeric_limits<Scalar>::infinity(), Scalar(1e30), Scalar(-1e30));
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    mha::attention_options options;
    options.normalize = normalize;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    options.algorithm = algorithm;
    CAPTURE(mask_name, poison, mha::to_string(normalize));

    mat<Scalar> k_poisoned = k, v_poisoned = v;
    for (const Index j : poisoned) {
        k_poisoned.col(j).setConstant(poison);
        v_poisoned.col(j).setConstant(poison);
    }
    const auto clean = run_attention<Scalar>(q, k, v, mask, options);
    const auto dirty = run_attention<Scalar>(q, k_poisoned, v_poisoned, mask, options);
    CHECK(dirty.out.allFinite());
    // The poisoned scores are replaced by −∞ before normalising, so the normaliser sees the same
    // column either way: the weights are bitwise equal.
    CHECK(dirty.weights == clean.weights);
    // The output may be recomputed in another order when a poisoned value makes P·V non-finite,
    // so it is held to check A against the clean reference rather than to bitwise equality.
    const long double scale = library_scale<Scalar>(options, dk);
    const mat<long double> ref = mha_test::reference_attention<long double>(
        wide(q), wide(k), wide(v), scale, allowed, bias, reference_kind(normalize));
    require_attention_close(dirty.out, ref, wide(q), wide(k), wide(v), scale, allowed, bias,
                            mask_name);
}

TEMPLATE_TEST_CASE("NaN in an unmasked key, value or query reaches exactly the queries using it",
                   "[attention][property][nan]", float, double) {
    using Scalar = TestType;
    const Index lq = 6, lk = 10, dk = 4, dv = 3;
    mha_test::value_source source(99);
    const mat<Scalar> q = source.normal_matrix<Scalar>(dk, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(dv, lk);
    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    mha::attention_options options;
    options.normalize = normalize;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    options.algorithm = algorithm;
    // Bottom-right causal: query i sees keys j ≤ i + 4, so key 7 is seen by queries 3, 4, 5.
    const mha::attention_mask<Scalar> mask(mha::causal{});
    const auto allowed = mha_test::causal_bottom_right(lq, lk);
    const Index bad_key = 7;
    const std::string where = GENERATE(as<std::string>{}, "value", "key", "query");
    CAPTURE(where, mha::to_string(normalize));
    mat<Scalar> q_bad = q, k_bad = k, v_bad = v;
    std::vector<Index> reached, spared;
    if (where == "query") {
        q_bad(1, 2) = nan;  // only query 2 uses its own column
        reached = {2};
        spared = {0, 1, 3, 4, 5};
    } else {
        (where == "key" ? k_bad : v_bad)(1, bad_key) = nan;
        reached = {3, 4, 5};
        spared = {0, 1, 2};
    }
    const auto run = run_attention<Scalar>(q_bad, k_bad, v_bad, mask, options);
    for (const Index i : reached) {
        CAPTURE(i);
        // A NaN value poisons only its own row of the output; a NaN key or query the scores of
        // the whole column, hence every row. Check the row the NaN value sits in.
        CHECK(std::isnan(run.out(1, i)));
        if (where != "value") CHECK(run.out.col(i).array().isNaN().all());
    }
    // The spared queries match the clean reference (check A on those columns).
    const long double scale = library_scale<Scalar>(options, dk);
    const mat<long double> ref = mha_test::reference_attention<long double>(
        wide(q), wide(k), wide(v), scale, allowed, nullptr, reference_kind(normalize));
    const mha_test::allowed_fn allowed_spared = [&](Index j, Index c) {
        return allowed(j, spared[static_cast<std::size_t>(c)]);
    };
    const mat<Scalar> out_spared = columns(run.out, spared);
    CHECK(out_spared.allFinite());
    require_attention_close(out_spared, columns(ref, spared), columns(wide(q), spared), wide(k),
                            wide(v), scale, allowed_spared, nullptr, "spared queries");
}

TEMPLATE_TEST_CASE("a query with no key to attend to gets exactly 0 output and weights",
                   "[attention][property]", float, double) {
    using Scalar = TestType;
    mha_test::value_source source(4711);
    const std::string mask_name =
        GENERATE(as<std::string>{}, "keep_mask column", "key_lengths 0", "bias column",
                 "bottom-right Lq > Lk", "top-left window Lq > Lk", "padded_keys all true");
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    Index lq = 5, lk = 7;
    mha::attention_mask<Scalar> mask;
    mha_test::allowed_fn allowed = mha_test::allow_all();
    mha_test::bias_fn bias = nullptr;
    if (mask_name == "keep_mask column") {  // query 2 may attend to nothing
        mha::bool_matrix keep = mha::bool_matrix::Constant(lk, lq, true);
        keep.col(2).setConstant(false);
        mask = mha::keep_mask(keep);
        allowed = [keep](Index j, Index i) { return keep(j, i); };
    } else if (mask_name == "key_lengths 0") {  // every query
        mask = mha::key_lengths{{0}};
        allowed = [](Index, Index) { return false; };
    } else if (mask_name == "bias column") {  // query 1 has only −∞ biases
        mat<Scalar> b = source.normal_matrix<Scalar>(lk, lq);
        b.col(1).setConstant(minus_inf<Scalar>);
        mask = mha::additive_bias<Scalar>(b);
        bias = bias_of(b);
    } else if (mask_name == "padded_keys all true") {  // every query: the sequence is padding
        mask = mha::padded_keys{mha::bool_matrix::Constant(1, lk, true)};
        allowed = [](Index, Index) { return false; };
    } else if (mask_name == "bottom-right Lq > Lk") {  // queries 0..3 sit before key 0
        lq = 7;
        lk = 3;
        mask = mha::causal{};
        allowed = mha_test::causal_bottom_right(lq, lk);
    } else {  // window {0, 0} top-left: query i sees key i only, so queries 3..6 see nothing
        lq = 7;
        lk = 3;
        mask = mha::sliding_window{0, 0, mha::causal_alignment::top_left};
        allowed = [](Index j, Index i) { return j == i; };
    }
    const mat<Scalar> q = source.normal_matrix<Scalar>(4, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(4, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(3, lk);
    mha::attention_options options;
    options.normalize = normalize;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    options.algorithm = algorithm;
    CAPTURE(mask_name, mha::to_string(normalize));
    const auto run = run_attention<Scalar>(q, k, v, mask, options);
    Index fully_masked = 0;
    for (Index i = 0; i < lq; ++i) {
        bool any = false;
        for (Index j = 0; j < lk; ++j)
            any = any || (allowed(j, i) && !(bias && std::isinf(bias(j, i))));
        if (any) continue;
        ++fully_masked;
        CAPTURE(i);
        CHECK(run.out.col(i).isZero(0));
        CHECK(run.weights.col(i).isZero(0));
    }
    CHECK(fully_masked > 0);  // the case really has such a query
    require_matches_reference(q, k, v, mask_case<Scalar>{mask_name, mask, allowed, bias}, options,
                              mask_name);
}

TEMPLATE_TEST_CASE("empty inputs: no keys gives zeros, no queries gives nothing",
                   "[attention][property]", float, double) {
    using Scalar = TestType;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    const auto options = with_algorithm({}, algorithm);
    mha_test::value_source source(1);
    SECTION("Lk = 0") {
        const mat<Scalar> q = source.normal_matrix<Scalar>(3, 4);
        const auto run =
            run_attention<Scalar>(q, mat<Scalar>(3, 0), mat<Scalar>(2, 0), {}, options);
        CHECK(run.out.rows() == 2);
        CHECK(run.out.cols() == 4);
        CHECK(run.out.isZero(0));
        CHECK(run.weights.rows() == 0);
        CHECK(run.weights.cols() == 4);
    }
    SECTION("Lq = 0") {
        const mat<Scalar> k = source.normal_matrix<Scalar>(3, 5);
        const mat<Scalar> v = source.normal_matrix<Scalar>(2, 5);
        const auto run = run_attention<Scalar>(mat<Scalar>(3, 0), k, v, mha::causal{}, options);
        CHECK(run.out.rows() == 2);
        CHECK(run.out.cols() == 0);
        CHECK(run.weights.rows() == 5);
        CHECK(run.weights.cols() == 0);
    }
    SECTION("d_k = 0 with an explicit scale: every score is 0, so weights are uniform") {
        const mat<Scalar> v = source.normal_matrix<Scalar>(2, 4);
        mha::attention_options unit_scale = options;
        unit_scale.scale = 1.0;
        const auto run =
            run_attention<Scalar>(mat<Scalar>(0, 3), mat<Scalar>(0, 4), v, {}, unit_scale);
        const mat<long double> mean =
            wide(v).rowwise().mean().replicate(1, 3);  // each query: the mean of the values
        // Weights 1/4 are exact; a 4-term sum of |v| ≤ Vmax: 4u·Vmax, doubled.
        CHECK(max_abs_diff(run.out, mean) <=
              8 * unit_roundoff<Scalar>() * wide(v).cwiseAbs().maxCoeff());
        CHECK((run.weights.array() == Scalar(0.25)).all());
    }
    SECTION("multi-head core over a batch with empty sequences") {
        const mha::packed_batch batch({0, 2, 0}, {3, 0, 0});
        const mat<Scalar> q = source.normal_matrix<Scalar>(4, 2);
        const mat<Scalar> k = source.normal_matrix<Scalar>(4, 3);
        const mat<Scalar> v = source.normal_matrix<Scalar>(6, 3);
        mat<Scalar> out = mat<Scalar>::Constant(6, 2, Scalar(9));
        const std::vector<mat<Scalar>> weights =
            mha::multi_head_attention_core(q, k, v, 2, batch, out, {}, options,
                                           {mha::weights_mode::per_head})
                .weights;
        CHECK(out.isZero(0));  // sequence 1 has queries but no keys
        REQUIRE(weights.size() == 6);
        CHECK(weights[0].rows() == 3);
        CHECK(weights[0].cols() == 0);
        CHECK(weights[2].rows() == 0);
        CHECK(weights[2].cols() == 2);
    }
}

TEMPLATE_TEST_CASE("logits of ±1e4 neither overflow nor lose the answer", "[attention][property]",
                   float, double) {
    using Scalar = TestType;
    // d_k = 1, scale 1: scores are products of integers, exact in float and double:
    //   query 100  vs keys (100, −100, 99, 0): scores ( 1e4, −1e4,  9900,  0) → key 0 wins
    //   query −100 vs the same keys:           scores (−1e4,  1e4, −9900,  0) → key 1 wins
    //   query 1:                               scores ( 100, −100,    99,  0)
    // exp(1e4) overflows any type; the max-subtracted softmax never forms it.
    mat<Scalar> q(1, 3), k(1, 4);
    q << 100, -100, 1;
    k << 100, -100, 99, 0;
    mha_test::value_source source(5);
    const mat<Scalar> v = source.normal_matrix<Scalar>(2, 4);
    mha::attention_options options;
    options.scale = 1.0;
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    options.normalize = normalize;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    options.algorithm = algorithm;
    CAPTURE(mha::to_string(normalize));
    const auto run = run_attention<Scalar>(q, k, v, {}, options);
    CHECK(run.out.allFinite());
    CHECK(run.weights.allFinite());
    if (normalize == mha::normalization::softmax) {
        CHECK(run.out.col(0) == v.col(0));  // weights (1, 0, e^-100, 0): e^-100 ≪ u
        CHECK(run.out.col(1) == v.col(1));
    }
    require_matches_reference(q, k, v, mask_case<Scalar>{"none", {}}, options, "±1e4 logits");
}

// ---------------------------------------------------------------------------------------------
// (5) Errors: "<function>: <argument> must be <expected>, got <actual>".
// ---------------------------------------------------------------------------------------------

TEST_CASE("scaled_dot_product_attention: error messages", "[attention][errors]") {
    using M = mat<double>;
    const M q = M::Zero(4, 3), k = M::Zero(4, 5), v = M::Zero(2, 5);
    M out(2, 3);
    const std::string where = "mha::scaled_dot_product_attention: ";
    auto call = [&](const M& qq, const M& kk, const M& vv, M& oo,
                    const mha::attention_mask<double>& mask = {},
                    const mha::attention_options& options = {}) {
        mha::scaled_dot_product_attention(qq, kk, vv, oo, mask, options);
    };
    REQUIRE_NOTHROW(call(q, k, v, out));
    REQUIRE_THROWS_AS(call(q, M::Zero(3, 5), v, out), mha::shape_error);
    REQUIRE_THROWS_WITH(call(q, M::Zero(3, 5), v, out),
                        Equals(where + "k.rows() must be 4 (q.rows(), the key width d_k), got 3"));
    REQUIRE_THROWS_WITH(call(q, k, M::Zero(2, 4), out),
                        Equals(where + "v.cols() must be 5 (k.cols(), the number of keys), got 4"));
    M wrong_rows(3, 3), wrong_cols(2, 2);
    REQUIRE_THROWS_WITH(call(q, k, v, wrong_rows),
                        Equals(where + "out.rows() must be 2 (v.rows(), the value width), got 3"));
    REQUIRE_THROWS_WITH(
        call(q, k, v, wrong_cols),
        Equals(where + "out.cols() must be 3 (q.cols(), the number of queries), got 2"));

    mha::attention_options bad_scale;
    bad_scale.scale = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_AS(call(q, k, v, out, {}, bad_scale), mha::value_error);
    REQUIRE_THROWS_WITH(call(q, k, v, out, {}, bad_scale),
                        Equals(where + "options.scale must be finite, got nan"));
    bad_scale.scale = -std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_WITH(call(q, k, v, out, {}, bad_scale),
                        Equals(where + "options.scale must be finite, got -inf"));

    M no_width_out(2, 3);
    REQUIRE_THROWS_AS(call(M(0, 3), M(0, 5), v, no_width_out), mha::shape_error);
    REQUIRE_THROWS_WITH(
        call(M(0, 3), M(0, 5), v, no_width_out),
        Equals(where + "the key width d_k must be >= 1 (or set options.scale), got 0"));

    const mha::attention_mask<double> small_keep(mha::keep_mask(mha::bool_matrix(4, 3)));
    REQUIRE_THROWS_AS(call(q, k, v, out, small_keep), mha::shape_error);
    REQUIRE_THROWS_WITH(call(q, k, v, out, small_keep),
                        Equals(where + "keep_mask[0].rows() must be 5 (keys in sequence), got 4"));
    REQUIRE_THROWS_WITH(call(q, k, v, out, mha::key_lengths{{6}}),
                        Equals(where + "key_lengths.lengths[0] must be <= 5 (keys in sequence), "
                                       "got 6"));
    REQUIRE_THROWS_WITH(
        call(q, k, v, out, mha::additive_bias<double>(M::Zero(5, 2))),
        Equals(where + "additive_bias[0].cols() must be 3 (queries in sequence), got 2"));
}

TEST_CASE("multi_head_attention_core and kernels: error messages", "[attention][errors]") {
    using M = mat<float>;
    // 2 heads, d_k = 3, d_v = 2; batch of sequences with 2 + 3 queries and 4 + 1 keys.
    const mha::packed_batch batch({2, 3}, {4, 1});
    const M q = M::Zero(6, 5), k = M::Zero(6, 5), v = M::Zero(4, 5);
    M out(4, 5);
    const std::string where = "mha::multi_head_attention_core: ";
    auto call = [&](const M& qq, const M& kk, const M& vv, Index heads, M& oo,
                    const mha::attention_options& options = {}) {
        mha::multi_head_attention_core(qq, kk, vv, heads, batch, oo, {}, options);
    };
    REQUIRE_NOTHROW(call(q, k, v, 2, out));
    REQUIRE_THROWS_AS(call(q, k, v, 0, out), mha::value_error);
    REQUIRE_THROWS_WITH(call(q, k, v, 0, out), Equals(where + "num_heads must be >= 1, got 0"));
    REQUIRE_THROWS_AS(call(q, k, v, 4, out), mha::shape_error);
    REQUIRE_THROWS_WITH(call(q, k, v, 4, out),
                        Equals(where + "q.rows() must be a multiple of num_heads = 4, got 6"));
    REQUIRE_THROWS_WITH(call(q, k, M::Zero(3, 5), 2, out),
                        Equals(where + "v.rows() must be a multiple of num_heads = 2, got 3"));
    REQUIRE_THROWS_WITH(call(q, M::Zero(4, 5), v, 2, out),
                        Equals(where + "k.rows() must be 6 (q.rows()), got 4"));
    REQUIRE_THROWS_WITH(
        call(M::Zero(6, 4), k, v, 2, out),
        Equals(where + "q.cols() must be 5 (the batch's total query count), got 4"));
    REQUIRE_THROWS_WITH(call(q, M::Zero(6, 6), M::Zero(4, 6), 2, out),
                        Equals(where + "k.cols() must be 5 (the batch's total key count), got 6"));
    REQUIRE_THROWS_WITH(call(q, k, M::Zero(4, 4), 2, out),
                        Equals(where + "v.cols() must be 5 (k.cols()), got 4"));
    M wrong_rows(2, 5), wrong_cols(4, 6);
    REQUIRE_THROWS_WITH(call(q, k, v, 2, wrong_rows),
                        Equals(where + "out.rows() must be 4 (v.rows()), got 2"));
    REQUIRE_THROWS_WITH(call(q, k, v, 2, wrong_cols),
                        Equals(where + "out.cols() must be 5 (q.cols()), got 6"));
    mha::attention_options bad_scale;
    bad_scale.scale = std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_AS(call(q, k, v, 2, out, bad_scale), mha::value_error);
    REQUIRE_THROWS_WITH(call(q, k, v, 2, out, bad_scale),
                        Equals(where + "options.scale must be finite, got inf"));
    // Masks are checked per sequence of the batch.
    REQUIRE_THROWS_WITH(
        mha::multi_head_attention_core(q, k, v, 2, batch, out, mha::key_lengths{{4, 2}}),
        Equals(where + "key_lengths.lengths[1] must be <= 1 (keys in sequence), got 2"));

    M scores(4, 2);
    REQUIRE_THROWS_WITH(mha::attention_scores(M::Zero(3, 4), M::Zero(2, 2), 1.0f, scores),
                        Equals("mha::attention_scores: k.rows() must be 2 (q.rows(), the key "
                               "width d_k), got 3"));
    REQUIRE_THROWS_WITH(mha::attention_scores(M::Zero(2, 5), M::Zero(2, 2), 1.0f, scores),
                        Equals("mha::attention_scores: scores.rows() must be 5 (k.cols()), got 4"));
    REQUIRE_THROWS_WITH(mha::attention_scores(M::Zero(2, 4), M::Zero(2, 3), 1.0f, scores),
                        Equals("mha::attention_scores: scores.cols() must be 3 (q.cols()), got 2"));
    M sum(3, 2);
    REQUIRE_THROWS_WITH(mha::weighted_sum_of_values(M::Zero(3, 5), M::Zero(4, 2), sum),
                        Equals("mha::weighted_sum_of_values: weights.rows() must be 5 "
                               "(v.cols()), got 4"));
    REQUIRE_THROWS_WITH(mha::weighted_sum_of_values(M::Zero(2, 4), M::Zero(4, 2), sum),
                        Equals("mha::weighted_sum_of_values: out.rows() must be 2 (v.rows()), "
                               "got 3"));
    REQUIRE_THROWS_WITH(mha::weighted_sum_of_values(M::Zero(3, 4), M::Zero(4, 3), sum),
                        Equals("mha::weighted_sum_of_values: out.cols() must be 3 "
                               "(weights.cols()), got 2"));
}

// ---------------------------------------------------------------------------------------------
// (6) Maps over raw buffers and blocks of larger matrices.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("inputs as Maps and blocks give the plain-matrix result", "[attention][views]",
                   float, double) {
    using Scalar = TestType;
    const Index dk = 5, dv = 3, lq = 9, lk = 11;
    mha_test::value_source source(64);
    const mat<Scalar> q = source.normal_matrix<Scalar>(dk, lq);
    const mat<Scalar> k = source.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = source.normal_matrix<Scalar>(dv, lk);
    const auto m = make_mask<Scalar>("combined", lq, lk, source);
    const long double scale = library_scale<Scalar>({}, dk);
    mat<long double> ref_weights;
    const mat<long double> ref = mha_test::reference_attention<long double>(
        wide(q), wide(k), wide(v), scale, m.allowed, m.bias, mha_test::norm_kind::softmax,
        &ref_weights);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    CAPTURE(algorithm_name(algorithm));
    const auto options = with_algorithm({}, algorithm);
    const auto plain = run_attention<Scalar>(q, k, v, m.mask, options);
    require_attention_close(plain.out, ref, wide(q), wide(k), wide(v), scale, m.allowed, m.bias,
                            "plain");
    const Scalar sentinel(-3.25);

    SECTION("Maps over a framework-style buffer, one token per row-major row") {
        // A PyTorch (L, d) row-major tensor is, as bytes, a column-major d × L matrix.
        std::vector<Scalar> q_buf(q.data(), q.data() + q.size());
        std::vector<Scalar> k_buf(k.data(), k.data() + k.size());
        std::vector<Scalar> v_buf(v.data(), v.data() + v.size());
        std::vector<Scalar> out_buf(static_cast<std::size_t>(dv * lq), sentinel);
        using const_map = Eigen::Map<const mat<Scalar>>;
        Eigen::Map<mat<Scalar>> out(out_buf.data(), dv, lq);
        mha::scaled_dot_product_attention(const_map(q_buf.data(), dk, lq),
                                          const_map(k_buf.data(), dk, lk),
                                          const_map(v_buf.data(), dv, lk), out, m.mask, options);
        require_attention_close<Scalar>(out, ref, wide(q), wide(k), wide(v), scale, m.allowed,
                                        m.bias, "maps");
    }
    SECTION("row blocks of one fused QKV matrix, output into a block of a larger matrix") {
        // Q, K and V share columns in a fused projection; here Lq ≠ Lk, so the fused matrix has
        // max(Lq, Lk) columns and each view takes its leading ones.
        mat<Scalar> qkv = mat<Scalar>::Constant(2 * dk + dv, std::max(lq, lk), sentinel);
        qkv.block(0, 0, dk, lq) = q;
        qkv.block(dk, 0, dk, lk) = k;
        qkv.block(2 * dk, 0, dv, lk) = v;
        mat<Scalar> big = mat<Scalar>::Constant(dv + 4, lq + 3, sentinel);
        const mat<Scalar> weights =
            mha::scaled_dot_product_attention(qkv.block(0, 0, dk, lq), qkv.block(dk, 0, dk, lk),
                                              qkv.block(2 * dk, 0, dv, lk), big.block(2, 1, dv, lq),
                                              m.mask, options, {mha::weights_mode::per_head})
                .weights.front();
        require_attention_close<Scalar>(big.block(2, 1, dv, lq), ref, wide(q), wide(k), wide(v),
                                        scale, m.allowed, m.bias, "blocks");
        require_attention_close(weights, ref_weights, wide(q), wide(k),
                                mat<long double>::Ones(1, lk), scale, m.allowed, m.bias,
                                "blocks (weights)");
        big.block(2, 1, dv, lq).setConstant(sentinel);  // everything else must be untouched
        CHECK((big.array() == sentinel).all());
    }
    SECTION("strided Map (every other column) and a transposed row-major view") {
        std::vector<Scalar> k_buf(static_cast<std::size_t>(dk * lk * 2), sentinel);
        using strided = Eigen::Map<const mat<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
        for (Index j = 0; j < lk; ++j)
            for (Index c = 0; c < dk; ++c)
                k_buf[static_cast<std::size_t>(2 * dk * j + c)] = k(c, j);
        const strided k_view(k_buf.data(), dk, lk, Eigen::OuterStride<>(2 * dk));
        using row_major = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        const row_major v_row_major = v;
        mat<Scalar> out(dv, lq);
        mha::scaled_dot_product_attention(q, k_view, v_row_major, out, m.mask, options);
        require_attention_close(out, ref, wide(q), wide(k), wide(v), scale, m.allowed, m.bias,
                                "strided");
    }
}
