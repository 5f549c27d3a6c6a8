// SPDX-License-Identifier: MIT
// The multi-head attention layer: hand-worked examples, a sweep against the long-double
// reference, structural properties (heads, batches, fused paths, init, masking, threads) and
// the errors its constructors and forward calls throw.
#include <cmath>
#include <cstdint>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
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
using mha_test::random_parameters;
using mha_test::to_reference;

namespace {

using head_allowed_fn = std::function<bool(Index, Index, Index)>;      // (head, key, query)
using head_bias_fn = std::function<long double(Index, Index, Index)>;  // (head, key, query)

/// Requires a and b to have the same shape and the same values (NaN anywhere fails).
template <class A, class B>
void require_identical(const A& a, const B& b, const std::string& what) {
    INFO(what);
    REQUIRE(a.rows() == b.rows());
    REQUIRE(a.cols() == b.cols());
    const long double diff = mha_test::max_abs_diff(a, b);
    INFO("max |a - b| = " << diff);
    REQUIRE(diff == 0.0L);
}

/// Requires every column of `out` to equal `bias` (or 0 without bias) exactly.
template <class Scalar>
void require_columns_equal_bias(const mha::matrix<Scalar>& out, const mha::vector<Scalar>& bias,
                                const std::string& what) {
    mha::matrix<Scalar> expected = mha::matrix<Scalar>::Zero(out.rows(), out.cols());
    if (bias.size() != 0) expected.colwise() = bias;
    require_identical(out, expected, what);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// 1. Worked examples whose numbers were computed by hand.
// ---------------------------------------------------------------------------------------------

namespace {

/// E = 2, H = 2, d_k = 1, d_v = 2, tokens x1 = (1,0), x2 = (0,1), x3 = (1,1):
///   W_q = W_k = I        → head 0 sees q = k = x[0] = (1, 0, 1), head 1 q = k = x[1] = (0, 1, 1)
///   W_v = [1 0; 0 1; 1 1; 1 −1]
///                        → head 0 values (1,0), (0,1), (1,1); head 1 values (1,1), (1,−1), (2,0)
///   W_o = [1 0 2 0; 0 1 0 2]  → out = head0 + 2·head1 (the 2 tells a head swap apart)
/// With scale = ln 2 each weight is 2^(q·k) / Σ 2^(q·k), a rational number.
template <class Scalar>
mha::attention_parameters<Scalar> worked_example_parameters(bool bias) {
    mha::attention_parameters<Scalar> p;
    p.w_q = mha::matrix<Scalar>::Identity(2, 2);
    p.w_k = mha::matrix<Scalar>::Identity(2, 2);
    p.w_v.resize(4, 2);
    p.w_v << 1, 0, 0, 1, 1, 1, 1, -1;
    p.w_o.resize(2, 4);
    p.w_o << 1, 0, 2, 0, 0, 1, 0, 2;
    if (bias) {
        p.b_q = mha::vector<Scalar>::Zero(2);
        p.b_k = mha::vector<Scalar>::Zero(2);
        p.b_v.resize(4);
        p.b_v << 0, 0, 1, 0;
        p.b_o.resize(2);
        p.b_o << Scalar(0.5), -1;
    }
    return p;
}

template <class Scalar>
mha::matrix<Scalar> worked_example_tokens() {
    mha::matrix<Scalar> x(2, 3);
    x << 1, 0, 1, 0, 1, 1;
    return x;
}

mha::attention_config worked_example_config(bool bias, mha::normalization norm, double scale) {
    mha::attention_config c;
    c.embed_dim = 2;
    c.num_heads = 2;
    c.head_dim = 1;
    c.value_head_dim = 2;
    c.bias = bias;
    c.attention.scale = scale;
    c.attention.normalize = norm;
    return c;
}

/// Check A (tests/support/check.hpp) bounds each head output by 8·u·Vmax·(1+Smax) + u·|R|; here
/// Vmax ≤ 2, Smax ≤ ln 2 < 1, |head output| ≤ 2, so each head element is within 34u. A row of W_o
/// has |entries| summing to 3, giving 102u, plus a rounding of the sum and of the bias add
/// (|out| ≤ 4): 128u covers it. A wrong weight moves an output by ≥ 1/15, far above.
template <class Scalar>
void require_hand_values(const mha::matrix<Scalar>& out, const mha::matrix<double>& expected,
                         const std::string& what) {
    INFO(what);
    REQUIRE(out.rows() == expected.rows());
    REQUIRE(out.cols() == expected.cols());
    const long double tolerance = 128 * mha_test::unit_roundoff<Scalar>();
    const long double diff = mha_test::max_abs_diff(out, expected);
    INFO("max |out - hand| = " << diff << ", tolerance " << tolerance);
    REQUIRE(diff <= tolerance);
}

const double ln2 = std::log(2.0);

}  // namespace

TEMPLATE_TEST_CASE("worked example: 3 tokens, 2 heads, d_k = 1, d_v = 2, softmax", "[layer][hand]",
                   float, double) {
    using Scalar = TestType;
    // Head 0 (q = k = (1, 0, 1)):
    //   query 1, q = 1: 2^(1,0,1) = (2,1,2)/5 → (.4,.2,.4) → .4(1,0)+.2(0,1)+.4(1,1) = (.8, .6)
    //   query 2, q = 0: uniform 1/3          → (1/3)(2, 2)                       = (2/3, 2/3)
    //   query 3, q = 1: as query 1                                               = (.8, .6)
    // Head 1 (q = k = (0, 1, 1)):
    //   query 1, q = 0: uniform 1/3 → (1/3)((1,1)+(1,−1)+(2,0))                 = (4/3, 0)
    //   query 2, q = 1: 2^(0,1,1) = (1,2,2)/5 → .2(1,1)+.4(1,−1)+.4(2,0)        = (1.4, −.2)
    //   query 3, q = 1: as query 2                                               = (1.4, −.2)
    // out = head0 + 2·head1:
    //   token 1: (.8 + 8/3, .6 + 0)   = (52/15, 3/5)
    //   token 2: (2/3 + 2.8, 2/3 − .4) = (52/15, 4/15)
    //   token 3: (.8 + 2.8, .6 − .4)   = (3.6, .2)
    mha::matrix<double> expected(2, 3);
    expected << 52.0 / 15, 52.0 / 15, 3.6, 0.6, 4.0 / 15, 0.2;

    const mha::multi_head_attention<Scalar> layer(
        worked_example_config(false, mha::normalization::softmax, ln2),
        worked_example_parameters<Scalar>(false));
    const auto x = worked_example_tokens<Scalar>();

    SECTION("output") {
        require_hand_values(layer.forward(x), expected, "no bias");
    }

    SECTION("biases: b_v adds (0,0,1,0) to every head output (weights sum to 1), b_o adds") {
        // head 1's first value row gains 1, W_o doubles it: out gains (2, 0) + b_o (.5, −1).
        mha::matrix<double> with_bias = expected;
        with_bias.row(0).array() += 2.5;
        with_bias.row(1).array() -= 1.0;
        const mha::multi_head_attention<Scalar> biased(
            worked_example_config(true, mha::normalization::softmax, ln2),
            worked_example_parameters<Scalar>(true));
        require_hand_values(biased.forward(x), with_bias, "with bias");
    }

    SECTION("per-head and averaged weights (rows: keys, columns: queries)") {
        mha::matrix<double> head0(3, 3), head1(3, 3);
        head0 << .4, 1. / 3, .4, .2, 1. / 3, .2, .4, 1. / 3, .4;
        head1 << 1. / 3, .2, .2, 1. / 3, .4, .4, 1. / 3, .4, .4;
        const auto per_head = layer.forward_with_weights(x, mha::weights_mode::per_head);
        REQUIRE(per_head.weights.size() == 2);
        require_hand_values(per_head.weights[0], head0, "head 0 weights");
        require_hand_values(per_head.weights[1], head1, "head 1 weights");
        require_hand_values(per_head.output, expected, "output alongside weights");
        // Mean of the two heads, e.g. query 1 key 1: (.4 + 1/3)/2 = 11/30.
        mha::matrix<double> mean(3, 3);
        mean << 11. / 30, 4. / 15, .3, 4. / 15, 11. / 30, .3, 11. / 30, 11. / 30, .4;
        const auto averaged = layer.forward_with_weights(x, mha::weights_mode::averaged);
        REQUIRE(averaged.weights.size() == 1);
        require_hand_values(averaged.weights[0], mean, "averaged weights");
    }

    SECTION("causal: query i sees keys 1..i") {
        // Head 0: q1 sees k1 only → (1,0); q2 (q=0) sees k1,k2 equally → (.5,.5); q3 → (.8,.6).
        // Head 1: q1 → (1,1); q2 (q=1) sees k = (0,1): 2^(0,1) = (1,2)/3
        //         → (1/3)(1,1) + (2/3)(1,−1) = (1, −1/3); q3 → (1.4, −.2).
        // out = head0 + 2·head1: (3, 2), (2.5, .5 − 2/3 = −1/6), (3.6, .2).
        mha::matrix<double> causal_expected(2, 3);
        causal_expected << 3, 2.5, 3.6, 2, -1.0 / 6, 0.2;
        require_hand_values(layer.forward(x, mha::causal{}), causal_expected, "causal");
    }
}

TEMPLATE_TEST_CASE("worked example with ReLU normalisation (exact rational weights)",
                   "[layer][hand]", float, double) {
    using Scalar = TestType;
    // scale 1, weights max(s,0)/Σ max(s,0), all-zero scores give weights 0.
    // Head 0 (q = k = (1,0,1)): q1: s = (1,0,1) → (.5,0,.5) → .5(1,0)+.5(1,1) = (1, .5)
    //                           q2: s = 0 → (0, 0);   q3: (1, .5)
    // Head 1 (q = k = (0,1,1)): q1: s = 0 → (0, 0)
    //                           q2: s = (0,1,1) → (0,.5,.5) → .5(1,−1)+.5(2,0) = (1.5, −.5)
    //                           q3: (1.5, −.5)
    // out = head0 + 2·head1: (1, .5), (3, −1), (4, −.5)
    mha::matrix<double> expected(2, 3);
    expected << 1, 3, 4, 0.5, -1, -0.5;
    const mha::multi_head_attention<Scalar> layer(
        worked_example_config(false, mha::normalization::relu, 1.0),
        worked_example_parameters<Scalar>(false));
    require_hand_values(layer.forward(worked_example_tokens<Scalar>()), expected, "relu");
}

// ---------------------------------------------------------------------------------------------
// 2. The layer against the long-double reference over shapes, masks and normalisations.
// ---------------------------------------------------------------------------------------------

namespace {

enum class mask_kind {
    none,
    causal,  // bottom-right
    causal_top_left,
    key_lengths,      // the first 2/3 of the keys
    keep,             // random keep_mask shared by the heads
    keep_per_head,    // one random keep_mask per head
    bias,             // random additive_bias with some −∞
    bias_per_head,    // one per head
    window,           // sliding_window{3, 1}, bottom-right
    window_top_left,  // sliding_window{2, 2, top_left}
    causal_lengths,   // causal + key_lengths
    window_and_keep,  // composition
    log_length_bias,  // −log(Lk) everywhere, the pairing sigmoid attention recommends
};

/// A mask for the library and the same mask as explicit predicates for the reference.
template <class Scalar>
struct mask_under_test {
    mha::attention_mask<Scalar> mask;
    head_allowed_fn allowed;
    head_bias_fn bias;
};

mha::bool_matrix random_keep(Index keys, Index queries, mha_test::value_source& values) {
    mha::bool_matrix keep(keys, queries);
    for (Index i = 0; i < queries; ++i)
        for (Index j = 0; j < keys; ++j)
            keep(j, i) = values.uniform(0, 1) < 0.7;
    return keep;
}

/// N(0, 1) biases with about one entry in ten set to −∞ (an exclusion by bias).
template <class Scalar>
mha::matrix<Scalar> random_bias(Index keys, Index queries, mha_test::value_source& values) {
    mha::matrix<Scalar> bias = values.normal_matrix<Scalar>(keys, queries);
    for (Index i = 0; i < queries; ++i)
        for (Index j = 0; j < keys; ++j)
            if (values.uniform(0, 1) < 0.1) bias(j, i) = -std::numeric_limits<Scalar>::infinity();
    return bias;
}

template <class Scalar>
mask_under_test<Scalar> make_mask(mask_kind kind, Index heads, Index lq, Index lk,
                                  mha_test::value_source& values) {
    mask_under_test<Scalar> m;
    const Index shift = lk - lq;  // bottom-right alignment: query i's diagonal is key i + shift
    const Index kept_keys = (2 * lk) / 3;
    switch (kind) {
        case mask_kind::none:
            break;
        case mask_kind::causal:
            m.mask = mha::causal{};
            m.allowed = [=](Index, Index j, Index i) { return j <= i + shift; };
            break;
        case mask_kind::causal_top_left:
            m.mask = mha::causal{mha::causal_alignment::top_left};
            m.allowed = [](Index, Index j, Index i) { return j <= i; };
            break;
        case mask_kind::key_lengths:
            m.mask = mha::key_lengths{{kept_keys}};
            m.allowed = [=](Index, Index j, Index) { return j < kept_keys; };
            break;
        case mask_kind::keep: {
            const mha::bool_matrix keep = random_keep(lk, lq, values);
            m.mask = mha::keep_mask(keep);
            m.allowed = [keep](Index, Index j, Index i) { return keep(j, i); };
            break;
        }
        case mask_kind::keep_per_head: {
            std::vector<mha::bool_matrix> keeps;
            for (Index h = 0; h < heads; ++h)
                keeps.push_back(random_keep(lk, lq, values));
            m.mask = mha::keep_mask(keeps);
            m.allowed = [keeps](Index h, Index j, Index i) {
                return keeps[static_cast<std::size_t>(h)](j, i);
            };
            break;
        }
        case mask_kind::bias: {
            const mha::matrix<Scalar> bias = random_bias<Scalar>(lk, lq, values);
            m.mask = mha::additive_bias<Scalar>(bias);
            m.bias = [bias](Index, Index j, Index i) {
                return static_cast<long double>(bias(j, i));
            };
            break;
        }
        case mask_kind::bias_per_head: {
            std::vector<mha::matrix<Scalar>> biases;
            for (Index h = 0; h < heads; ++h)
                biases.push_back(random_bias<Scalar>(lk, lq, values));
            m.mask = mha::additive_bias<Scalar>(biases);
            m.bias = [biases](Index h, Index j, Index i) {
                return static_cast<long double>(biases[static_cast<std::size_t>(h)](j, i));
            };
            break;
        }
        case mask_kind::window:
            m.mask = mha::sliding_window{3, 1};
            m.allowed = [=](Index, Index j, Index i) {
                return j >= i + shift - 3 && j <= i + shift + 1;
            };
            break;
        case mask_kind::window_top_left:
            m.mask = mha::sliding_window{2, 2, mha::causal_alignment::top_left};
            m.allowed = [](Index, Index j, Index i) { return j >= i - 2 && j <= i + 2; };
            break;
        case mask_kind::causal_lengths:
            m.mask = mha::attention_mask<Scalar>(mha::causal{}, mha::key_lengths{{kept_keys}});
            m.allowed = [=](Index, Index j, Index i) { return j <= i + shift && j < kept_keys; };
            break;
        case mask_kind::window_and_keep: {
            const mha::bool_matrix keep = random_keep(lk, lq, values);
            m.mask = mha::attention_mask<Scalar>(mha::sliding_window{4, 0}, mha::keep_mask(keep));
            m.allowed = [=](Index, Index j, Index i) {
                return j >= i + shift - 4 && j <= i + shift && keep(j, i);
            };
            break;
        }
        case mask_kind::log_length_bias: {
            const Scalar b = static_cast<Scalar>(-std::log(static_cast<double>(lk)));
            m.mask = mha::additive_bias<Scalar>(mha::matrix<Scalar>::Constant(lk, lq, b));
            m.bias = [b](Index, Index, Index) { return static_cast<long double>(b); };
            break;
        }
    }
    return m;
}

mha_test::norm_kind reference_norm(mha::normalization n) {
    switch (n) {
        case mha::normalization::softmax:
            return mha_test::norm_kind::softmax;
        case mha::normalization::relu:
            return mha_test::norm_kind::relu;
        case mha::normalization::sigmoid:
            return mha_test::norm_kind::sigmoid;
    }
    return mha_test::norm_kind::softmax;
}

struct layer_case {
    const char* name;
    Index lq, lk;
    Index embed_dim, heads, head_dim, value_head_dim;
    Index key_input_dim, value_input_dim;  // 0: embed_dim
    bool bias;
    bool self;  // call the self-attention overload with one input (lq == lk, widths E)
    mask_kind mask;
    mha::normalization norm;
    std::optional<double> scale;
    double input_sigma;  // > 1 sharpens the softmax (large logits)
    bool relu_margin;    // add a random ±3 additive_bias (see the ReLU note below)
};

using mk = mask_kind;
constexpr std::nullopt_t none = std::nullopt;  // scale: the default 1/sqrt(d_k)
constexpr auto softmax = mha::normalization::softmax;
constexpr auto relu = mha::normalization::relu;
constexpr auto sigmoid = mha::normalization::sigmoid;

// Lengths {1, 3, 7, 17, 64, 65, 129}, head widths {1, 3, 8, 64} and heads {1, 2, 4, 8} each
// appear several times, with d_k ≠ d_v in most cases; not the full cross product (runtime).
//
// ReLU weights relu(s_j) / Σ relu(s) are ill-conditioned when Σ relu(s) is small next to the
// scores' rounding error (≈ u·Σ|q_c·k_c|·scale): any change of summation order is amplified by
// that ratio (seen: 20 to 1000 with N(0, 1.25) scores), and at such a query the implementation's
// and the baseline's errors are two independent draws whose ratio has no bound, so check B with
// k = 2 failed for 2-10 % of seeds, pooled or not, and still for 1-2 % with every score shifted
// by +2 or +3. The ReLU cases therefore use scale 0.05 (scores within about ±0.6) plus a bias
// of +3 or −3 per (key, query) ("relu_margin"): every score stays ≥ 2.4 away from the kink, so
// the normalisation is well conditioned while both branches, and queries with every score
// clipped, are still exercised. The worked examples check the kink itself exactly.
const layer_case layer_cases[] = {
    // clang-format off
    // lq  lk   E  H  dk  dv  kv   v  bias   self   mask                 norm     scale σ  margin
    {"L1, H1, dk 3, dv 8",
       1,   1,  4, 1,  3,  8,  0,  0, true , true , mk::none,            softmax, none, 1, false},
    {"L3, H2, dk 3, dv 1, causal",
       3,   3,  6, 2,  3,  1,  0,  0, false, true , mk::causal,          softmax, none, 1, false},
    {"L7, H4, dk 8, dv 3, key_lengths",
       7,   7,  8, 4,  8,  3,  0,  0, true , true , mk::key_lengths,     softmax, none, 1, false},
    {"L17, H8, dk 1, dv 8, keep_mask",
      17,  17, 16, 8,  1,  8,  0,  0, true , true , mk::keep,            softmax, none, 1, false},
    {"L64, H2, dk 64, dv 8, additive_bias",
      64,  64, 16, 2, 64,  8,  0,  0, true , true , mk::bias,            softmax, none, 1, false},
    {"L65, H4, dk 8, dv 64, sliding_window",
      65,  65,  8, 4,  8, 64,  0,  0, true , true , mk::window,          softmax, none, 1, false},
    {"L129, H2, dk 8, dv 3, causal + key_lengths, no bias",
     129, 129, 16, 2,  8,  3,  0,  0, false, true , mk::causal_lengths,  softmax, none, 1, false},
    {"L17, H2, dk = dv = 8, large logits",
      17,  17, 16, 2,  8,  8,  0,  0, true , true , mk::none,            softmax, none, 4, false},
    {"L17, H8, dk = dv = 64, causal",
      17,  17, 16, 8, 64, 64,  0,  0, true , true , mk::causal,          softmax, none, 1, false},
    {"L7, H4, dk = dv = 3, keep_mask per head",
       7,   7, 12, 4,  3,  3,  0,  0, true , true , mk::keep_per_head,   softmax, none, 1, false},
    {"L65, H2, dk 3, dv 8, sliding_window + keep_mask",
      65,  65,  8, 2,  3,  8,  0,  0, true , true , mk::window_and_keep, softmax, none, 1, false},
    {"L17, E16, H4, default widths, no bias",
      17,  17, 16, 4,  0,  0,  0,  0, false, true , mk::none,            softmax, none, 1, false},
    {"L17, H4, dk 8, dv 3, scale 0.3",
      17,  17, 16, 4,  8,  3,  0,  0, true , true , mk::none,            softmax,  0.3, 1, false},
    // cross-attention: Lq ≠ Lk both ways, kdim/vdim ≠ E, and kdim = vdim = E (fused weights)
    {"cross Lq7 Lk17, kdim 5, vdim 11, causal",
       7,  17,  8, 2,  3,  8,  5, 11, true , false, mk::causal,          softmax, none, 1, false},
    {"cross Lq65 Lk3, kdim = vdim = E, causal (first 62 queries see nothing)",
      65,   3, 12, 4,  8,  1,  0,  0, true , false, mk::causal,          softmax, none, 1, false},
    {"cross Lq17 Lk64, H8, kdim 7, vdim 2, window top-left, no bias",
      17,  64, 24, 8,  3,  3,  7,  2, false, false, mk::window_top_left, softmax, none, 1, false},
    {"cross Lq17 Lk7, kdim = vdim = 3, window top-left (late queries see nothing)",
      17,   7,  8, 2,  8,  8,  3,  3, true , false, mk::window_top_left, softmax, none, 1, false},
    {"cross Lq17 Lk7, kdim = vdim = 3, causal top-left",
      17,   7,  8, 2,  8,  8,  3,  3, true , false, mk::causal_top_left, softmax, none, 1, false},
    {"cross Lq1 Lk129 (decode step), dk = dv = 8, scale -0.5",
       1, 129,  8, 2,  8,  8,  0,  0, true , false, mk::causal,          softmax, -0.5, 1, false},
    {"cross Lq3 Lk17, kdim 6, vdim 5, additive_bias per head",
       3,  17,  8, 2,  3,  8,  6,  5, true , false, mk::bias_per_head,   softmax, none, 1, false},
    {"cross Lq64 Lk65, kdim = E, vdim 5, key_lengths",
      64,  65,  8, 4,  8,  3,  0,  5, true , false, mk::key_lengths,     softmax, none, 1, false},
    // the other normalisations
    {"relu: L17, H2, dk = dv = 8, causal",
      17,  17, 16, 2,  8,  8,  0,  0, true , true , mk::causal,          relu,    0.05, 1, true},
    {"relu: cross Lq3 Lk7, H1, dk 64, dv 1, keep_mask",
       3,   7,  4, 1, 64,  1,  3,  4, true , false, mk::keep,            relu,    0.05, 1, true},
    {"relu: L64, H4, dk = dv = 3, key_lengths, no bias",
      64,  64, 16, 4,  3,  3,  0,  0, false, true , mk::key_lengths,     relu,    0.05, 1, true},
    {"sigmoid: L65, H4, dk 3, dv 8, key_lengths",
      65,  65,  8, 4,  3,  8,  0,  0, true , true , mk::key_lengths,     sigmoid, none, 1, false},
    {"sigmoid: L7, H8, dk = dv = 1, bias -log(Lk)",
       7,   7,  8, 8,  1,  1,  0,  0, true , true , mk::log_length_bias, sigmoid, none, 1, false},
    {"sigmoid: cross Lq17 Lk3, kdim 2, vdim 9, causal top-left, scale 0.7",
      17,   3,  8, 2,  3,  8,  2,  9, true , false, mk::causal_top_left, sigmoid,  0.7, 1, false},
    // clang-format on
};

/// Check B's k for every comparison of the layer with the reference. check.hpp's forward rule
/// (k = 2, from FlashAttention's and PyTorch's single-kernel tests) is calibrated for one kernel;
/// the layer chains four GEMMs and a softmax whose rounding order differs from the plain loops.
/// Measured over 200 seeds per case, the ratio max|O − R| / max|R_lp − R| has a median of
/// 0.5–1.0 (the layer is as accurate as the plain loops), a 99th percentile of 2.0–3.1 for the
/// per-head weights and a maximum of 3.8 with large logits: one ill-conditioned score sets both
/// maxima, and there the two errors are independent draws, so their ratio has no fixed bound
/// near 1. k = 2 failed under clang -O2 -march=native and g++ -ffp-contract=fast at 2.2; k = 4
/// covers the measured maximum. A wrong mask, head or bias moves outputs by O(Vmax), thousands
/// of times the baseline error: 8 such injected bugs were each caught by 4 to 126 assertions.
constexpr long double layer_baseline_k = 4;

/// Appends the columns of `more` to `all` (the first call sets the row count).
template <class M>
void append_columns(M& all, const M& more) {
    if (all.cols() == 0) all.resize(more.rows(), 0);
    REQUIRE(all.rows() == more.rows());
    const Index at = all.cols();
    all.conservativeResize(Eigen::NoChange, at + more.cols());
    all.rightCols(more.cols()) = more;
}

/// Outputs and weights of several independent draws of one case, side by side: the layer's (O),
/// the long-double reference's (R) and the Scalar baseline's (R_lp).
template <class Scalar>
struct pooled_results {
    mha::matrix<Scalar> out, out_base;
    mat<long double> out_ref;
    mha::matrix<Scalar> heads, heads_base;  // every head's Lk × Lq weights
    mat<long double> heads_ref;
    mha::matrix<Scalar> mean, mean_base;  // averaged weights
    mat<long double> mean_ref;
};

/// Check B compares maxima; over one small draw a maximum is set by a handful of elements, so
/// the ratio of two maxima fluctuates (k = 2 failed for 1-5 % of seeds on single draws of the
/// small cases). Pooling draws until a comparison spans about 1024 outputs and 4096 weights
/// (at most 32 draws) brought every case to 0 failures in 40 seeds (Debug) and in 100 seeds
/// (-O2 -march=native, FMA contraction on and off), largest ratio 1.75, except large logits:
/// there each query's output is one or two value columns and near-ties between the top keys
/// turn a score rounding error of u·|s| (|s| up to ~50) into the whole error, so a draw holds
/// about Lq useful samples, not E·Lq. Such cases pool 4 times as many draws; k = 2 still fails
/// for 1-3 % of seeds there (ratio up to 3.8), though the median ratio is 1.0: see the report.
Index draws_for(const layer_case& c) {
    const Index outputs = std::max<Index>(1, c.embed_dim * c.lq);
    const Index weights = std::max<Index>(1, c.heads * c.lq * c.lk);
    const Index sharpness = c.input_sigma > 1 ? 4 : 1;
    const Index needed =
        sharpness * std::max((1024 + outputs - 1) / outputs, (4096 + weights - 1) / weights);
    return std::min<Index>(32, needed);
}

/// Runs one case, pooling draws_for(c) draws; `algorithm` overrides the layer's default kernel.
template <class Scalar>
pooled_results<Scalar> run_layer_case(const layer_case& c, std::uint64_t seed,
                                      std::optional<mha::attention_algorithm> algorithm = {}) {
    mha_test::value_source values(seed);
    mha::attention_config config;
    config.embed_dim = c.embed_dim;
    config.num_heads = c.heads;
    config.head_dim = c.head_dim;
    config.value_head_dim = c.value_head_dim;
    config.key_input_dim = c.key_input_dim;
    config.value_input_dim = c.value_input_dim;
    config.bias = c.bias;
    config.attention.scale = c.scale;
    config.attention.normalize = c.norm;
    if (algorithm) config.attention.algorithm = *algorithm;
    const mha::attention_config resolved = config.resolved();
    // The library rounds the scale to Scalar before use; R gets that same rounded value, as it
    // gets the rounded inputs (reliability.md §4.3: feed both sides exactly the same numbers).
    const Scalar scale =
        c.scale
            ? static_cast<Scalar>(*c.scale)
            : static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(resolved.head_dim)));

    pooled_results<Scalar> pooled;
    for (Index draw = 0; draw < draws_for(c); ++draw) {
        const auto params = random_parameters<Scalar>(config, values);
        const mha::multi_head_attention<Scalar> layer(config, params);
        const mha::matrix<Scalar> xq =
            values.normal_matrix<Scalar>(c.embed_dim, c.lq, c.input_sigma);
        const mha::matrix<Scalar> xk =
            c.self ? xq : values.normal_matrix<Scalar>(resolved.key_input_dim, c.lk, c.input_sigma);
        const mha::matrix<Scalar> xv =
            c.self ? xq
                   : values.normal_matrix<Scalar>(resolved.value_input_dim, c.lk, c.input_sigma);
        auto m = make_mask<Scalar>(c.mask, c.heads, c.lq, c.lk, values);
        if (c.relu_margin) {
            mha::matrix<Scalar> margin(c.lk, c.lq);
            for (Index i = 0; i < c.lq; ++i)
                for (Index j = 0; j < c.lk; ++j)
                    margin(j, i) = values.uniform(0, 1) < 0.7 ? Scalar(3) : Scalar(-3);
            m.mask.add(mha::additive_bias<Scalar>(margin));
            const head_bias_fn inner = m.bias;
            m.bias = [inner, margin](Index h, Index j, Index i) {
                return (inner ? inner(h, j, i) : 0.0L) + static_cast<long double>(margin(j, i));
            };
        }

        auto run = [&](mha::weights_mode mode) {
            if (c.self) return layer.forward_with_weights(xq, mode, m.mask);
            return layer.forward_with_weights(xq, xk, xv, mha::packed_batch::single(c.lq, c.lk),
                                              mode, m.mask);
        };
        const auto per_head = run(mha::weights_mode::per_head);
        const auto averaged = run(mha::weights_mode::averaged);
        const mha::matrix<Scalar> plain =
            c.self ? layer.forward(xq, m.mask) : layer.forward(xq, xk, xv, m.mask);
        // Returning weights must not change the output: same computation, same bits.
        require_identical(averaged.output, per_head.output, "output with averaged weights");
        require_identical(plain, per_head.output, "output of forward without weights");
        REQUIRE(per_head.weights.size() == static_cast<std::size_t>(c.heads));
        REQUIRE(averaged.weights.size() == 1);

        std::vector<mat<long double>> ref_weights;
        const mat<long double> ref = mha_test::reference_layer<long double>(
            to_reference<long double>(params), c.heads, xq.template cast<long double>(),
            xk.template cast<long double>(), xv.template cast<long double>(),
            static_cast<long double>(scale), m.allowed, m.bias, reference_norm(c.norm),
            &ref_weights);
        std::vector<mat<Scalar>> base_weights;
        const mat<Scalar> base = mha_test::reference_layer<Scalar>(
            to_reference<Scalar>(params), c.heads, xq, xk, xv, scale, m.allowed, m.bias,
            reference_norm(c.norm), &base_weights);

        append_columns(pooled.out, per_head.output);
        append_columns(pooled.out_ref, ref);
        append_columns(pooled.out_base, base);
        mat<long double> ref_mean = mat<long double>::Zero(c.lk, c.lq);
        mat<Scalar> base_mean = mat<Scalar>::Zero(c.lk, c.lq);
        for (std::size_t h = 0; h < per_head.weights.size(); ++h) {
            append_columns(pooled.heads, per_head.weights[h]);
            append_columns(pooled.heads_ref, ref_weights[h]);
            append_columns(pooled.heads_base, base_weights[h]);
            ref_mean += ref_weights[h] / static_cast<long double>(c.heads);
            base_mean += base_weights[h] / static_cast<Scalar>(c.heads);  // as the library does
        }
        append_columns(pooled.mean, averaged.weights[0]);
        append_columns(pooled.mean_ref, ref_mean);
        append_columns(pooled.mean_base, base_mean);
    }
    return pooled;
}

}  // namespace

