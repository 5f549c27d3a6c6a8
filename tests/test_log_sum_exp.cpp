// SPDX-License-Identifier: MIT
// The per-query log-sum-exp that attention_request{..., true} returns (options.hpp): both
// kernels against the long-double reference, over shapes that reach the tiled kernel's query
// and key block boundaries and its split-KV decode path, every mask kind, packed batches with
// several heads; exact −∞ for queries with nothing to attend to; outputs unchanged by asking;
// the error for normalisations without a log-sum-exp; and the property a backward pass and a
// state merge rely on: partial results over disjoint key sets combine into the full result.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/attention.hpp>

#include "check.hpp"
#include "reference.hpp"

using Catch::Matchers::Equals;
using mha::Index;
using mha_test::mat;
using mha_test::unit_roundoff;

namespace {

const std::vector<mha::attention_algorithm> both_algorithms = {
    mha::attention_algorithm::materialized, mha::attention_algorithm::tiled};

const char* name_of(mha::attention_algorithm a) {
    return a == mha::attention_algorithm::tiled ? "tiled" : "materialized";
}

/// A mask in the library's form and, independently, as a predicate and a bias for the reference.
template <class Scalar>
struct mask_case {
    std::string name;
    mha::attention_mask<Scalar> mask;
    mha_test::allowed_fn allowed = mha_test::allow_all();
    mha_test::bias_fn bias = nullptr;
};

template <class Scalar>
std::vector<mask_case<Scalar>> mask_cases(Index lq, Index lk, mha_test::value_source& values) {
    std::vector<mask_case<Scalar>> cases;
    cases.push_back({"none", {}});
    const Index shift = lk - lq;
    cases.push_back(
        {"causal", mha::causal{}, [shift](Index j, Index i) { return j <= i + shift; }});
    const Index length = lk / 2;  // 0 for Lk = 1: every query has nothing to attend to
    cases.push_back({"key_lengths", mha::key_lengths{{length}},
                     [length](Index j, Index) { return j < length; }});
    cases.push_back({"sliding window", mha::sliding_window{4, 2}, [shift](Index j, Index i) {
                         return j >= i + shift - 4 && j <= i + shift + 2;
                     }});
    mha::bool_matrix keep(lk, lq);
    mat<Scalar> bias(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
            keep(j, i) = values.uniform(0, 1) < 0.7;
            bias(j, i) = values.uniform(0, 1) < 0.1 ? -std::numeric_limits<Scalar>::infinity()
                                                    : static_cast<Scalar>(values.uniform(-2, 2));
        }
    cases.push_back(
        {"keep_mask", mha::keep_mask(keep), [keep](Index j, Index i) { return keep(j, i); }});
    cases.push_back({"additive_bias", mha::additive_bias<Scalar>(bias), mha_test::allow_all(),
                     [bias](Index j, Index i) { return static_cast<long double>(bias(j, i)); }});
    return cases;
}

/// The reference log-sum-exp of each query, in long double, and the size of its terms.
struct reference_lse {
    std::vector<long double> value;  // log Σ_j exp(s_ij) over allowed keys; −∞ when none
    std::vector<long double> smax;   // max over allowed j of |scale|·Σ_d |q_di·k_dj| + |bias_ji|
    std::vector<Index> keys;         // allowed keys of each query
};

reference_lse reference_log_sum_exp(const mat<long double>& q, const mat<long double>& k,
                                    long double scale, const mha_test::allowed_fn& allowed,
                                    const mha_test::bias_fn& bias) {
    const long double minus_inf = -std::numeric_limits<long double>::infinity();
    reference_lse r;
    for (Index i = 0; i < q.cols(); ++i) {
        std::vector<long double> s;
        long double smax = 0;
        for (Index j = 0; j < k.cols(); ++j) {
            if (!allowed(j, i)) continue;
            const long double b = bias ? bias(j, i) : 0.0L;
            if (b == minus_inf) continue;
            long double dot = 0, terms = 0;
            for (Index d = 0; d < q.rows(); ++d) {
                dot += q(d, i) * k(d, j);
                terms += std::fabs(q(d, i) * k(d, j));
            }
            s.push_back(scale * dot + b);
            smax = std::max(smax, std::fabs(scale) * terms + std::fabs(b));
        }
        long double value = minus_inf;
        if (!s.empty()) {
            const long double m = *std::max_element(s.begin(), s.end());
            long double sum = 0;
            for (const long double x : s)
                sum += std::exp(x - m);
            value = m + std::log(sum);
        }
        r.value.push_back(value);
        r.smax.push_back(smax);
        r.keys.push_back(static_cast<Index>(s.size()));
    }
    return r;
}

/// |L − R| ≤ 8·u·(1 + Smax) + (n + 2)·u + u·|R| per query, and exactly −∞ where R is −∞.
/// Why: L = m + log l is 1-Lipschitz in every score (a change δ in the scores moves it by at most
/// max|δ|), and each computed score carries the error check A allows it, 8·u·(1 + Smax)
/// (check.hpp, calibrated for the same scores); l sums n positive terms, so its relative error
/// is at most γ_n ≈ n·u, which log turns into an absolute error of n·u; the exp, the log and the
/// final addition add a few u, two of them relative to |L|. A wrong scale, a missing max shift,
/// a missing log or a dropped or extra key moves L by far more for the shapes here (a key's
/// share of l is at least exp(−2·Smax)/n).
template <class Scalar>
void require_lse_close(const Scalar* lse, Index stride, const reference_lse& ref,
                       const std::string& what) {
    const long double u = unit_roundoff<Scalar>();
    for (std::size_t i = 0; i < ref.value.size(); ++i) {
        const long double got = lse[static_cast<Index>(i) * stride];
        CAPTURE(what, i, got, ref.value[i], ref.keys[i]);
        if (std::isinf(ref.value[i])) {
            REQUIRE(got == -std::numeric_limits<Scalar>::infinity());
            continue;
        }
        const long double bound = 8 * u * (1 + ref.smax[i]) +
                                  static_cast<long double>(ref.keys[i] + 2) * u +
                                  u * std::fabs(ref.value[i]);
        CAPTURE(bound);
        REQUIRE(std::fabs(got - ref.value[i]) <= bound);
    }
}

}  // namespace

