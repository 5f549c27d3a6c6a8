// SPDX-License-Identifier: MIT
// mha::merge_attention_states (attention_states.hpp): the keys split at random into 2 to 5
// parts (empty parts, queries with no key in a part, queries with no key at all), each part
// attended by either kernel, the parts merged in random order as a list, pairwise from the empty
// state and in place; every result against the long-double reference and the one-shot call.
// Then associativity, the −∞ rule, NaN, large log-sum-exps, strided outputs and the shape errors.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/attention.hpp>
#include <mha/attention_states.hpp>

#include "check.hpp"
#include "reference.hpp"

using Catch::Matchers::Equals;
using mha::Index;
using mha_test::mat;
using mha_test::unit_roundoff;

namespace {

template <class Scalar>
constexpr Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();

/// A state the test owns: output (H·d_v) × Nq and log-sum-exp H × Nq.
template <class Scalar>
struct owned_state {
    mat<Scalar> out, lse;
    mha::attention_state<Scalar> view() const { return {out, lse}; }
};

/// The state over no keys: output 0, log-sum-exp −∞.
template <class Scalar>
owned_state<Scalar> empty_state(Index rows, Index heads, Index cols) {
    return {mat<Scalar>::Zero(rows, cols), mat<Scalar>::Constant(heads, cols, minus_inf<Scalar>)};
}

/// Reference log-sum-exp of one head's queries over the allowed keys (long double), with the
/// largest score magnitude and the number of allowed keys of each query for the bound below.
struct reference_lse {
    std::vector<long double> value, smax;
    std::vector<Index> keys;
};

reference_lse reference_log_sum_exp(const mat<long double>& q, const mat<long double>& k,
                                    long double scale, const mha_test::allowed_fn& allowed) {
    reference_lse r;
    for (Index i = 0; i < q.cols(); ++i) {
        std::vector<long double> s;
        long double smax = 0;
        for (Index j = 0; j < k.cols(); ++j) {
            if (!allowed(j, i)) continue;
            long double dot = 0, terms = 0;
            for (Index d = 0; d < q.rows(); ++d) {
                dot += q(d, i) * k(d, j);
                terms += std::fabs(q(d, i) * k(d, j));
            }
            s.push_back(scale * dot);
            smax = std::max(smax, std::fabs(scale) * terms);
        }
        long double value = -std::numeric_limits<long double>::infinity();
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

/// The merged log-sum-exp against the reference: exactly −∞ where the reference is, else
///   |L − R| ≤ 8·u·(1 + Smax) + (n + 2)·u + u·|R|  +  (P + 2)·u + u·|R|.
/// The first three terms are the bound tests/test_log_sum_exp.cpp derives for one kernel call
/// (a part covers at most the query's n keys, so each part's L_k meets it). The merge
/// L = M + log Σ_k exp(L_k − M) is 1-Lipschitz in the L_k, so it passes their error on
/// unchanged, and adds its own roundings: a sum of P terms in (0, 1] (P·u relative, P·u after the
/// log), the exp and the log (2·u) and the final addition (u·|L|).
template <class Scalar>
void require_merged_lse_close(const mat<Scalar>& lse, Index h, const reference_lse& ref,
                              Index parts, const std::string& what) {
    const long double u = unit_roundoff<Scalar>();
    for (Index i = 0; i < lse.cols(); ++i) {
        const auto iu = static_cast<std::size_t>(i);
        const long double got = lse(h, i), want = ref.value[iu];
        CAPTURE(what, h, i, got, want, ref.keys[iu]);
        if (std::isinf(want)) {
            REQUIRE(got == minus_inf<Scalar>);
            continue;
        }
        const long double bound = 8 * u * (1 + ref.smax[iu]) +
                                  static_cast<long double>(ref.keys[iu] + 2) * u +
                                  static_cast<long double>(parts + 2) * u + 2 * u * std::fabs(want);
        CAPTURE(bound);
        REQUIRE(std::fabs(got - want) <= bound);
    }
}

/// One random problem: H heads over Lq queries and Lk keys, a keep mask with some queries fully
/// masked, and the keys cut at random into `parts` contiguous ranges (some of them empty).
template <class Scalar>
struct split_case {
    Index heads = 2, dk = 8, dv = 4, lq = 0, lk = 0;
    mat<Scalar> q, k, v;
    mha::bool_matrix keep;
    std::vector<Index> cuts;  // parts + 1 key offsets, from 0 to Lk, nondecreasing
};

template <class Scalar>
split_case<Scalar> make_split_case(mha_test::value_source& values, std::mt19937_64& rng,
                                   Index parts) {
    split_case<Scalar> c;
    c.lq = std::uniform_int_distribution<Index>(1, 40)(rng);
    c.lk = std::uniform_int_distribution<Index>(0, 300)(rng);
    c.q = values.normal_matrix<Scalar>(c.heads * c.dk, c.lq, 1.5);
    c.k = values.normal_matrix<Scalar>(c.heads * c.dk, c.lk, 1.5);
    c.v = values.normal_matrix<Scalar>(c.heads * c.dv, c.lk);
    c.keep.resize(c.lk, c.lq);
    for (Index i = 0; i < c.lq; ++i) {
        // Every fifth query sees nothing at all; the others about 70% of the keys, so short
        // parts leave some of them with nothing in that part.
        const bool none = i % 5 == 3;
        for (Index j = 0; j < c.lk; ++j)
            c.keep(j, i) = !none && values.uniform(0, 1) < 0.7;
    }
    std::uniform_int_distribution<Index> cut(0, c.lk);
    c.cuts = {0, c.lk};
    for (Index p = 1; p < parts; ++p)
        c.cuts.push_back(cut(rng));
    // One more chance of an empty part than the random cuts give: repeat a cut.
    if (parts > 2 && rng() % 2 == 0) c.cuts.push_back(c.cuts.back());
    std::sort(c.cuts.begin(), c.cuts.end());
    c.cuts.resize(static_cast<std::size_t>(parts + 1));
    c.cuts.back() = c.lk;
    return c;
}

/// The state of keys [lo, hi) of case c, from the kernel `algorithm`.
template <class Scalar>
owned_state<Scalar> attend_part(const split_case<Scalar>& c, Index lo, Index hi,
                                mha::attention_algorithm algorithm) {
    mha::attention_options options;
    options.algorithm = algorithm;
    owned_state<Scalar> s;
    s.out.resize(c.heads * c.dv, c.lq);
    const mha::keep_mask keep(mha::bool_matrix(c.keep.middleRows(lo, hi - lo)));
    auto extra = mha::multi_head_attention_core(
        c.q, c.k.middleCols(lo, hi - lo), c.v.middleCols(lo, hi - lo), c.heads,
        mha::packed_batch::single(c.lq, hi - lo), s.out, mha::attention_mask<Scalar>(keep), options,
        {mha::weights_mode::none, true});
    s.lse = std::move(extra.log_sum_exp);
    return s;
}

/// A merged state against the long-double reference, head by head: the output with check A
/// (check.hpp) and the log-sum-exp with the bound above. Check A holds for merged outputs: a
/// merge is a convex combination Σ_k w_k·O_k of parts that each meet check A over a subset of the
/// query's keys (so within its Vmax and Smax), plus the weights' errors, which the log-sum-exp
/// bound above keeps at a few u·(1 + Smax) and which multiply values of at most Vmax: some
/// u·Vmax·(1 + Smax) more, inside check A's margin (7 times the calibrated error).
template <class Scalar>
void require_state_matches_reference(const owned_state<Scalar>& s, const split_case<Scalar>& c,
                                     Index parts, const std::string& what) {
    const long double scale = static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(c.dk)));
    const mha::bool_matrix keep = c.keep;
    const mha_test::allowed_fn allowed = [keep](Index j, Index i) { return keep(j, i); };
    for (Index h = 0; h < c.heads; ++h) {
        const mat<long double> q = c.q.middleRows(h * c.dk, c.dk).template cast<long double>();
        const mat<long double> k = c.k.middleRows(h * c.dk, c.dk).template cast<long double>();
        const mat<long double> v = c.v.middleRows(h * c.dv, c.dv).template cast<long double>();
        const mat<long double> ref =
            mha_test::reference_attention<long double>(q, k, v, scale, allowed);
        const mat<Scalar> out = s.out.middleRows(h * c.dv, c.dv);
        mha_test::require_attention_close(out, ref, q, k, v, scale, allowed, nullptr,
                                          what + " head " + std::to_string(h));
        require_merged_lse_close(s.lse, h, reference_log_sum_exp(q, k, scale, allowed), parts,
                                 what);
    }
}

const char* name_of(mha::attention_algorithm a) {
    return a == mha::attention_algorithm::tiled ? "tiled" : "materialized";
}

}  // namespace