template <class Scalar>
void require_case_within_baseline(const pooled_results<Scalar>& r) {
    const long double k = layer_baseline_k;
    mha_test::require_within_baseline(r.out, r.out_ref, r.out_base, k, "output");
    mha_test::require_within_baseline(r.heads, r.heads_ref, r.heads_base, k, "per-head weights");
    mha_test::require_within_baseline(r.mean, r.mean_ref, r.mean_base, k, "averaged weights");
}

TEMPLATE_TEST_CASE("layer matches the long-double reference within check B", "[layer][reference]",
                   float, double) {
    for (std::size_t index = 0; index < std::size(layer_cases); ++index) {
        const layer_case& c = layer_cases[index];
        const std::uint64_t seed = 1000 + index;
        DYNAMIC_SECTION(c.name) {
            INFO("case: " << c.name << ", seed " << seed << ", draws " << draws_for(c));
            require_case_within_baseline(run_layer_case<TestType>(c, seed));
        }
    }
}

// The sweep above runs the layer's default kernel; the softmax cases again with each kernel
// named explicitly (the tiled one's query block of 128 is crossed by the 129-token cases).
// Cases with 64-wide heads are left to the sweep: their reference loops cost 0.2-0.6 s each in
// a Debug build, and head width is not what differs between the kernels.
TEMPLATE_TEST_CASE("layer matches the reference with each attention algorithm",
                   "[layer][reference][algorithm]", float, double) {
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    for (std::size_t index = 0; index < std::size(layer_cases); ++index) {
        const layer_case& c = layer_cases[index];
        const std::uint64_t seed = 1500 + index;
        if (c.norm != mha::normalization::softmax || c.head_dim == 64 || c.value_head_dim == 64)
            continue;
        DYNAMIC_SECTION(c.name << (algorithm == mha::attention_algorithm::tiled
                                       ? ", tiled"
                                       : ", materialized")) {
            INFO("case: " << c.name << ", seed " << seed << ", draws " << draws_for(c));
            require_case_within_baseline(run_layer_case<TestType>(c, seed, algorithm));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Properties: heads, batches, fused paths, packed parameters, initialisation, masking,
//    empty inputs and threads.
// ---------------------------------------------------------------------------------------------

namespace {

/// R and R_lp (see check.hpp) for a layer on given inputs, with its own parameters and settings.
template <class Scalar>
struct layer_reference {
    mat<long double> out;
    mat<Scalar> base;
    std::vector<mat<long double>> weights;
    std::vector<mat<Scalar>> base_weights;
};

template <class Scalar>
layer_reference<Scalar> reference_of(const mha::multi_head_attention<Scalar>& layer,
                                     const mha::matrix<Scalar>& xq, const mha::matrix<Scalar>& xk,
                                     const mha::matrix<Scalar>& xv,
                                     const head_allowed_fn& allowed = nullptr,
                                     const head_bias_fn& bias = nullptr) {
    const mha::attention_config& c = layer.config();
    const Scalar scale =
        c.attention.scale
            ? static_cast<Scalar>(*c.attention.scale)
            : static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(c.head_dim)));
    const auto p = layer.parameters();
    const auto norm = reference_norm(c.attention.normalize);
    layer_reference<Scalar> r;
    r.out = mha_test::reference_layer<long double>(
        to_reference<long double>(p), c.num_heads, xq.template cast<long double>(),
        xk.template cast<long double>(), xv.template cast<long double>(),
        static_cast<long double>(scale), allowed, bias, norm, &r.weights);
    r.base = mha_test::reference_layer<Scalar>(to_reference<Scalar>(p), c.num_heads, xq, xk, xv,
                                               scale, allowed, bias, norm, &r.base_weights);
    return r;
}

/// Check B over several results pooled side by side (see draws_for on why pooling). Two
/// evaluations that differ only in how Eigen blocks a product (one GEMM over a packed batch vs
/// one per sequence, a stacked weight vs three) are not equal to the bit; each is required to be
/// as close to R as the plain-loop evaluation, which a mixed-up sequence or head is not.
template <class Scalar>
struct pooled_check {
    mha::matrix<Scalar> out, base;
    mat<long double> ref;

    template <class T>
    static mat<T> flat(const mat<T>& m) {
        return Eigen::Map<const mat<T>>(m.data(), 1, m.size());
    }

    /// Results of any shape, flattened into one row (check B is element-wise).
    void add(const mha::matrix<Scalar>& o, const mat<long double>& r, const mat<Scalar>& b) {
        REQUIRE(o.rows() == r.rows());
        REQUIRE(o.cols() == r.cols());
        append_columns(out, flat(o));
        append_columns(ref, flat(r));
        append_columns(base, flat(b));
    }
    void require(const std::string& what) const {
        mha_test::require_within_baseline(out, ref, base, layer_baseline_k, what);
    }
};

/// A config with every width different (E, d_k, d_v, kdim, vdim), so that a transposed or
/// swapped matrix cannot go unnoticed.
mha::attention_config odd_widths_config(bool bias, Index key_input_dim = 7,
                                        Index value_input_dim = 4) {
    mha::attention_config c;
    c.embed_dim = 10;
    c.num_heads = 3;
    c.head_dim = 5;
    c.value_head_dim = 2;
    c.key_input_dim = key_input_dim;
    c.value_input_dim = value_input_dim;
    c.bias = bias;
    return c;
}

/// The layer computed by hand from its parameters with the library's public kernels:
/// project, attend head by head with scaled_dot_product_attention, concatenate, project.
template <class Scalar>
mha::matrix<Scalar> layer_by_hand(const mha::multi_head_attention<Scalar>& layer,
                                  const mha::matrix<Scalar>& xq, const mha::matrix<Scalar>& xk,
                                  const mha::matrix<Scalar>& xv,
                                  const std::vector<mha::attention_mask<Scalar>>& head_masks) {
    const auto p = layer.parameters();
    const mha::attention_config& c = layer.config();
    const mha::matrix<Scalar> q = mha::linear(p.w_q, p.b_q, xq);
    const mha::matrix<Scalar> k = mha::linear(p.w_k, p.b_k, xk);
    const mha::matrix<Scalar> v = mha::linear(p.w_v, p.b_v, xv);
    std::vector<mha::matrix<Scalar>> heads;
    for (Index h = 0; h < c.num_heads; ++h)
        heads.push_back(mha::scaled_dot_product_attention(
            q.middleRows(h * c.head_dim, c.head_dim), k.middleRows(h * c.head_dim, c.head_dim),
            v.middleRows(h * c.value_head_dim, c.value_head_dim),
            head_masks[static_cast<std::size_t>(h)], c.attention));
    return mha::linear(p.w_o, p.b_o, mha::concat_heads(heads));
}

}  // namespace

TEMPLATE_TEST_CASE("the layer is per-head attention, concatenated, then the output projection",
                   "[layer][property]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2001);
    const bool bias = GENERATE(true, false);
    // kdim, vdim ≠ E runs the separate projections; kdim = vdim = E the stacked weight.
    const Index kv_width = GENERATE(Index{0}, Index{7});
    const auto config = odd_widths_config(bias, kv_width, kv_width == 0 ? 0 : 4);
    const mha::attention_config resolved = config.resolved();
    const Index lq = 6, lk = 9;
    pooled_check<Scalar> layer_pool, hand_pool;
    for (int draw = 0; draw < 16; ++draw) {  // 16 × 60 outputs pooled
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        const mha::matrix<Scalar> xq = values.normal_matrix<Scalar>(10, lq);
        const mha::matrix<Scalar> xk = values.normal_matrix<Scalar>(resolved.key_input_dim, lk);
        const mha::matrix<Scalar> xv = values.normal_matrix<Scalar>(resolved.value_input_dim, lk);
        // A different additive bias per head on top of a shared causal mask.
        std::vector<mha::matrix<Scalar>> biases;
        std::vector<mha::attention_mask<Scalar>> head_masks;
        for (Index h = 0; h < 3; ++h) {
            biases.push_back(random_bias<Scalar>(lk, lq, values));
            head_masks.emplace_back(mha::causal{}, mha::additive_bias<Scalar>(biases.back()));
        }
        const mha::attention_mask<Scalar> mask(mha::causal{}, mha::additive_bias<Scalar>(biases));

        const auto r = reference_of(
            layer, xq, xk, xv, [](Index, Index j, Index i) { return j <= i + (lk - lq); },
            [&biases](Index h, Index j, Index i) {
                return static_cast<long double>(biases[static_cast<std::size_t>(h)](j, i));
            });
        layer_pool.add(layer.forward(xq, xk, xv, mask), r.out, r.base);
        hand_pool.add(layer_by_hand(layer, xq, xk, xv, head_masks), r.out, r.base);
    }
    hand_pool.require("per-head scaled_dot_product_attention by hand");
    layer_pool.require("layer");
}

TEMPLATE_TEST_CASE("a packed batch equals a loop over its sequences", "[layer][property][batch]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2002);
    const std::vector<Index> lengths{3, 0, 5, 1};
    const mha::packed_batch batch(lengths);
    mha::attention_config config;
    config.embed_dim = 8;
    config.num_heads = 2;
    config.head_dim = 3;
    config.value_head_dim = 5;

    // The packed masks and, per sequence, the same mask alone and as a predicate.
    struct variant {
        std::string name;
        mha::attention_mask<Scalar> packed;
        std::vector<mha::attention_mask<Scalar>> alone;
        std::vector<head_allowed_fn> allowed;
    };
    pooled_check<Scalar> packed_pool, loop_pool;
    for (int draw = 0; draw < 4; ++draw) {  // 4 draws × 4 masks × 72 outputs pooled
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(8, batch.total_queries());
        std::vector<variant> variants(4);
        variants[0].name = "no mask";
        variants[1].name = "causal";
        variants[1].packed = mha::causal{};
        variants[2].name = "key_lengths {2, 0, 4, 1}";
        variants[2].packed = mha::key_lengths{{2, 0, 4, 1}};
        variants[3].name = "keep_mask per sequence, with causal";
        std::vector<mha::bool_matrix> keeps;
        for (std::size_t b = 0; b < lengths.size(); ++b) {
            const Index kept = std::vector<Index>{2, 0, 4, 1}[b];
            keeps.push_back(random_keep(lengths[b], lengths[b], values));
            const mha::bool_matrix keep = keeps.back();
            variants[0].alone.emplace_back();
            variants[0].allowed.push_back(nullptr);
            variants[1].alone.emplace_back(mha::causal{});
            variants[1].allowed.push_back([](Index, Index j, Index i) { return j <= i; });
            variants[2].alone.emplace_back(mha::key_lengths{{kept}});
            variants[2].allowed.push_back([kept](Index, Index j, Index) { return j < kept; });
            variants[3].alone.emplace_back(mha::causal{}, mha::keep_mask(keep));
            variants[3].allowed.push_back(
                [keep](Index, Index j, Index i) { return j <= i && keep(j, i); });
        }
        variants[3].packed = mha::attention_mask<Scalar>(mha::causal{}, mha::keep_mask(keeps));

        for (const variant& v : variants) {
            INFO(v.name);
            const mha::matrix<Scalar> packed = layer.forward(x, batch, v.packed);
            REQUIRE(packed.cols() == batch.total_queries());
            for (Index b = 0; b < batch.size(); ++b) {
                const auto bb = static_cast<std::size_t>(b);
                const mha::matrix<Scalar> xb = x.middleCols(batch.query_offset(b), lengths[bb]);
                const auto r = reference_of(layer, xb, xb, xb, v.allowed[bb]);
                packed_pool.add(packed.middleCols(batch.query_offset(b), lengths[bb]), r.out,
                                r.base);
                loop_pool.add(layer.forward(xb, v.alone[bb]), r.out, r.base);
            }
        }
    }
    packed_pool.require("packed batch");
    loop_pool.require("one call per sequence");
}

// padded_keys: one N × S matrix excludes any pattern of keys per sequence. Random patterns
// (about 3 keys in 10 padded), a sequence with every key padded, a sequence longer than the tiled
// kernel's key block, through each kernel, alone and with a causal mask.
TEMPLATE_TEST_CASE("padded_keys excludes any pattern of keys per sequence, in each kernel",
                   "[layer][reference][masked][padded_keys]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2020);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    const bool with_causal = GENERATE(false, true);
    INFO((algorithm == mha::attention_algorithm::tiled ? "tiled" : "materialized")
         << (with_causal ? ", with causal" : ""));
    const std::vector<Index> queries{3, 2, 4, 1, 3}, keys{4, 6, 5, 0, 140};
    const std::size_t fully_padded = 2;
    const mha::packed_batch batch(queries, keys);
    auto config = odd_widths_config(true);
    config.attention.algorithm = algorithm;
    const Index longest = 140;

    pooled_check<Scalar> pool;
    for (int draw = 0; draw < 3; ++draw) {
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        const mha::matrix<Scalar> xq = values.normal_matrix<Scalar>(10, batch.total_queries());
        const mha::matrix<Scalar> xk = values.normal_matrix<Scalar>(7, batch.total_keys());
        const mha::matrix<Scalar> xv = values.normal_matrix<Scalar>(4, batch.total_keys());
        // N × S; entries past a sequence's own key count are padding in PyTorch's layout too.
        mha::bool_matrix padding = mha::bool_matrix::Constant(batch.size(), longest, true);
        for (Index b = 0; b < batch.size(); ++b)
            for (Index j = 0; j < keys[static_cast<std::size_t>(b)]; ++j)
                padding(b, j) =
                    static_cast<std::size_t>(b) == fully_padded || values.uniform(0, 1) < 0.3;
        mha::attention_mask<Scalar> mask(mha::padded_keys{padding});
        if (with_causal) mask.add(mha::causal{mha::causal_alignment::top_left});

        const auto r =
            layer.forward_with_weights(xq, xk, xv, batch, mha::weights_mode::per_head, mask);
        REQUIRE(r.output.cols() == batch.total_queries());
        for (Index b = 0; b < batch.size(); ++b) {
            const auto bb = static_cast<std::size_t>(b);
            const Index q0 = batch.query_offset(b), k0 = batch.key_offset(b);
            const mha::matrix<Scalar> out = r.output.middleCols(q0, queries[bb]);
            if (bb == fully_padded) {
                // No key to attend to: every head contributes exactly 0, leaving the output bias.
                require_columns_equal_bias<Scalar>(out, layer.parameters().b_o,
                                                   "fully padded sequence");
                for (Index h = 0; h < config.num_heads; ++h)
                    REQUIRE(
                        (r.weights[static_cast<std::size_t>(b * config.num_heads + h)].array() ==
                         Scalar(0))
                            .all());
                continue;
            }
            const head_allowed_fn allowed = [padding, b, with_causal](Index, Index j, Index i) {
                return !padding(b, j) && (!with_causal || j <= i);
            };
            const auto ref =
                reference_of(layer, mha::matrix<Scalar>(xq.middleCols(q0, queries[bb])),
                             mha::matrix<Scalar>(xk.middleCols(k0, keys[bb])),
                             mha::matrix<Scalar>(xv.middleCols(k0, keys[bb])), allowed);
            pool.add(out, ref.out, ref.base);
            // A padded key gets weight exactly 0 from every query of every head.
            for (Index h = 0; h < config.num_heads; ++h) {
                const auto& w = r.weights[static_cast<std::size_t>(b * config.num_heads + h)];
                REQUIRE(w.rows() == keys[bb]);
                REQUIRE(w.cols() == queries[bb]);
                for (Index j = 0; j < keys[bb]; ++j)
                    if (padding(b, j)) REQUIRE((w.row(j).array() == Scalar(0)).all());
            }
        }
    }
    pool.require("padded_keys");
}

TEMPLATE_TEST_CASE("a sequence's output does not depend on the other sequences of its batch",
                   "[layer][property][batch]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2003);
    const mha::packed_batch batch({3, 0, 5, 1});
    const auto config = odd_widths_config(true, 0, 0);
    const mha::multi_head_attention<Scalar> layer(config,
                                                  random_parameters<Scalar>(config, values));
    const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(10, batch.total_queries());
    const mha::attention_mask<Scalar> mask = mha::causal{};
    const mha::matrix<Scalar> clean = layer.forward(x, batch, mask);

    // NaN in every token of sequence 2: its own outputs turn NaN (NaN propagates to what it
    // touches), the others are computed by the same calls on the same numbers, so stay bit-equal.
    mha::matrix<Scalar> poisoned_x = x;
    poisoned_x.middleCols(batch.query_offset(2), 5)
        .setConstant(std::numeric_limits<Scalar>::quiet_NaN());
    const mha::matrix<Scalar> poisoned = layer.forward(poisoned_x, batch, mask);
    require_identical(poisoned.leftCols(3), clean.leftCols(3), "sequence 0");
    require_identical(poisoned.rightCols(1), clean.rightCols(1), "sequence 3");
    REQUIRE(poisoned.middleCols(3, 5).array().isNaN().all());
}

TEMPLATE_TEST_CASE("a packed cross-attention batch equals a loop, weights included",
                   "[layer][property][batch]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2004);
    const std::vector<Index> query_lengths{2, 3, 0, 4};
    const std::vector<Index> key_lengths{5, 0, 3, 1};
    const mha::packed_batch batch(query_lengths, key_lengths);
    const auto config = odd_widths_config(true);
    // Bottom-right causal per sequence: sequence 0 (2 queries, 5 keys) sees keys j ≤ i + 3;
    // sequence 3 (4 queries, 1 key) leaves its first 3 queries with nothing to attend to.
    const mha::attention_mask<Scalar> mask = mha::causal{};
    pooled_check<Scalar> packed_pool, loop_pool, packed_weights_pool, loop_weights_pool;
    for (int draw = 0; draw < 12; ++draw) {  // 12 × 90 outputs, 12 × 2 × 42 weights pooled
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        const mha::matrix<Scalar> xq = values.normal_matrix<Scalar>(10, batch.total_queries());
        const mha::matrix<Scalar> xk = values.normal_matrix<Scalar>(7, batch.total_keys());
        const mha::matrix<Scalar> xv = values.normal_matrix<Scalar>(4, batch.total_keys());
        for (const auto mode : {mha::weights_mode::per_head, mha::weights_mode::averaged}) {
            const Index per_sequence = mode == mha::weights_mode::per_head ? 3 : 1;
            const auto packed = layer.forward_with_weights(xq, xk, xv, batch, mode, mask);
            REQUIRE(packed.weights.size() == static_cast<std::size_t>(batch.size() * per_sequence));
            for (Index b = 0; b < batch.size(); ++b) {
                const auto bb = static_cast<std::size_t>(b);
                const Index q0 = batch.query_offset(b), k0 = batch.key_offset(b);
                const Index lq = query_lengths[bb], lk = key_lengths[bb];
                const mha::matrix<Scalar> xqb = xq.middleCols(q0, lq);
                const mha::matrix<Scalar> xkb = xk.middleCols(k0, lk);
                const mha::matrix<Scalar> xvb = xv.middleCols(k0, lk);
                const auto alone = layer.forward_with_weights(
                    xqb, xkb, xvb, mha::packed_batch::single(lq, lk), mode, mask);
                REQUIRE(alone.weights.size() == static_cast<std::size_t>(per_sequence));
                const auto r = reference_of(layer, xqb, xkb, xvb, [=](Index, Index j, Index i) {
                    return j <= i + (lk - lq);
                });
                packed_pool.add(packed.output.middleCols(q0, lq), r.out, r.base);
                loop_pool.add(alone.output, r.out, r.base);
                mat<long double> ref_mean = mat<long double>::Zero(lk, lq);
                mat<Scalar> base_mean = mat<Scalar>::Zero(lk, lq);
                for (std::size_t h = 0; h < 3; ++h) {
                    ref_mean += r.weights[h] / 3.0L;
                    base_mean += r.base_weights[h] / Scalar(3);
                }
                for (Index h = 0; h < per_sequence; ++h) {
                    const auto hh = static_cast<std::size_t>(h);
                    const auto& ref_w = per_sequence == 1 ? ref_mean : r.weights[hh];
                    const auto& base_w = per_sequence == 1 ? base_mean : r.base_weights[hh];
                    packed_weights_pool.add(
                        packed.weights[static_cast<std::size_t>(b * per_sequence + h)], ref_w,
                        base_w);
                    loop_weights_pool.add(alone.weights[hh], ref_w, base_w);
                }
            }
        }
    }
    packed_pool.require("packed output");
    loop_pool.require("per-sequence output");
    packed_weights_pool.require("packed weights");
    loop_weights_pool.require("per-sequence weights");
}

TEMPLATE_TEST_CASE("the fused self-attention path equals forward(x, x, x)", "[layer][property]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2005);
    mha::attention_config config;
    config.embed_dim = 12;
    config.num_heads = 4;
    config.value_head_dim = 5;  // d_k = 3
    config.bias = GENERATE(true, false);
    pooled_check<Scalar> fused_pool, cross_pool, fused_weights_pool, cross_weights_pool;
    for (int draw = 0; draw < 3; ++draw) {  // 3 × 480 outputs, 3 × 4504 weights pooled
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        for (const Index length : {Index{1}, Index{6}, Index{33}}) {
            const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(12, length);
            const mha::matrix<Scalar> bias = random_bias<Scalar>(length, length, values);
            const mha::attention_mask<Scalar> mask(mha::causal{}, mha::additive_bias<Scalar>(bias));
            const auto fused = layer.forward_with_weights(x, mha::weights_mode::per_head, mask);
            const auto cross =
                layer.forward_with_weights(x, x, x, mha::packed_batch::single(length, length),
                                           mha::weights_mode::per_head, mask);
            const auto r = reference_of(
                layer, x, x, x, [](Index, Index j, Index i) { return j <= i; },
                [bias](Index, Index j, Index i) { return static_cast<long double>(bias(j, i)); });
            fused_pool.add(fused.output, r.out, r.base);
            cross_pool.add(cross.output, r.out, r.base);
            REQUIRE(fused.weights.size() == 4);
            REQUIRE(cross.weights.size() == 4);
            for (std::size_t h = 0; h < 4; ++h) {
                fused_weights_pool.add(fused.weights[h], r.weights[h], r.base_weights[h]);
                cross_weights_pool.add(cross.weights[h], r.weights[h], r.base_weights[h]);
            }
        }
    }
    fused_pool.require("fused self-attention output");
    cross_pool.require("forward(x, x, x) output");
    fused_weights_pool.require("fused self-attention weights");
    cross_weights_pool.require("forward(x, x, x) weights");
}

TEMPLATE_TEST_CASE("from_packed equals the constructor taking separate parameters",
                   "[layer][property][parameters]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2006);
    const bool bias = GENERATE(true, false);
    mha::attention_config config;
    config.embed_dim = 12;
    config.num_heads = 3;
    config.bias = bias;
    // PyTorch's layout: in_proj_weight rows [0, E) are W_q, [E, 2E) W_k, [2E, 3E) W_v.
    const mha::matrix<Scalar> in_proj = values.normal_matrix<Scalar>(36, 12, 0.3);
    const mha::vector<Scalar> in_bias =
        bias ? mha::vector<Scalar>(values.normal_matrix<Scalar>(36, 1)) : mha::vector<Scalar>();
    const mha::matrix<Scalar> out_proj = values.normal_matrix<Scalar>(12, 12, 0.3);
    const mha::vector<Scalar> out_bias =
        bias ? mha::vector<Scalar>(values.normal_matrix<Scalar>(12, 1)) : mha::vector<Scalar>();
    const auto packed = mha::multi_head_attention<Scalar>::from_packed(config, in_proj, in_bias,
                                                                       out_proj, out_bias);

    mha::attention_parameters<Scalar> p;
    p.w_q = in_proj.topRows(12);
    p.w_k = in_proj.middleRows(12, 12);
    p.w_v = in_proj.bottomRows(12);
    p.w_o = out_proj;
    if (bias) {
        p.b_q = in_bias.head(12);
        p.b_k = in_bias.segment(12, 12);
        p.b_v = in_bias.tail(12);
        p.b_o = out_bias;
    }
    const mha::multi_head_attention<Scalar> separate(config, p);

    const auto got = packed.parameters();
    require_identical(got.w_q, p.w_q, "w_q");
    require_identical(got.w_k, p.w_k, "w_k");
    require_identical(got.w_v, p.w_v, "w_v");
    require_identical(got.w_o, p.w_o, "w_o");
    require_identical(got.b_q, p.b_q, "b_q");
    require_identical(got.b_k, p.b_k, "b_k");
    require_identical(got.b_v, p.b_v, "b_v");
    require_identical(got.b_o, p.b_o, "b_o");
    // The same stored numbers through the same code: the same bits.
    const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(12, 9);
    require_identical(packed.forward(x, mha::causal{}), separate.forward(x, mha::causal{}),
                      "self-attention output");
    const mha::matrix<Scalar> kv = values.normal_matrix<Scalar>(12, 4);
    require_identical(packed.forward(x, kv, kv), separate.forward(x, kv, kv),
                      "cross-attention output");
}

TEST_CASE("parameters() returns what the constructor was given", "[layer][parameters]") {
    mha_test::value_source values(2007);
    for (const Index kv_width : {Index{0}, Index{7}}) {  // stacked and separate storage
        const auto config = odd_widths_config(true, kv_width, kv_width == 0 ? 0 : 4);
        const auto p = random_parameters<double>(config, values);
        const auto got = mha::multi_head_attention<double>(config, p).parameters();
        require_identical(got.w_q, p.w_q, "w_q");
        require_identical(got.w_k, p.w_k, "w_k");
        require_identical(got.w_v, p.w_v, "w_v");
        require_identical(got.w_o, p.w_o, "w_o");
        require_identical(got.b_q, p.b_q, "b_q");
        require_identical(got.b_k, p.b_k, "b_k");
        require_identical(got.b_v, p.b_v, "b_v");
        require_identical(got.b_o, p.b_o, "b_o");
    }
}

namespace {

double max_abs(const mha::matrix<float>& m) {
    return static_cast<double>(m.cwiseAbs().maxCoeff());
}

}  // namespace

TEST_CASE("seeded initialisation: deterministic, PyTorch's distributions, zero biases",
          "[layer][init]") {
    mha::attention_config stacked;  // kdim = vdim = E: one Xavier bound over [W_q; W_k; W_v]
    stacked.embed_dim = 16;
    stacked.num_heads = 4;
    mha::attention_config separate = stacked;  // kdim, vdim ≠ E: one bound per matrix
    separate.key_input_dim = 15;
    separate.value_input_dim = 10;
    separate.value_head_dim = 6;

    SECTION("same seed, same weights; another seed, other weights") {
        for (const auto& config : {stacked, separate}) {
            const auto a = mha::multi_head_attention<float>(config, 42).parameters();
            const auto b = mha::multi_head_attention<float>(config, 42).parameters();
            const auto c = mha::multi_head_attention<float>(config, 43).parameters();
            require_identical(a.w_q, b.w_q, "w_q, same seed");
            require_identical(a.w_k, b.w_k, "w_k, same seed");
            require_identical(a.w_v, b.w_v, "w_v, same seed");
            require_identical(a.w_o, b.w_o, "w_o, same seed");
            CHECK(mha_test::max_abs_diff(a.w_q, c.w_q) > 0);
            CHECK(mha_test::max_abs_diff(a.w_k, c.w_k) > 0);
            CHECK(mha_test::max_abs_diff(a.w_v, c.w_v) > 0);
            CHECK(mha_test::max_abs_diff(a.w_o, c.w_o) > 0);
            // W_q, W_k and W_v are not copies of one another.
            CHECK(a.w_q.cwiseAbs().sum() != a.w_k.cwiseAbs().sum());
        }
    }

    SECTION("biases are zero, with the configured sizes") {
        const auto p = mha::multi_head_attention<float>(separate, 1).parameters();
        REQUIRE(p.b_q.size() == 16);
        REQUIRE(p.b_k.size() == 16);
        REQUIRE(p.b_v.size() == 24);
        REQUIRE(p.b_o.size() == 16);
        CHECK(p.b_q.isZero(0));
        CHECK(p.b_k.isZero(0));
        CHECK(p.b_v.isZero(0));
        CHECK(p.b_o.isZero(0));
        mha::attention_config no_bias = separate;
        no_bias.bias = false;
        const auto q = mha::multi_head_attention<float>(no_bias, 1).parameters();
        CHECK(q.b_q.size() == 0);
        CHECK(q.b_o.size() == 0);
    }

    // Each bound is checked from both sides: no weight beyond it, and some weight within 10 % of
    // it (for n uniform samples the largest falls short of 0.9·bound with probability 0.9^n, below
    // 1e-10 for the n ≥ 240 here), so a bound from the wrong fan-in or fan-out fails one side.
    auto require_uniform_within = [](const mha::matrix<float>& w, double bound,
                                     const std::string& what) {
        INFO(what << ": max |w| = " << max_abs(w) << ", bound " << bound);
        CHECK(max_abs(w) <= bound);
        CHECK(max_abs(w) >= 0.9 * bound);
    };

    SECTION("kdim = vdim = E: the bound of the stacked 3E x E matrix, sqrt(6 / (E + 3E))") {
        const auto p = mha::multi_head_attention<float>(stacked, 7).parameters();
        const double bound = std::sqrt(6.0 / (16 + 48));  // not sqrt(6 / (16 + 16)), ×1.41
        require_uniform_within(p.w_q, bound, "w_q");
        require_uniform_within(p.w_k, bound, "w_k");
        require_uniform_within(p.w_v, bound, "w_v");
        require_uniform_within(p.w_o, 1.0 / std::sqrt(16.0), "w_o: 1/sqrt(H·d_v)");
    }

    SECTION("kdim, vdim != E: one Xavier bound per matrix, sqrt(6 / (fan_in + fan_out))") {
        const auto p = mha::multi_head_attention<float>(separate, 7).parameters();
        require_uniform_within(p.w_q, std::sqrt(6.0 / (16 + 16)), "w_q, 16 x 16");
        require_uniform_within(p.w_k, std::sqrt(6.0 / (16 + 15)), "w_k, 16 x 15");
        require_uniform_within(p.w_v, std::sqrt(6.0 / (24 + 10)), "w_v, 24 x 10");
        require_uniform_within(p.w_o, 1.0 / std::sqrt(24.0), "w_o: 1/sqrt(H·d_v), 16 x 24");
    }

    SECTION("the documented platform-independent mapping: mt19937_64 bits to [-bound, bound)") {
        // W_q(0, 0) is the first number drawn: (2·(bits >> 11)·2^-53 − 1)·bound.
        std::mt19937_64 engine(7);
        const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;
        const double expected = (2.0 * unit - 1.0) * std::sqrt(6.0 / (16 + 48));
        const auto p = mha::multi_head_attention<double>(stacked, 7).parameters();
        CHECK(p.w_q(0, 0) == expected);
    }
}

namespace {

/// The key positions a mask excludes for every query, with the mask and its predicate.
template <class Scalar>
struct masked_keys_case {
    std::string name;
    mha::attention_mask<Scalar> mask;
    head_allowed_fn allowed;
    head_bias_fn bias;
    std::vector<Index> masked_keys;  // excluded for the queries in [0, checked_queries)
    Index checked_queries;           // later queries may see a masked key (causal)
};

/// Masks over lq = 5 queries and lk = 8 keys, each excluding some keys entirely.
template <class Scalar>
std::vector<masked_keys_case<Scalar>> masked_keys_cases(mha_test::value_source& values) {
    const Index lq = 5, lk = 8;
    std::vector<masked_keys_case<Scalar>> cases;
    cases.push_back({"key_lengths {5}",
                     mha::key_lengths{{5}},
                     [](Index, Index j, Index) { return j < 5; },
                     nullptr,
                     {5, 6, 7},
                     lq});
    mha::bool_matrix keep = random_keep(lk, lq, values);
    keep.row(1).setConstant(false);
    keep.row(4).setConstant(false);
    cases.push_back({"keep_mask without keys 1 and 4",
                     mha::keep_mask(keep),
                     [keep](Index, Index j, Index i) { return keep(j, i); },
                     nullptr,
                     {1, 4},
                     lq});
    mha::matrix<Scalar> bias = values.normal_matrix<Scalar>(lk, lq);
    bias.row(0).setConstant(-std::numeric_limits<Scalar>::infinity());
    bias.row(6).setConstant(-std::numeric_limits<Scalar>::infinity());
    cases.push_back(
        {"additive_bias of -inf on keys 0 and 6",
         mha::additive_bias<Scalar>(bias),
         nullptr,
         [bias](Index, Index j, Index i) { return static_cast<long double>(bias(j, i)); },
         {0, 6},
         lq});
    // Bottom-right: query i sees keys j ≤ i + 3, so key 7 is hidden from queries 0..3 only.
    cases.push_back({"causal, key 7 for queries 0..3",
                     mha::causal{},
                     [](Index, Index j, Index i) { return j <= i + 3; },
                     nullptr,
                     {7},
                     4});
    return cases;
}

}  // namespace

TEMPLATE_TEST_CASE("NaN, Inf or 1e30 in masked key/value inputs never reaches the output",
                   "[layer][property][poison]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2008);
    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    const Scalar inf = std::numeric_limits<Scalar>::infinity();
    pooled_check<Scalar> pool;                           // outputs computed with non-finite poison
    for (const Index kv_width : {Index{0}, Index{7}}) {  // stacked and separate projections
        const auto config = odd_widths_config(true, kv_width, kv_width == 0 ? 0 : 4);
        const mha::attention_config resolved = config.resolved();
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        const mha::matrix<Scalar> xq = values.normal_matrix<Scalar>(10, 5);
        const mha::matrix<Scalar> xk = values.normal_matrix<Scalar>(resolved.key_input_dim, 8);
        const mha::matrix<Scalar> xv = values.normal_matrix<Scalar>(resolved.value_input_dim, 8);
        for (const auto& c : masked_keys_cases<Scalar>(values)) {
            const mha::matrix<Scalar> clean = layer.forward(xq, xk, xv, c.mask);
            for (const Scalar poison : {Scalar(1e30), -Scalar(1e30), nan, inf, -inf}) {
                INFO(c.name << ", kdim " << resolved.key_input_dim << ", poison " << poison);
                // Poisoning an input column poisons that key's K and V in every head.
                mha::matrix<Scalar> pk = xk, pv = xv;
                for (const Index j : c.masked_keys) {
                    pk.col(j).setConstant(poison);
                    pv.col(j).setConstant(poison);
                }
                const mha::matrix<Scalar> out = layer.forward(xq, pk, pv, c.mask);
                const Index n = c.checked_queries;
                if (std::isfinite(poison)) {
                    // Scores of masked keys are replaced and their weights are exactly 0, so
                    // with finite poison every operation sees the same numbers: same bits.
                    require_identical(out.leftCols(n), clean.leftCols(n), "finite poison");
                } else {
                    // A NaN value column makes P·V NaN; the layer recomputes such columns from
                    // the allowed keys only, in another order, so compare with R.
                    REQUIRE(out.leftCols(n).allFinite());
                    const auto r = reference_of(layer, xq, pk, pv, c.allowed, c.bias);
                    pool.add(out.leftCols(n), r.out.leftCols(n), r.base.leftCols(n));
                }
                // A query that does see the poisoned key is poisoned: NaN propagates.
                if (std::isnan(poison) && n < out.cols())
                    REQUIRE(out.rightCols(out.cols() - n).array().isNaN().all());
            }
        }
    }

    SECTION("self-attention: poisoning token j poisons query j too, but not the queries before") {
        const auto config = odd_widths_config(true, 0, 0);
        const mha::multi_head_attention<Scalar> layer(config,
                                                      random_parameters<Scalar>(config, values));
        const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(10, 7);
        const mha::attention_mask<Scalar> mask = mha::key_lengths{{4}};
        const mha::matrix<Scalar> clean = layer.forward(x, mask);
        for (const Scalar poison : {Scalar(1e30), nan, inf}) {
            INFO("poison " << poison);
            mha::matrix<Scalar> px = x;
            px.rightCols(3).setConstant(poison);  // tokens 4, 5, 6: keys beyond key_lengths
            const mha::matrix<Scalar> out = layer.forward(px, mask);
            if (std::isfinite(poison)) {
                require_identical(out.leftCols(4), clean.leftCols(4), "finite poison");
            } else {
                REQUIRE(out.leftCols(4).allFinite());
                const auto r =
                    reference_of(layer, px, px, px, [](Index, Index j, Index) { return j < 4; });
                pool.add(out.leftCols(4), r.out.leftCols(4), r.base.leftCols(4));
            }
            if (std::isnan(poison)) REQUIRE(out.rightCols(3).array().isNaN().all());
        }
    }
    pool.require("outputs with non-finite poison in masked keys");
}

TEMPLATE_TEST_CASE("fully masked queries: output is the output bias, weights are exactly 0",
                   "[layer][property][masked]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2009);
    const bool bias = GENERATE(true, false);
    const auto norm = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                               mha::normalization::sigmoid);
    auto config = odd_widths_config(bias);
    config.attention.normalize = norm;
    const mha::multi_head_attention<Scalar> layer(config,
                                                  random_parameters<Scalar>(config, values));
    const mha::vector<Scalar> b_o = layer.parameters().b_o;
    INFO("bias " << bias << ", " << mha::to_string(norm));

    // Every head contributes exactly 0, so W_o·0 + b_o = b_o to the bit.
    auto require_masked = [&](const mha::matrix<Scalar>& q, const mha::matrix<Scalar>& k,
                              const mha::matrix<Scalar>& v, const mha::attention_mask<Scalar>& mask,
                              const std::vector<Index>& masked_queries, const std::string& what) {
        INFO(what);
        for (const auto mode : {mha::weights_mode::per_head, mha::weights_mode::averaged}) {
            const auto r = layer.forward_with_weights(
                q, k, v, mha::packed_batch::single(q.cols(), k.cols()), mode, mask);
            for (const Index i : masked_queries) {
                require_columns_equal_bias<Scalar>(r.output.col(i), b_o,
                                                   "output of query " + std::to_string(i));
                for (const auto& w : r.weights)
                    REQUIRE((w.col(i).array() == Scalar(0)).all());
            }
        }
    };
    const mha::matrix<Scalar> xq = values.normal_matrix<Scalar>(10, 5);
    const mha::matrix<Scalar> xk = values.normal_matrix<Scalar>(7, 6);
    const mha::matrix<Scalar> xv = values.normal_matrix<Scalar>(4, 6);

    mha::bool_matrix keep = mha::bool_matrix::Constant(6, 5, true);
    keep.col(0).setConstant(false);
    keep.col(3).setConstant(false);
    require_masked(xq, xk, xv, mha::keep_mask(keep), {0, 3}, "keep_mask empty for queries 0, 3");

    mha::matrix<Scalar> minus_inf = values.normal_matrix<Scalar>(6, 5);
    minus_inf.col(2).setConstant(-std::numeric_limits<Scalar>::infinity());
    require_masked(xq, xk, xv, mha::additive_bias<Scalar>(minus_inf), {2},
                   "additive_bias -inf for query 2");

    // key_lengths 0 hides every key, even NaN ones.
    const mha::matrix<Scalar> nan_k =
        mha::matrix<Scalar>::Constant(7, 6, std::numeric_limits<Scalar>::quiet_NaN());
    const mha::matrix<Scalar> nan_v =
        mha::matrix<Scalar>::Constant(4, 6, std::numeric_limits<Scalar>::quiet_NaN());
    require_masked(xq, nan_k, nan_v, mha::key_lengths{{0}}, {0, 1, 2, 3, 4},
                   "key_lengths {0} over NaN keys");

    // No keys at all.
    require_masked(xq, mha::matrix<Scalar>(7, 0), mha::matrix<Scalar>(4, 0), {}, {0, 1, 2, 3, 4},
                   "zero keys");
}