// Shapes: single entries, Lq > Lk (bottom-right causal leaves queries with no key), crossing the
// tiled kernel's 128-query and 512-key blocks (so the running max is rescaled), and one query
// over 2100 keys, which the tiled kernel splits into chunks merged by log-sum-exp.
TEMPLATE_TEST_CASE("log-sum-exp of both kernels against the long-double reference", "[log_sum_exp]",
                   float, double) {
    using Scalar = TestType;
    const std::vector<std::pair<Index, Index>> shapes = {{1, 1},   {4, 9},     {9, 4},
                                                         {33, 70}, {130, 600}, {1, 2100}};
    mha_test::value_source values(5150);
    const Index dk = 8, dv = 3;
    for (const auto& shape : shapes) {
        const Index lq = shape.first, lk = shape.second;
        const mat<Scalar> q = values.normal_matrix<Scalar>(dk, lq, 1.5);
        const mat<Scalar> k = values.normal_matrix<Scalar>(dk, lk, 1.5);
        const mat<Scalar> v = values.normal_matrix<Scalar>(dv, lk);
        const long double scale =
            static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(dk)));
        for (const auto& m : mask_cases<Scalar>(lq, lk, values)) {
            const reference_lse ref =
                reference_log_sum_exp(q.template cast<long double>(),
                                      k.template cast<long double>(), scale, m.allowed, m.bias);
            for (const auto algorithm : both_algorithms) {
                const std::string what = m.name + " " + std::to_string(lq) + "x" +
                                         std::to_string(lk) + " " + name_of(algorithm);
                mha::attention_options options;
                options.algorithm = algorithm;
                mat<Scalar> out(dv, lq), plain(dv, lq);
                const auto extra = mha::scaled_dot_product_attention(
                    q, k, v, out, m.mask, options, {mha::weights_mode::none, true});
                REQUIRE(extra.weights.empty());
                REQUIRE(extra.log_sum_exp.rows() == 1);
                REQUIRE(extra.log_sum_exp.cols() == lq);
                require_lse_close(extra.log_sum_exp.data(), 1, ref, what);
                // Asking for the log-sum-exp changes nothing else: the same bits come out.
                const auto none =
                    mha::scaled_dot_product_attention(q, k, v, plain, m.mask, options);
                REQUIRE(none.log_sum_exp.size() == 0);
                REQUIRE(plain == out);
            }
        }
    }
}