TEMPLATE_TEST_CASE("states over random key splits merge into the one-shot result",
                   "[attention_states]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(9191);
    std::mt19937_64 rng(4242);
    for (int trial = 0; trial < 24; ++trial) {
        const Index parts = 2 + trial % 4;  // 2..5
        const split_case<Scalar> c = make_split_case<Scalar>(values, rng, parts);
        std::string what = "trial " + std::to_string(trial) + " Lq " + std::to_string(c.lq) +
                           " Lk " + std::to_string(c.lk) + " cuts";
        for (const Index cut : c.cuts)
            what += " " + std::to_string(cut);
        std::vector<owned_state<Scalar>> states;
        for (Index p = 0; p < parts; ++p) {
            // Alternate the kernels, so each is merged with the other's states.
            const auto algorithm = (trial + p) % 2 == 0 ? mha::attention_algorithm::tiled
                                                        : mha::attention_algorithm::materialized;
            states.push_back(attend_part(c, c.cuts[static_cast<std::size_t>(p)],
                                         c.cuts[static_cast<std::size_t>(p + 1)], algorithm));
        }
        // Any order: a random permutation of the parts.
        std::vector<std::size_t> order(states.size());
        std::iota(order.begin(), order.end(), std::size_t{0});
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<mha::attention_state<Scalar>> views;
        for (const std::size_t o : order)
            views.push_back(states[o].view());
        CAPTURE(what);

        // The list form into fresh matrices.
        owned_state<Scalar> listed{mat<Scalar>(c.heads * c.dv, c.lq), mat<Scalar>(c.heads, c.lq)};
        mha::merge_attention_states(views, listed.out, listed.lse);
        require_state_matches_reference(listed, c, parts, what + " list");

        // Pairwise, from the state over no keys, as a stream of arriving parts would.
        owned_state<Scalar> running = empty_state<Scalar>(c.heads * c.dv, c.heads, c.lq);
        for (const std::size_t o : order)
            mha::merge_attention_states(running.out, running.lse, states[o].out, states[o].lse);
        require_state_matches_reference(running, c, parts, what + " pairwise");

        // In place: the output is the first part's own matrices. The same sums in the same
        // order as the list form into fresh matrices, so the same bits.
        owned_state<Scalar> first = states[order[0]];
        std::vector<mha::attention_state<Scalar>> in_place = {first.view()};
        for (std::size_t p = 1; p < order.size(); ++p)
            in_place.push_back(states[order[p]].view());
        mha::merge_attention_states(in_place, first.out, first.lse);
        REQUIRE(first.out == listed.out);
        REQUIRE(first.lse == listed.lse);

        // The one-shot call over all keys, by each kernel: both it and the merges meet the
        // reference's bound, and both give exactly 0 and −∞ to the same queries.
        for (const auto algorithm :
             {mha::attention_algorithm::tiled, mha::attention_algorithm::materialized}) {
            const owned_state<Scalar> whole = attend_part(c, 0, c.lk, algorithm);
            require_state_matches_reference(whole, c, 1, what + " one-shot " + name_of(algorithm));
            for (Index i = 0; i < c.lq; ++i)
                for (Index h = 0; h < c.heads; ++h) {
                    const bool none = whole.lse(h, i) == minus_inf<Scalar>;
                    REQUIRE(none == (listed.lse(h, i) == minus_inf<Scalar>));
                    REQUIRE(none == (running.lse(h, i) == minus_inf<Scalar>));
                    if (none) {
                        REQUIRE(listed.out.col(i).segment(h * c.dv, c.dv).isZero(0));
                        REQUIRE(running.out.col(i).segment(h * c.dv, c.dv).isZero(0));
                    }
                }
        }
    }
}