TEMPLATE_TEST_CASE("empty inputs give empty outputs", "[layer][property][empty]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(2010);
    const auto config = odd_widths_config(true);
    const mha::multi_head_attention<Scalar> layer(config,
                                                  random_parameters<Scalar>(config, values));
    const auto self_config = odd_widths_config(true, 0, 0);
    const mha::multi_head_attention<Scalar> self_layer(
        self_config, random_parameters<Scalar>(self_config, values));
    const mha::matrix<Scalar> no_tokens(10, 0);

    SECTION("self-attention over zero tokens") {
        CHECK(self_layer.forward(no_tokens).rows() == 10);
        CHECK(self_layer.forward(no_tokens).cols() == 0);
        CHECK(self_layer.forward(no_tokens, mha::causal{}).cols() == 0);
        const auto r = self_layer.forward_with_weights(no_tokens, mha::weights_mode::per_head);
        CHECK(r.output.rows() == 10);
        CHECK(r.output.cols() == 0);
        REQUIRE(r.weights.size() == 3);
        for (const auto& w : r.weights)
            CHECK(w.size() == 0);
    }
    SECTION("zero queries against some keys") {
        const auto r = layer.forward_with_weights(
            no_tokens, values.normal_matrix<Scalar>(7, 4), values.normal_matrix<Scalar>(4, 4),
            mha::packed_batch::single(0, 4), mha::weights_mode::averaged);
        CHECK(r.output.rows() == 10);
        CHECK(r.output.cols() == 0);
        REQUIRE(r.weights.size() == 1);
        CHECK(r.weights[0].rows() == 4);
        CHECK(r.weights[0].cols() == 0);
    }
    SECTION("a packed batch of empty sequences, and of no sequence at all") {
        for (const auto& lengths : {std::vector<Index>{0, 0, 0}, std::vector<Index>{}}) {
            const mha::matrix<Scalar> out =
                self_layer.forward(no_tokens, mha::packed_batch(lengths), mha::causal{});
            CHECK(out.rows() == 10);
            CHECK(out.cols() == 0);
            const auto r = layer.forward_with_weights(
                no_tokens, mha::matrix<Scalar>(7, 0), mha::matrix<Scalar>(4, 0),
                mha::packed_batch(lengths), mha::weights_mode::per_head);
            CHECK(r.output.cols() == 0);
            CHECK(r.weights.size() == 3 * lengths.size());
        }
    }
}