TEMPLATE_TEST_CASE("log-sum-exp of a packed multi-head batch is H x Nq, per sequence and head",
                   "[log_sum_exp][batch]", float, double) {
    using Scalar = TestType;
    // An empty sequence, a decode step over a long cache (split), and one crossing both blocks.
    const mha::packed_batch batch({3, 0, 130, 1}, {5, 4, 600, 2100});
    const Index heads = 2, dk = 4, dv = 3;
    mha_test::value_source values(6160);
    const mat<Scalar> q = values.normal_matrix<Scalar>(heads * dk, batch.total_queries(), 1.5);
    const mat<Scalar> k = values.normal_matrix<Scalar>(heads * dk, batch.total_keys(), 1.5);
    const mat<Scalar> v = values.normal_matrix<Scalar>(heads * dv, batch.total_keys());
    const std::vector<Index> lengths = {4, 0, 300, 2000};
    const long double scale = static_cast<Scalar>(0.5L);  // 1/√d_k
    for (const bool masked : {false, true}) {
        const mha::attention_mask<Scalar> mask =
            masked ? mha::attention_mask<Scalar>(mha::causal{}, mha::key_lengths{lengths})
                   : mha::attention_mask<Scalar>();
        for (const auto algorithm : both_algorithms) {
            mha::attention_options options;
            options.algorithm = algorithm;
            mat<Scalar> out(heads * dv, batch.total_queries());
            const auto extra = mha::multi_head_attention_core(
                q, k, v, heads, batch, out, mask, options, {mha::weights_mode::none, true});
            REQUIRE(extra.log_sum_exp.rows() == heads);
            REQUIRE(extra.log_sum_exp.cols() == batch.total_queries());
            for (Index b = 0; b < batch.size(); ++b) {
                const Index lq = batch.query_length(b), lk = batch.key_length(b);
                const Index q0 = batch.query_offset(b), k0 = batch.key_offset(b);
                const Index len = lengths[static_cast<std::size_t>(b)];
                const mha_test::allowed_fn allowed = [=](Index j, Index i) {
                    return !masked || (j <= i + lk - lq && j < len);
                };
                for (Index h = 0; h < heads; ++h) {
                    const reference_lse ref = reference_log_sum_exp(
                        q.block(h * dk, q0, dk, lq).template cast<long double>(),
                        k.block(h * dk, k0, dk, lk).template cast<long double>(), scale, allowed,
                        nullptr);
                    require_lse_close(extra.log_sum_exp.data() + q0 * heads + h, heads, ref,
                                      std::string(name_of(algorithm)) + " sequence " +
                                          std::to_string(b) + " head " + std::to_string(h) +
                                          (masked ? " masked" : ""));
                }
            }
        }
    }
}