TEMPLATE_TEST_CASE("merging states is associative within the tolerance",
                   "[attention_states][property]", float, double) {
    using Scalar = TestType;
    mha_test::value_source values(3131);
    std::mt19937_64 rng(77);
    for (int trial = 0; trial < 8; ++trial) {
        const split_case<Scalar> c = make_split_case<Scalar>(values, rng, 3);
        const std::string what = "trial " + std::to_string(trial);
        CAPTURE(what, c.lq, c.lk, c.cuts[1], c.cuts[2]);
        std::vector<owned_state<Scalar>> s;
        for (std::size_t p = 0; p < 3; ++p)
            s.push_back(attend_part(c, c.cuts[p], c.cuts[p + 1], mha::attention_algorithm::tiled));
        // (a ⊕ b) ⊕ c
        owned_state<Scalar> left = s[0];
        mha::merge_attention_states(left.out, left.lse, s[1].out, s[1].lse);
        mha::merge_attention_states(left.out, left.lse, s[2].out, s[2].lse);
        // a ⊕ (b ⊕ c)
        owned_state<Scalar> right = s[1];
        mha::merge_attention_states(right.out, right.lse, s[2].out, s[2].lse);
        owned_state<Scalar> a = s[0];
        mha::merge_attention_states(a.out, a.lse, right.out, right.lse);
        // Each grouping is the attention over all keys within the reference's bound (a nested
        // merge is a merge of merges: the same convex-combination argument, applied twice),
        // so the two groupings agree within the sum of their bounds.
        require_state_matches_reference(left, c, 3, what + " (a+b)+c");
        require_state_matches_reference(a, c, 3, what + " a+(b+c)");
    }
}