TEMPLATE_TEST_CASE("const forward from 4 threads equals serial calls", "[layer][threads]", float,
                   double) {
    using Scalar = TestType;
    mha_test::value_source values(2011);
    mha::attention_config config;
    config.embed_dim = 16;
    config.num_heads = 4;
    config.value_head_dim = 6;
    const mha::multi_head_attention<Scalar> layer(config,
                                                  random_parameters<Scalar>(config, values));

    // Inputs are made before any thread starts: value_source is not shared across threads.
    const std::vector<Index> lengths{5, 17, 33, 64};
    std::vector<mha::matrix<Scalar>> inputs;
    std::vector<mha::attention_mask<Scalar>> masks;
    for (const Index len : lengths) {
        inputs.push_back(values.normal_matrix<Scalar>(16, len));
        masks.emplace_back(mha::causal{}, mha::key_lengths{{len - 2}});
    }
    std::vector<mha::attention_result<Scalar>> serial;
    for (std::size_t t = 0; t < lengths.size(); ++t)
        serial.push_back(
            layer.forward_with_weights(inputs[t], mha::weights_mode::per_head, masks[t]));

    constexpr int repeats = 3;
    std::vector<std::vector<mha::attention_result<Scalar>>> threaded(lengths.size());
    std::vector<std::string> errors(lengths.size());
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < lengths.size(); ++t)
        threads.emplace_back([&, t] {
            try {  // Catch2's assertions are not thread-safe: collect, check after join.
                for (int rep = 0; rep < repeats; ++rep)
                    threaded[t].push_back(layer.forward_with_weights(
                        inputs[t], mha::weights_mode::per_head, masks[t]));
            } catch (const std::exception& e) {
                errors[t] = e.what();
            }
        });
    for (auto& th : threads)
        th.join();

    for (std::size_t t = 0; t < lengths.size(); ++t) {
        INFO("thread " << t << ", length " << lengths[t]);
        REQUIRE(errors[t].empty());
        REQUIRE(threaded[t].size() == static_cast<std::size_t>(repeats));
        for (const auto& r : threaded[t]) {
            // Same inputs, same code, same thread count: the same bits.
            require_identical(r.output, serial[t].output, "output");
            REQUIRE(r.weights.size() == serial[t].weights.size());
            for (std::size_t h = 0; h < r.weights.size(); ++h)
                require_identical(r.weights[h], serial[t].weights[h], "weights");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Errors: every bad setting, parameter shape, input shape and mask is rejected with
//    "<function>: <argument> must be <expected>, got <actual>".
// ---------------------------------------------------------------------------------------------

TEST_CASE("bad configs throw value_error or shape_error naming the setting", "[layer][errors]") {
    using layer = mha::multi_head_attention<float>;
    auto config = [] {
        mha::attention_config c;
        c.embed_dim = 8;
        c.num_heads = 2;
        return c;
    };
    REQUIRE_NOTHROW(layer(config()));

    auto c = config();
    c.embed_dim = 0;
    REQUIRE_THROWS_AS(layer(c), mha::value_error);
    REQUIRE_THROWS_WITH(layer(c), Equals("mha::attention_config: embed_dim must be >= 1, got 0"));
    c.embed_dim = -4;
    REQUIRE_THROWS_WITH(layer(c), Equals("mha::attention_config: embed_dim must be >= 1, got -4"));

    c = config();
    c.num_heads = 0;
    REQUIRE_THROWS_AS(layer(c), mha::value_error);
    REQUIRE_THROWS_WITH(layer(c), Equals("mha::attention_config: num_heads must be >= 1, got 0"));

    c = config();
    c.embed_dim = 10;
    c.num_heads = 3;
    REQUIRE_THROWS_AS(layer(c), mha::shape_error);
    REQUIRE_THROWS_WITH(layer(c), Equals("mha::attention_config: embed_dim must be a multiple of "
                                         "num_heads = 3 (or set head_dim), got 10"));
    c.head_dim = 4;  // an explicit head width lifts the requirement, as the message says
    REQUIRE_NOTHROW(layer(c));

    c = config();
    c.head_dim = -1;
    REQUIRE_THROWS_AS(layer(c), mha::value_error);
    REQUIRE_THROWS_WITH(layer(c), Equals("mha::attention_config: head_dim must be >= 0, got -1"));
    c = config();
    c.value_head_dim = -2;
    REQUIRE_THROWS_WITH(layer(c),
                        Equals("mha::attention_config: value_head_dim must be >= 0, got -2"));
    c = config();
    c.key_input_dim = -3;
    REQUIRE_THROWS_WITH(layer(c),
                        Equals("mha::attention_config: key_input_dim must be >= 0, got -3"));
    c = config();
    c.value_input_dim = -4;
    REQUIRE_THROWS_AS(layer(c), mha::value_error);
    REQUIRE_THROWS_WITH(layer(c),
                        Equals("mha::attention_config: value_input_dim must be >= 0, got -4"));

    c = config();
    c.attention.scale = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_AS(layer(c), mha::value_error);
    REQUIRE_THROWS_WITH(layer(c),
                        Equals("mha::attention_config: attention.scale must be finite, got nan"));
    c.attention.scale = std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_WITH(layer(c),
                        Equals("mha::attention_config: attention.scale must be finite, got inf"));
    c.attention.scale = -std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_AS(layer(c), mha::value_error);

    // The seeded and the parameter constructors and from_packed all validate the config.
    c = config();
    c.num_heads = 0;
    REQUIRE_THROWS_AS(layer(c, 1), mha::value_error);
    REQUIRE_THROWS_AS(layer(c, mha::attention_parameters<float>{}), mha::value_error);
    REQUIRE_THROWS_AS(layer::from_packed(c, mha::matrix<float>(24, 8), mha::vector<float>(24),
                                         mha::matrix<float>(8, 8), mha::vector<float>(8)),
                      mha::value_error);
    // Both error types are std::invalid_argument for callers that catch the standard type.
    REQUIRE_THROWS_AS(layer(c), std::invalid_argument);
}

TEST_CASE("parameters of the wrong shape throw shape_error naming the matrix", "[layer][errors]") {
    mha_test::value_source values(3001);
    const auto config = odd_widths_config(true);  // E 10, H 3, d_k 5, d_v 2, kdim 7, vdim 4
    const auto good = random_parameters<float>(config, values);
    using layer = mha::multi_head_attention<float>;
    REQUIRE_NOTHROW(layer(config, good));
    const char* where = "mha::multi_head_attention: ";

    auto p = good;
    p.w_q.resize(14, 10);
    REQUIRE_THROWS_AS(layer(config, p), mha::shape_error);
    REQUIRE_THROWS_WITH(layer(config, p),
                        Equals(std::string(where) +
                               "parameters.w_q.rows() must be 15 (num_heads · head_dim), got 14"));
    p = good;
    p.w_k = good.w_k.transpose();
    REQUIRE_THROWS_WITH(
        layer(config, p),
        Equals(std::string(where) +
               "parameters.w_k.rows() must be 15 (num_kv_heads · head_dim), got 7"));
    p = good;
    p.w_k.resize(15, 10);  // kdim 7, not E
    REQUIRE_THROWS_WITH(
        layer(config, p),
        Equals(std::string(where) + "parameters.w_k.cols() must be 7 (key_input_dim), got 10"));
    p = good;
    p.w_v.resize(6, 5);
    REQUIRE_THROWS_WITH(
        layer(config, p),
        Equals(std::string(where) + "parameters.w_v.cols() must be 4 (value_input_dim), got 5"));
    p = good;
    p.w_o.resize(10, 15);  // H·d_v = 6, not H·d_k
    REQUIRE_THROWS_WITH(
        layer(config, p),
        Equals(std::string(where) +
               "parameters.w_o.cols() must be 6 (num_heads · value_head_dim), got 15"));
    p = good;
    p.b_v.resize(5);
    REQUIRE_THROWS_WITH(
        layer(config, p),
        Equals(std::string(where) +
               "parameters.b_v.size() must be 6 (num_kv_heads · value_head_dim), got 5"));
    p = good;
    p.b_o.resize(0);
    REQUIRE_THROWS_AS(layer(config, p), mha::shape_error);

    auto no_bias = config;
    no_bias.bias = false;
    REQUIRE_THROWS_AS(layer(no_bias, good), mha::shape_error);
    REQUIRE_THROWS_WITH(layer(no_bias, good),
                        Equals(std::string(where) +
                               "parameters.b_q.size() must be 0 (no bias configured), got 15"));
    p = random_parameters<float>(no_bias, values);
    REQUIRE_NOTHROW(layer(no_bias, p));
}

TEST_CASE("from_packed rejects packed parameters of the wrong shape", "[layer][errors]") {
    using layer = mha::multi_head_attention<double>;
    mha::attention_config config;
    config.embed_dim = 8;
    config.num_heads = 2;
    const mha::matrix<double> in_proj = mha::matrix<double>::Zero(24, 8);
    const mha::vector<double> in_bias = mha::vector<double>::Zero(24);
    const mha::matrix<double> out_proj = mha::matrix<double>::Zero(8, 8);
    const mha::vector<double> out_bias = mha::vector<double>::Zero(8);
    REQUIRE_NOTHROW(layer::from_packed(config, in_proj, in_bias, out_proj, out_bias));
    const char* where = "mha::multi_head_attention::from_packed: ";

    REQUIRE_THROWS_AS(layer::from_packed(config, in_proj.topRows(16), in_bias, out_proj, out_bias),
                      mha::shape_error);
    REQUIRE_THROWS_WITH(
        layer::from_packed(config, in_proj.topRows(16), in_bias, out_proj, out_bias),
        Equals(std::string(where) +
               "in_proj_weight.rows() must be 24 (H·d_k + H_kv·(d_k + d_v)), got 16"));
    REQUIRE_THROWS_WITH(
        layer::from_packed(config, in_proj.leftCols(6), in_bias, out_proj, out_bias),
        Equals(std::string(where) + "in_proj_weight.cols() must be 8 (embed_dim), got 6"));
    REQUIRE_THROWS_WITH(layer::from_packed(config, in_proj, in_bias.head(23), out_proj, out_bias),
                        Equals(std::string(where) +
                               "in_proj_bias.size() must be 24 (in_proj_weight.rows()), got 23"));
    REQUIRE_THROWS_AS(layer::from_packed(config, in_proj, in_bias, out_proj.leftCols(7), out_bias),
                      mha::shape_error);
    REQUIRE_THROWS_WITH(
        layer::from_packed(config, in_proj, in_bias, out_proj.leftCols(7), out_bias),
        Equals(std::string(where) +
               "out_proj.weight.cols() must be 8 (num_heads · value_head_dim), got 7"));
    REQUIRE_THROWS_AS(layer::from_packed(config, in_proj, in_bias, out_proj, out_bias.head(7)),
                      mha::shape_error);
    REQUIRE_THROWS_WITH(
        layer::from_packed(config, in_proj, in_bias, out_proj, out_bias.head(7)),
        Equals(std::string(where) + "out_proj.bias.size() must be 8 (embed_dim), got 7"));

    // Packed weights exist only when keys and values come from width E, as in PyTorch.
    auto other_kdim = config;
    other_kdim.key_input_dim = 5;
    REQUIRE_THROWS_AS(layer::from_packed(other_kdim, in_proj, in_bias, out_proj, out_bias),
                      mha::value_error);
    REQUIRE_THROWS_WITH(
        layer::from_packed(other_kdim, in_proj, in_bias, out_proj, out_bias),
        Equals(std::string(where) +
               "config.key_input_dim must be embed_dim = 8 for packed weights, got 5"));
    auto other_vdim = config;
    other_vdim.value_input_dim = 3;
    REQUIRE_THROWS_WITH(
        layer::from_packed(other_vdim, in_proj, in_bias, out_proj, out_bias),
        Equals(std::string(where) +
               "config.value_input_dim must be embed_dim = 8 for packed weights, got 3"));

    auto no_bias = config;
    no_bias.bias = false;
    REQUIRE_NOTHROW(layer::from_packed(no_bias, in_proj, mha::vector<double>(), out_proj,
                                       mha::vector<double>()));
    REQUIRE_THROWS_WITH(
        layer::from_packed(no_bias, in_proj, in_bias, out_proj, mha::vector<double>()),
        Equals(std::string(where) + "in_proj_bias.size() must be 0 (no bias configured), got 24"));
    REQUIRE_THROWS_WITH(
        layer::from_packed(no_bias, in_proj, mha::vector<double>(), out_proj, out_bias),
        Equals(std::string(where) + "out_proj.bias.size() must be 0 (no bias configured), got 8"));
}

TEST_CASE("inputs of the wrong shape throw shape_error naming the input", "[layer][errors]") {
    mha_test::value_source values(3002);
    const auto config = odd_widths_config(true);  // E 10, kdim 7, vdim 4
    const mha::multi_head_attention<float> layer(config, random_parameters<float>(config, values));
    const mha::matrix<float> q = values.normal_matrix<float>(10, 3);
    const mha::matrix<float> k = values.normal_matrix<float>(7, 5);
    const mha::matrix<float> v = values.normal_matrix<float>(4, 5);
    REQUIRE_NOTHROW(layer.forward(q, k, v));
    const std::string where = "mha::multi_head_attention::forward: ";

    REQUIRE_THROWS_AS(layer.forward(q.topRows(9), k, v), mha::shape_error);
    REQUIRE_THROWS_WITH(layer.forward(q.topRows(9), k, v),
                        Equals(where + "query.rows() must be 10 (embed_dim), got 9"));
    REQUIRE_THROWS_WITH(layer.forward(q, v, v),
                        Equals(where + "key.rows() must be 7 (key_input_dim), got 4"));
    REQUIRE_THROWS_WITH(layer.forward(q, k, k),
                        Equals(where + "value.rows() must be 4 (value_input_dim), got 7"));
    REQUIRE_THROWS_WITH(layer.forward(q, k, v.leftCols(4)),
                        Equals(where + "value.cols() must be 5 (key.cols()), got 4"));
    // Self-attention needs kdim = vdim = E: this layer's x cannot be a key.
    REQUIRE_THROWS_WITH(layer.forward(q),
                        Equals(where + "key.rows() must be 7 (key_input_dim), got 10"));

    // Batch totals.
    const mha::packed_batch batch({1, 3}, {2, 2});  // 4 queries, 4 keys
    REQUIRE_THROWS_AS(layer.forward(q, k.leftCols(4), v.leftCols(4), batch), mha::shape_error);
    REQUIRE_THROWS_WITH(
        layer.forward(q, k.leftCols(4), v.leftCols(4), batch),
        Equals(where + "query.cols() must be 4 (the batch's total query count), got 3"));
    const mha::matrix<float> q4 = values.normal_matrix<float>(10, 4);
    REQUIRE_NOTHROW(layer.forward(q4, k.leftCols(4), v.leftCols(4), batch));
    REQUIRE_THROWS_WITH(
        layer.forward(q4, k, v, batch),
        Equals(where + "key.cols() must be 4 (the batch's total key count), got 5"));
    REQUIRE_THROWS_AS(layer.forward_with_weights(q4, k, v, batch, mha::weights_mode::per_head),
                      mha::shape_error);

    const auto self_config = odd_widths_config(true, 0, 0);
    const mha::multi_head_attention<float> self_layer(
        self_config, random_parameters<float>(self_config, values));
    REQUIRE_THROWS_WITH(
        self_layer.forward(q, mha::packed_batch({2, 2})),
        Equals(where + "query.cols() must be 4 (the batch's total query count), got 3"));
    REQUIRE_THROWS_AS(self_layer.forward_with_weights(q.topRows(8), mha::weights_mode::averaged),
                      mha::shape_error);

    // A PyTorch-style row-major (L, E) buffer mapped as L × E: the message names the likely
    // mistake when the shape looks transposed, and only then (the topRows(9) cases above).
    const std::string transposed_hint =
        "; did you map a row-major (L, E) buffer as L × E? columns are tokens";
    const std::vector<float> row_major(3 * 10, 0.5F);  // (L = 3, E = 10)
    const Eigen::Map<const mha::matrix<float>> mapped(row_major.data(), 3, 10);
    REQUIRE_THROWS_AS(self_layer.forward(mapped), mha::shape_error);
    REQUIRE_THROWS_WITH(
        self_layer.forward(mapped),
        Equals(where + "query.rows() must be 10 (embed_dim), got 3" + transposed_hint));
    // Rows equal to the batch's token count, columns not the width: still that mistake.
    REQUIRE_THROWS_WITH(
        self_layer.forward(values.normal_matrix<float>(4, 9), mha::packed_batch({2, 2})),
        Equals(where + "query.rows() must be 10 (embed_dim), got 4" + transposed_hint));
    REQUIRE_THROWS_WITH(
        layer.forward(q, values.normal_matrix<float>(5, 7), v),
        Equals(where + "key.rows() must be 7 (key_input_dim), got 5" + transposed_hint));
    // Neither the rows nor the columns fit that mistake: the plain message.
    REQUIRE_THROWS_WITH(
        self_layer.forward(values.normal_matrix<float>(6, 9), mha::packed_batch({2, 2})),
        Equals(where + "query.rows() must be 10 (embed_dim), got 6"));

    // Packed batches check their own lengths.
    REQUIRE_THROWS_AS(mha::packed_batch({2, -1}), mha::value_error);
    REQUIRE_THROWS_WITH(mha::packed_batch({2, -1}),
                        Equals("mha::packed_batch: query_lengths[1] must be >= 0, got -1"));
    REQUIRE_THROWS_WITH(mha::packed_batch({1, 2}, {3}),
                        Equals("mha::packed_batch: key_lengths.size() must be 2 "
                               "(query_lengths.size()), got 1"));
}

TEST_CASE("masks that do not fit the inputs are rejected", "[layer][errors]") {
    mha_test::value_source values(3003);
    const auto config = odd_widths_config(true);  // H 3
    const mha::multi_head_attention<double> layer(config,
                                                  random_parameters<double>(config, values));
    const mha::matrix<double> q = values.normal_matrix<double>(10, 3);
    const mha::matrix<double> k = values.normal_matrix<double>(7, 5);
    const mha::matrix<double> v = values.normal_matrix<double>(4, 5);
    const std::string where = "mha::multi_head_attention::forward: ";
    using mask = mha::attention_mask<double>;

    REQUIRE_THROWS_AS(layer.forward(q, k, v, mha::key_lengths{{2, 3}}), mha::shape_error);
    REQUIRE_THROWS_WITH(
        layer.forward(q, k, v, mha::key_lengths{{2, 3}}),
        Equals(where + "key_lengths.lengths.size() must be 1 (one per sequence), got 2"));
    REQUIRE_THROWS_WITH(
        layer.forward(q, k, v, mha::key_lengths{{6}}),
        Equals(where + "key_lengths.lengths[0] must be <= 5 (keys in sequence), got 6"));
    REQUIRE_NOTHROW(layer.forward(q, k, v, mha::key_lengths{{5}}));

    // keep_mask and additive_bias are Lk × Lq (keys by rows), 1, B or B·H of them.
    const mha::bool_matrix transposed = mha::bool_matrix::Constant(3, 5, true);
    REQUIRE_THROWS_AS(layer.forward(q, k, v, mha::keep_mask(transposed)), mha::shape_error);
    REQUIRE_THROWS_WITH(layer.forward(q, k, v, mha::keep_mask(transposed)),
                        Equals(where + "keep_mask[0].rows() must be 5 (keys in sequence), got 3"));
    const std::vector<mha::bool_matrix> two(2, mha::bool_matrix::Constant(5, 3, true));
    REQUIRE_THROWS_WITH(layer.forward(q, k, v, mha::keep_mask(two)),
                        Equals(where + "keep_mask count must be 1, 1 (sequences) or 3 (sequences x "
                                       "heads), got 2"));
    REQUIRE_THROWS_WITH(
        layer.forward(q, k, v, mha::additive_bias<double>(mha::matrix<double>::Zero(5, 4))),
        Equals(where + "additive_bias[0].cols() must be 3 (queries in sequence), got 4"));

    // Per-sequence masks in a batch are checked against their own sequence.
    const mha::packed_batch batch({1, 2}, {2, 3});
    const mha::matrix<double> kb = k, vb = v;
    std::vector<mha::bool_matrix> per_sequence{mha::bool_matrix::Constant(2, 1, true),
                                               mha::bool_matrix::Constant(2, 2, true)};
    REQUIRE_THROWS_WITH(layer.forward(q, kb, vb, batch, mha::keep_mask(per_sequence)),
                        Equals(where + "keep_mask[1].rows() must be 3 (keys in sequence), got 2"));
    REQUIRE_THROWS_WITH(
        layer.forward(q, kb, vb, batch, mha::key_lengths{{2, 4}}),
        Equals(where + "key_lengths.lengths[1] must be <= 3 (keys in sequence), got 4"));

    // Settings outside their domain are value_error, raised when the mask is built.
    REQUIRE_THROWS_AS(layer.forward(q, k, v, mha::sliding_window{-1, 0}), mha::value_error);
    REQUIRE_THROWS_WITH(mask(mha::sliding_window{-1, 0}),
                        Equals("mha::sliding_window: left must be >= 0, got -1"));
    REQUIRE_THROWS_WITH(mask(mha::sliding_window{0, -2}),
                        Equals("mha::sliding_window: right must be >= 0, got -2"));
    REQUIRE_THROWS_WITH(mask(mha::key_lengths{{-1}}),
                        Equals("mha::key_lengths: lengths[0] must be >= 0, got -1"));
    REQUIRE_THROWS_AS(mask(mha::causal{}, mha::causal{mha::causal_alignment::top_left}),
                      mha::value_error);
}

TEST_CASE("forward_into with a workspace equals forward and reuses its buffers",
          "[layer][workspace]") {
    mha::attention_config config;
    config.embed_dim = 12;
    config.num_heads = 3;
    const mha::multi_head_attention<double> layer(config, 11);
    mha_test::value_source values(404);
    const auto x = values.normal_matrix<double>(12, 3 + 5);
    const mha::packed_batch batch({3, 5});
    const mha::attention_mask<double> mask(mha::causal{});
    const mha::matrix<double> expected = layer.forward(x, batch, mask);

    mha::forward_workspace<double> workspace;
    mha::matrix<double> out(12, 8);
    layer.forward_into(x, batch, mask, out, workspace);
    // The same kernels in the same order: the results are identical, not merely close.
    CHECK(out == expected);
    const double* qkv = workspace.qkv.data();
    const double* heads = workspace.heads.data();
    out.setZero();
    layer.forward_into(x, batch, mask, out, workspace);
    CHECK(out == expected);
    CHECK(workspace.qkv.data() == qkv);  // same shapes: the buffers were kept, not reallocated
    CHECK(workspace.heads.data() == heads);

    // Cross-attention form, writing into a block of a bigger matrix.
    const auto memory = values.normal_matrix<double>(12, 4 + 6);
    const mha::packed_batch cross({3, 5}, {4, 6});
    mha::matrix<double> big = mha::matrix<double>::Zero(20, 8);
    layer.forward_into(x, memory, memory, cross, {}, big.topRows(12), workspace);
    CHECK(big.topRows(12) == layer.forward(x, memory, memory, cross));
    CHECK(big.bottomRows(8).isZero(0));

    mha::matrix<double> wrong(12, 7);
    REQUIRE_THROWS_WITH(layer.forward_into(x, batch, mask, wrong, workspace),
                        Catch::Matchers::Equals("mha::multi_head_attention::forward: out.cols() "
                                                "must be 8 (query.cols()), got 7"));
}

TEMPLATE_TEST_CASE(
    "self-attention with weights over a packed batch matches the reference per "
    "sequence",
    "[layer][batch][reference]", float, double) {
    using Scalar = TestType;
    // forward_with_weights(x, batch, mode, mask): x projected by the fused GEMM as in forward,
    // each sequence attending only to itself. Sequence 1 is empty; sequence 3 has one token.
    mha::attention_config config;
    config.embed_dim = 12;
    config.num_heads = 3;
    const std::vector<Index> lengths = {5, 0, 9, 1};
    const std::vector<Index> kept = {3, 0, 7, 1};
    const mha::packed_batch batch(lengths);
    const Scalar scale = static_cast<Scalar>(0.5L);  // 1/√d_k, d_k = 4
    mha_test::value_source values(9090);
    // Weights of sequences of different lengths are pooled as rows (n·n entries each).
    auto as_row = [](const auto& m) {
        using M = std::decay_t<decltype(m)>;
        return M(Eigen::Map<const M>(m.data(), 1, m.size()));
    };
    for (const bool masked : {false, true}) {
        const mha::attention_mask<Scalar> mask =
            masked ? mha::attention_mask<Scalar>(mha::causal{}, mha::key_lengths{kept})
                   : mha::attention_mask<Scalar>();
        pooled_results<Scalar> pooled;
        for (int draw = 0; draw < 16; ++draw) {
            const auto params = random_parameters<Scalar>(config, values);
            const mha::multi_head_attention<Scalar> layer(config, params);
            const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(12, batch.total_queries());
            const auto per_head =
                layer.forward_with_weights(x, batch, mha::weights_mode::per_head, mask);
            const auto averaged =
                layer.forward_with_weights(x, batch, mha::weights_mode::averaged, mask);
            // The same computation as forward: the same bits.
            require_identical(per_head.output, layer.forward(x, batch, mask), "output");
            require_identical(averaged.output, per_head.output, "output with averaged weights");
            REQUIRE(per_head.weights.size() == 12);
            REQUIRE(averaged.weights.size() == 4);
            for (Index b = 0; b < batch.size(); ++b) {
                const Index n = batch.query_length(b), at = batch.query_offset(b);
                const Index len = kept[static_cast<std::size_t>(b)];
                const head_allowed_fn allowed = [=](Index, Index j, Index i) {
                    return !masked || (j <= i && j < len);
                };
                const mha::matrix<Scalar> xb = x.middleCols(at, n);
                std::vector<mat<long double>> ref_weights;
                const mat<long double> ref = mha_test::reference_layer<long double>(
                    to_reference<long double>(params), 3, xb.template cast<long double>(),
                    xb.template cast<long double>(), xb.template cast<long double>(),
                    static_cast<long double>(scale), allowed, nullptr, mha_test::norm_kind::softmax,
                    &ref_weights);
                std::vector<mat<Scalar>> base_weights;
                const mat<Scalar> base = mha_test::reference_layer<Scalar>(
                    to_reference<Scalar>(params), 3, xb, xb, xb, scale, allowed, nullptr,
                    mha_test::norm_kind::softmax, &base_weights);
                append_columns(pooled.out, mha::matrix<Scalar>(per_head.output.middleCols(at, n)));
                append_columns(pooled.out_ref, ref);
                append_columns(pooled.out_base, base);
                mat<long double> ref_mean = mat<long double>::Zero(n, n);
                mat<Scalar> base_mean = mat<Scalar>::Zero(n, n);
                for (Index h = 0; h < 3; ++h) {
                    const auto hi = static_cast<std::size_t>(h);
                    const auto& w = per_head.weights[static_cast<std::size_t>(b * 3 + h)];
                    REQUIRE(w.rows() == n);
                    REQUIRE(w.cols() == n);
                    append_columns(pooled.heads, as_row(w));
                    append_columns(pooled.heads_ref, as_row(ref_weights[hi]));
                    append_columns(pooled.heads_base, as_row(base_weights[hi]));
                    ref_mean += ref_weights[hi] / 3.0L;
                    base_mean += base_weights[hi] / Scalar(3);
                }
                append_columns(pooled.mean, as_row(averaged.weights[static_cast<std::size_t>(b)]));
                append_columns(pooled.mean_ref, as_row(ref_mean));
                append_columns(pooled.mean_base, as_row(base_mean));
            }
        }
        INFO((masked ? "causal + key_lengths" : "no mask"));
        require_case_within_baseline(pooled);
    }
}