TEMPLATE_TEST_CASE(
    "partial results over disjoint key sets merge into the full result by "
    "log-sum-exp",
    "[log_sum_exp][property]", float, double) {
    using Scalar = TestType;
    // Keys [0, split) and [split, Lk) attended separately, then combined as a state merge does:
    // L = log(e^{L_a} + e^{L_b}), O = e^{L_a − L}·O_a + e^{L_b − L}·O_b. A keep mask gives some
    // queries no key in one part (L = −∞ there, weight exactly 0) and query 0 none at all.
    const Index dk = 8, dv = 5, lq = 40, lk = 1300, split = 700;
    mha_test::value_source values(7170);
    const mat<Scalar> q = values.normal_matrix<Scalar>(dk, lq);
    const mat<Scalar> k = values.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = values.normal_matrix<Scalar>(dv, lk);
    mha::bool_matrix keep = mha::bool_matrix::Constant(lk, lq, true);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            if ((i % 5 == 1 && j < split) || (i % 5 == 2 && j >= split) || i == 0)
                keep(j, i) = false;
    const mha::attention_request lse{mha::weights_mode::none, true};
    for (const auto algorithm : both_algorithms) {
        mha::attention_options options;
        options.algorithm = algorithm;
        mat<Scalar> out_a(dv, lq), out_b(dv, lq), out(dv, lq);
        const auto a = mha::scaled_dot_product_attention(
            q, k.leftCols(split), v.leftCols(split), out_a,
            mha::keep_mask(mha::bool_matrix(keep.topRows(split))), options, lse);
        const auto b = mha::scaled_dot_product_attention(
            q, k.rightCols(lk - split), v.rightCols(lk - split), out_b,
            mha::keep_mask(mha::bool_matrix(keep.bottomRows(lk - split))), options, lse);
        mat<Scalar> merged(dv, lq);
        for (Index i = 0; i < lq; ++i) {
            const Scalar la = a.log_sum_exp(0, i), lb = b.log_sum_exp(0, i);
            const Scalar m = std::max(la, lb);
            if (m == -std::numeric_limits<Scalar>::infinity()) {
                merged.col(i).setZero();
                continue;
            }
            const Scalar wa = std::exp(la - m), wb = std::exp(lb - m);
            merged.col(i) = (wa * out_a.col(i) + wb * out_b.col(i)) / (wa + wb);
        }
        // The merged result is the attention over all keys: checked against the reference with
        // check A (the merge adds a handful of roundings per output, within its margin of 7).
        const mha_test::allowed_fn allowed = [keep](Index j, Index i) { return keep(j, i); };
        const long double scale =
            static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(dk)));
        const mat<long double> ref = mha_test::reference_attention<long double>(
            q.template cast<long double>(), k.template cast<long double>(),
            v.template cast<long double>(), scale, allowed);
        mha_test::require_attention_close(merged, ref, q.template cast<long double>(),
                                          k.template cast<long double>(),
                                          v.template cast<long double>(), scale, allowed, nullptr,
                                          std::string("merged ") + name_of(algorithm));
        REQUIRE(merged.col(0) == mat<Scalar>::Zero(dv, 1));
    }
}

TEST_CASE("log-sum-exp: empty inputs and the request's errors", "[log_sum_exp][errors]") {
    const mha::attention_request lse{mha::weights_mode::none, true};
    // No key: every query gets exactly −∞. No query: a 1 × 0 matrix.
    for (const auto algorithm : both_algorithms) {
        mha::attention_options options;
        options.algorithm = algorithm;
        mat<float> out(2, 3);
        const auto no_keys = mha::scaled_dot_product_attention(
            mat<float>::Ones(4, 3), mat<float>(4, 0), mat<float>(2, 0), out, {}, options, lse);
        REQUIRE(no_keys.log_sum_exp.rows() == 1);
        REQUIRE(no_keys.log_sum_exp.cols() == 3);
        for (Index i = 0; i < 3; ++i)
            REQUIRE(no_keys.log_sum_exp(0, i) == -std::numeric_limits<float>::infinity());
        mat<float> none(2, 0);
        const auto no_queries =
            mha::scaled_dot_product_attention(mat<float>(4, 0), mat<float>::Ones(4, 5),
                                              mat<float>::Ones(2, 5), none, {}, options, lse);
        REQUIRE(no_queries.log_sum_exp.rows() == 1);
        REQUIRE(no_queries.log_sum_exp.cols() == 0);
    }
    // ReLU and sigmoid weights are not exp(s − L): asking is an error, whatever the kernel.
    mha::attention_options relu;
    relu.normalize = mha::normalization::relu;
    mat<double> out(2, 3);
    const mat<double> q = mat<double>::Ones(4, 3), k = mat<double>::Ones(4, 5),
                      v = mat<double>::Ones(2, 5);
    REQUIRE_THROWS_AS(mha::scaled_dot_product_attention(q, k, v, out, {}, relu, lse),
                      mha::value_error);
    REQUIRE_THROWS_WITH(
        mha::scaled_dot_product_attention(q, k, v, out, {}, relu, lse),
        Equals("mha::scaled_dot_product_attention: request.log_sum_exp must be false unless "
               "options.normalize is softmax (it has no log-sum-exp), got true with relu"));
    mha::attention_options sigmoid;
    sigmoid.normalize = mha::normalization::sigmoid;
    mat<double> heads_out(4, 3);
    REQUIRE_THROWS_WITH(
        mha::multi_head_attention_core(mat<double>::Ones(8, 3), mat<double>::Ones(8, 5),
                                       mat<double>::Ones(4, 5), 2, mha::packed_batch::single(3, 5),
                                       heads_out, {}, sigmoid, lse),
        Equals("mha::multi_head_attention_core: request.log_sum_exp must be false unless "
               "options.normalize is softmax (it has no log-sum-exp), got true with sigmoid"));
}