TEMPLATE_TEST_CASE("a state with log-sum-exp −∞ contributes nothing", "[attention_states]", float,
                   double) {
    using Scalar = TestType;
    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    // Two heads (d_v = 2) and three queries. Part a: query 0 saw keys in both heads, query 1 in
    // head 1 only, query 2 in none; its −∞ entries hold NaN outputs, which must not leak.
    mat<Scalar> out_a(4, 3), lse_a(2, 3), out_b(4, 3), lse_b(2, 3);
    // Rows: (head 0, d 0), (head 0, d 1), (head 1, d 0), (head 1, d 1); columns: queries.
    out_a << 1, nan, nan,  //
        2, nan, nan,       //
        3, 5, nan,         //
        4, 6, nan;
    lse_a << Scalar(0.5), minus_inf<Scalar>, minus_inf<Scalar>,  //
        Scalar(-1), Scalar(2), minus_inf<Scalar>;
    // Part b: query 0 saw keys in head 0 only, query 1 in both, query 2 in none.
    out_b << 7, 9, nan,  //
        8, 10, nan,      //
        nan, 11, nan,    //
        nan, 12, nan;
    lse_b << Scalar(0.25), Scalar(1), minus_inf<Scalar>,  //
        minus_inf<Scalar>, Scalar(3), minus_inf<Scalar>;
    mat<Scalar> out = out_a, lse = lse_a;
    mha::merge_attention_states(out, lse, out_b, lse_b);
    // Where exactly one part has a key, the merge is that part bit for bit: its weight is
    // exp(0) = 1 and its sum 1, so the division and log(1) = 0 change nothing.
    REQUIRE(out.col(1).head(2) == out_b.col(1).head(2));  // head 0 of query 1: b only
    REQUIRE(lse(0, 1) == lse_b(0, 1));
    REQUIRE(out.col(0).tail(2) == out_a.col(0).tail(2));  // head 1 of query 0: a only
    REQUIRE(lse(1, 0) == lse_a(1, 0));
    // No part saw a key: exactly 0 and −∞, whatever the outputs held.
    REQUIRE(out.col(2).isZero(0));
    REQUIRE(lse(0, 2) == minus_inf<Scalar>);
    REQUIRE(lse(1, 2) == minus_inf<Scalar>);
    // Both parts saw keys: the formula in long double, within a few roundings (the weights'
    // exp, the sum, the division: 8·u relative to the largest output is a margin of about 2).
    const long double u = unit_roundoff<Scalar>();
    for (const auto& [h, i] : {std::pair<Index, Index>{0, 0}, {1, 1}}) {
        const long double la = lse_a(h, i), lb = lse_b(h, i);
        const long double m = std::max(la, lb);
        const long double wa = std::exp(la - m), wb = std::exp(lb - m);
        CAPTURE(h, i);
        REQUIRE(std::fabs(lse(h, i) - (m + std::log(wa + wb))) <= 8 * u * (1 + std::fabs(m)));
        for (Index d = 0; d < 2; ++d) {
            const long double want =
                (wa * out_a(h * 2 + d, i) + wb * out_b(h * 2 + d, i)) / (wa + wb);
            REQUIRE(std::fabs(out(h * 2 + d, i) - want) <= 8 * u * 16);
        }
    }
    // The list form agrees, and zero parts give the state over no keys.
    mat<Scalar> listed(4, 3), listed_lse(2, 3);
    mha::merge_attention_states(
        std::vector<mha::attention_state<Scalar>>{{out_a, lse_a}, {out_b, lse_b}}, listed,
        listed_lse);
    REQUIRE(listed == out);
    REQUIRE(listed_lse == lse);
    mha::merge_attention_states(std::vector<mha::attention_state<Scalar>>{}, listed, listed_lse);
    REQUIRE(listed.isZero(0));
    REQUIRE((listed_lse.array() == minus_inf<Scalar>).all());
}

TEMPLATE_TEST_CASE("merging: NaN propagates, large log-sum-exps do not overflow",
                   "[attention_states]", float, double) {
    using Scalar = TestType;
    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    // A NaN log-sum-exp (a NaN score in an allowed key) makes the merged query NaN.
    mat<Scalar> out = mat<Scalar>::Ones(2, 2), lse(1, 2);
    lse << nan, Scalar(1);
    const mat<Scalar> out_b = mat<Scalar>::Constant(2, 2, 3), lse_b = mat<Scalar>::Ones(1, 2);
    mha::merge_attention_states(out, lse, out_b, lse_b);
    REQUIRE(std::isnan(lse(0, 0)));
    REQUIRE(std::isnan(out(0, 0)));
    REQUIRE(std::isnan(out(1, 0)));
    REQUIRE(std::isfinite(lse(0, 1)));
    REQUIRE(out(0, 1) == 2);  // weights 1/2 and 1/2 of 1 and 3: exact in binary
    // A NaN part whose only company is parts over no keys (−∞): still NaN, not the −∞ rule's
    // exact 0 (a maximum that drops NaN would see only −∞ parts). Pairwise, and as a list with
    // the NaN part first and last.
    mat<Scalar> alone = mat<Scalar>::Ones(2, 1), alone_lse = mat<Scalar>::Constant(1, 1, nan);
    const mat<Scalar> none = mat<Scalar>::Zero(2, 1),
                      none_lse = mat<Scalar>::Constant(1, 1, minus_inf<Scalar>);
    mha::merge_attention_states(alone, alone_lse, none, none_lse);
    REQUIRE(std::isnan(alone_lse(0, 0)));
    REQUIRE(std::isnan(alone(0, 0)));
    const mat<Scalar> nan_out = mat<Scalar>::Ones(2, 1);
    const mat<Scalar> nan_lse = mat<Scalar>::Constant(1, 1, nan);
    using parts_t = std::vector<mha::attention_state<Scalar>>;
    const parts_t nan_alone = {{nan_out, nan_lse}};
    const parts_t nan_first = {{nan_out, nan_lse}, {none, none_lse}};
    const parts_t nan_last = {{none, none_lse}, {nan_out, nan_lse}};
    for (const parts_t* parts : {&nan_alone, &nan_first, &nan_last}) {
        mat<Scalar> merged(2, 1), merged_lse(1, 1);
        mha::merge_attention_states(*parts, merged, merged_lse);
        REQUIRE(std::isnan(merged_lse(0, 0)));
        REQUIRE(std::isnan(merged(0, 0)));
    }
    // Log-sum-exps of 1000 and 999: exp(1000) overflows even double, the shifted weights are
    // 1 and e^−1. Compared with the formula in long double within a few roundings (as above).
    mat<Scalar> big = mat<Scalar>::Constant(1, 1, 2), big_lse = mat<Scalar>::Constant(1, 1, 1000);
    const mat<Scalar> other = mat<Scalar>::Constant(1, 1, -1),
                      other_lse = mat<Scalar>::Constant(1, 1, 999);
    mha::merge_attention_states(big, big_lse, other, other_lse);
    const long double u = unit_roundoff<Scalar>();
    const long double e = std::exp(-1.0L);
    REQUIRE(std::fabs(big(0, 0) - (2 - e) / (1 + e)) <= 8 * u * 2);
    REQUIRE(std::fabs(big_lse(0, 0) - (1000 + std::log1p(e))) <= 8 * u * 1000);
}

TEST_CASE("merging into views: row blocks, column blocks and a strided map", "[attention_states]") {
    mha_test::value_source values(5);
    const mat<double> o1 = values.normal_matrix<double>(3, 4),
                      o2 = values.normal_matrix<double>(3, 4);
    const mat<double> l1 = values.normal_matrix<double>(1, 4),
                      l2 = values.normal_matrix<double>(1, 4);
    mat<double> want(3, 4), want_lse(1, 4);
    mha::merge_attention_states(std::vector<mha::attention_state<double>>{{o1, l1}, {o2, l2}}, want,
                                want_lse);
    // The running state inside bigger matrices: a column block and a row of the log-sum-exp.
    mat<double> big = mat<double>::Zero(3, 10), big_lse = mat<double>::Zero(2, 10);
    big.middleCols(3, 4) = o1;
    big_lse.row(1).segment(3, 4) = l1;
    mha::merge_attention_states(big.middleCols(3, 4), big_lse.block(1, 3, 1, 4), o2, l2);
    REQUIRE(big.middleCols(3, 4) == want);
    REQUIRE(big_lse.block(1, 3, 1, 4) == want_lse);
    REQUIRE(big.leftCols(3).isZero(0));
    REQUIRE(big_lse.row(0).isZero(0));
    // An output with an inner stride cannot be viewed in place: merged through a copy.
    std::vector<double> storage(2 * 12, -7.0);
    Eigen::Map<mat<double>, 0, Eigen::Stride<6, 2>> strided(storage.data(), 3, 4);
    strided = o1;
    mat<double> lse = l1;
    mha::merge_attention_states(strided, lse, o2, l2);
    REQUIRE(mat<double>(strided) == want);
    REQUIRE(lse == want_lse);
    REQUIRE(storage[1] == -7.0);  // the gaps are untouched
}

TEST_CASE("merging states: shape errors name the argument", "[attention_states][errors]") {
    const mat<float> out = mat<float>::Zero(6, 4), lse = mat<float>::Zero(2, 4);
    mat<float> a = out, la = lse;
    REQUIRE_THROWS_AS(mha::merge_attention_states(a, la, mat<float>::Zero(6, 5), lse),
                      mha::shape_error);
    REQUIRE_THROWS_WITH(
        mha::merge_attention_states(a, la, mat<float>::Zero(6, 5), lse),
        Equals("mha::merge_attention_states: out_b.cols() must be 4 (out_a.cols()), got 5"));
    REQUIRE_THROWS_WITH(
        mha::merge_attention_states(a, la, out, mat<float>::Zero(3, 4)),
        Equals("mha::merge_attention_states: lse_b.rows() must be 2 (lse_a.rows()), got 3"));
    mat<float> lse3 = mat<float>::Zero(4, 4);
    REQUIRE_THROWS_WITH(mha::merge_attention_states(a, lse3, out, lse),
                        Equals("mha::merge_attention_states: out_a.rows() must be a multiple of "
                               "lse_a.rows() = 4 (H·d_v for H heads), got 6"));
    mat<float> lse_cols = mat<float>::Zero(2, 3);
    REQUIRE_THROWS_WITH(mha::merge_attention_states(a, lse_cols, out, lse),
                        Equals("mha::merge_attention_states: lse_a.cols() must be 4 (out_a.cols(), "
                               "the number of queries), got 3"));
    const mat<float> short_out = mat<float>::Zero(3, 4);
    const std::vector<mha::attention_state<float>> parts = {{out, lse}, {short_out, lse}};
    REQUIRE_THROWS_WITH(
        mha::merge_attention_states(parts, a, la),
        Equals("mha::merge_attention_states: parts[1].output.rows() must be 6 (output.rows()), "
               "got 3"));
    // Outputs sharing memory with what they merge, other than a list's merge in place.
    REQUIRE_THROWS_AS(mha::merge_attention_states(a, la, a, la), mha::value_error);
    REQUIRE_THROWS_WITH(mha::merge_attention_states(a, la, a, lse),
                        Equals("mha::merge_attention_states: out_a must be memory that out_b does "
                               "not use, got a view overlapping out_b"));
    mat<float> wide = mat<float>::Zero(6, 5), wide_lse = mat<float>::Zero(2, 5);
    const std::vector<mha::attention_state<float>> shifted = {
        {wide.leftCols(4), wide_lse.leftCols(4)}, {out, lse}};
    REQUIRE_THROWS_WITH(
        mha::merge_attention_states(shifted, wide.rightCols(4), wide_lse.rightCols(4)),
        Equals("mha::merge_attention_states: output must be memory that parts[0].output does not "
               "use, got a view overlapping parts[0].output"));
    mat<float> both = mat<float>::Zero(8, 4);  // the log-sum-exp in rows 5 and 6 of the output
    REQUIRE_THROWS_WITH(
        mha::merge_attention_states(std::vector<mha::attention_state<float>>{{out, lse}},
                                    both.topRows(6), both.middleRows(5, 2)),
        Equals("mha::merge_attention_states: log_sum_exp must be memory that output does not "
               "use, got a view overlapping output"));
    // Nothing was written by the failed calls.
    REQUIRE(a == out);
    REQUIRE(la == lse);
}
