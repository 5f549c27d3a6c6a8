// SPDX-License-Identifier: MIT
// The register-tiled block kernels of the tiled attention (detail/tiled/block_kernels.hpp)
// on their own, against long-double loops: every remainder path (query tiles of two packets and
// of one, key tiles and single keys, value tiles, single packets and scalar rows) at sizes around
// the packet width of the machine the test runs on.
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/few_query_scores.hpp>

#include "check.hpp"
#include "reference.hpp"

namespace {

using mha::Index;
using mha_test::mat;

/// A matrix whose columns are `stride` apart (stride >= rows), filled with normal values, to
/// pass the kernels strided head views as the layer does.
template <class Scalar>
struct strided {
    std::vector<Scalar> data;
    Index rows, cols, stride;
    strided(Index r, Index c, Index s, mha_test::value_source& rnd)
        : data(static_cast<std::size_t>(std::max<Index>(s * c, 1)), Scalar(7)),
          rows(r),
          cols(c),
          stride(s) {
        for (Index j = 0; j < c; ++j)
            for (Index i = 0; i < r; ++i)
                data[static_cast<std::size_t>(j * s + i)] = static_cast<Scalar>(rnd.normal(1.0));
    }
    Scalar operator()(Index i, Index j) const {
        return data[static_cast<std::size_t>(j * stride + i)];
    }
    mat<Scalar> dense() const {
        mat<Scalar> m(rows, cols);
        for (Index j = 0; j < cols; ++j)
            for (Index i = 0; i < rows; ++i)
                m(i, j) = (*this)(i, j);
        return m;
    }
};

/// m's columns ld apart, the rows between them 55 (to see that a kernel leaves them alone).
template <class Scalar>
std::vector<Scalar> padded_columns(const mat<Scalar>& m, Index ld) {
    std::vector<Scalar> out(static_cast<std::size_t>(ld * m.cols()), Scalar(55));
    for (Index c = 0; c < m.cols(); ++c)
        for (Index e = 0; e < m.rows(); ++e)
            out[static_cast<std::size_t>(c * ld + e)] = m(e, c);
    return out;
}

/// Requires acc(e, c) = acc0(e, c) + Σ_j a(e, j)·b(j, c) for every e < rows, c < cols, with
/// acc column c at acc[c·ld_acc], and the padding rows between columns still 55. A sum of m + 1
/// terms in any order errs by at most γ_(m+1)·(|acc0| + Σ|a·b|) (Higham §3.1, as check G).
template <class Scalar, class A, class B>
void require_accumulated(const mat<Scalar>& acc0, const std::vector<Scalar>& acc, Index ld_acc,
                         Index m, const A& a, const B& b) {
    const long double u = mha_test::unit_roundoff<Scalar>();
    const long double terms = static_cast<long double>(m + 1);
    const long double gamma = terms * u / (1 - terms * u);
    for (Index c = 0; c < acc0.cols(); ++c) {
        for (Index e = 0; e < acc0.rows(); ++e) {
            long double exact = acc0(e, c);
            long double magnitude = std::fabs(exact);
            for (Index j = 0; j < m; ++j) {
                const long double t =
                    static_cast<long double>(a(e, j)) * static_cast<long double>(b(j, c));
                exact += t;
                magnitude += std::fabs(t);
            }
            const long double got = acc[static_cast<std::size_t>(c * ld_acc + e)];
            INFO("at (" << e << ", " << c << ")");
            REQUIRE(std::fabs(got - exact) <= gamma * magnitude);
        }
        for (Index e = acc0.rows(); e < ld_acc; ++e)
            REQUIRE(acc[static_cast<std::size_t>(c * ld_acc + e)] == Scalar(55));
    }
}

}  // namespace

TEMPLATE_TEST_CASE("block kernels: packed queries are scale·Qᵀ with zero padding", "[kernels]",
                   float, double) {
    using Scalar = TestType;
    mha_test::value_source rnd(11);
    // Query counts and widths below, at and past the register transposes' blocks (8 × 8 and
    // 16 × 16, in 16 queries at a time) and their remainders.
    for (Index nq : {Index(1), Index(5), Index(16), Index(17), Index(35)})
        for (Index dk : {Index(7), Index(16), Index(24), Index(33)}) {
            const strided<Scalar> q(dk, nq, dk + 3, rnd);
            const Index nqp = mha::detail::padded_queries<Scalar>(nq);
            REQUIRE(nqp >= nq);
            REQUIRE(nqp % mha::detail::block_kernel_traits<Scalar>::query_multiple == 0);
            // A leading dimension past nqp, as the float core's (score_stride): rows nqp..ldq
            // are not the packing's to write.
            const Index ldq = nqp + 3;
            std::vector<Scalar> qt(static_cast<std::size_t>(ldq * dk), Scalar(-1));
            const Scalar scale = Scalar(0.3);
            mha::detail::pack_scaled_queries(q.data.data(), q.stride, dk, nq, nqp, scale, qt.data(),
                                             ldq);
            for (Index d = 0; d < dk; ++d)
                for (Index c = 0; c < ldq; ++c) {
                    // The same single multiplication, so equality is exact.
                    const Scalar expected = c < nq    ? scale * q(d, c)
                                            : c < nqp ? Scalar(0)
                                                      : Scalar(-1);
                    REQUIRE(qt[static_cast<std::size_t>(d * ldq + c)] == expected);
                }
        }
}

TEMPLATE_TEST_CASE("block kernels: transposed scores at every tile remainder", "[kernels]", float,
                   double) {
    using Scalar = TestType;
    using traits = mha::detail::block_kernel_traits<Scalar>;
    const Index w = traits::width;
    const Index qtile = traits::score_query_packets * w;
    const Index ktile = traits::score_keys;
    mha_test::value_source rnd(21);
    // Query counts: one packet, a full two-packet tile, a tile plus one packet; key counts around
    // the key tile and the two-key-tile used by single-packet query tiles.
    for (Index nqp : {w, qtile, qtile + w, 3 * qtile})
        for (Index nk : {Index(0), Index(1), ktile - 1, ktile, ktile + 1, 2 * ktile + 3})
            for (Index dk : {Index(0), Index(1), Index(3), Index(17), Index(64)}) {
                const mat<Scalar> qt = rnd.normal_matrix<Scalar>(nqp, dk);
                const strided<Scalar> k(dk, nk, dk + 5, rnd);
                const Index ld = nqp + 2 * w;  // a leading dimension larger than nqp
                std::vector<Scalar> st(static_cast<std::size_t>(std::max<Index>(ld * nk, 1)),
                                       Scalar(99));
                // qt with a leading dimension past nqp, as the float core packs it (score_stride);
                // the rows between are NaN, so that a score that read them would fail the bound.
                // At least one column: with dk = 0 a null data pointer would make the kernel's
                // tile offsets undefined; the tiled kernel's own qt always has one.
                const Index ldq = nqp + w;
                mat<Scalar> qt_storage = mat<Scalar>::Constant(
                    ldq, std::max<Index>(dk, 1), std::numeric_limits<Scalar>::quiet_NaN());
                qt_storage.topLeftCorner(nqp, dk) = qt;
                mha::detail::transposed_scores(qt_storage.data(), ldq, nqp, dk, k.data.data(),
                                               k.stride, nk, st.data(), ld);
                mat<Scalar> got(nqp, nk);
                for (Index j = 0; j < nk; ++j)
                    for (Index c = 0; c < nqp; ++c)
                        got(c, j) = st[static_cast<std::size_t>(j * ld + c)];
                // Rows beyond nqp of each column are not the kernel's to write.
                for (Index j = 0; j < nk; ++j)
                    for (Index c = nqp; c < ld; ++c)
                        REQUIRE(st[static_cast<std::size_t>(j * ld + c)] == Scalar(99));
                std::ostringstream what;
                what << "scores nqp " << nqp << ", nk " << nk << ", dk " << dk;
                // A dot product of length dk in any order: check G's proven bound, no bias.
                mha_test::require_linear_within_bound<Scalar>(got, qt, mha_test::vec<Scalar>(),
                                                              k.dense(), what.str());
            }
}

TEMPLATE_TEST_CASE("block kernels: scores of fewer queries than a packet at every key remainder",
                   "[kernels]", float, double) {
    using Scalar = TestType;
    const Index w = mha::detail::block_kernel_traits<Scalar>::width;
    const Index ktile = mha::detail::few_query_score_keys;
    mha_test::value_source rnd(23);
    // A power-of-two scale multiplies exactly, so scale·Q is the exact reference operand and
    // each score is a dot product of length d_k rounded once per term: check G's bound.
    const Scalar scale = Scalar(0.125);
    for (Index nq : {Index(1), Index(2), std::max<Index>(w - 1, 1)})
        for (Index nk : {Index(0), Index(1), ktile - 1, ktile, ktile + 1, 3 * ktile + 5})
            for (Index dk : {Index(0), Index(1), Index(3), w, 2 * w + 3, Index(64)}) {
                const strided<Scalar> q(dk, nq, dk + 3, rnd);
                const strided<Scalar> k(dk, nk, dk + 5, rnd);
                const Index ld = nq + 3;  // rows nq..ld of each key's column: set to 0
                std::vector<Scalar> st(static_cast<std::size_t>(std::max<Index>(ld * nk, 1)),
                                       Scalar(99));
                mha::detail::few_query_scores(q.data.data(), q.stride, nq, dk, scale, k.data.data(),
                                              k.stride, nk, st.data(), ld);
                mat<Scalar> got(nq, nk);
                for (Index j = 0; j < nk; ++j) {
                    for (Index c = 0; c < nq; ++c)
                        got(c, j) = st[static_cast<std::size_t>(j * ld + c)];
                    for (Index c = nq; c < ld; ++c)
                        REQUIRE(st[static_cast<std::size_t>(j * ld + c)] == Scalar(0));
                }
                const mat<Scalar> scaled_q = (scale * q.dense()).transpose();  // nq × dk, exact
                std::ostringstream what;
                what << "few-query scores nq " << nq << ", nk " << nk << ", dk " << dk;
                mha_test::require_linear_within_bound<Scalar>(
                    got, scaled_q, mha_test::vec<Scalar>(), k.dense(), what.str());
            }
}

TEMPLATE_TEST_CASE("block kernels: value accumulation at every tile remainder", "[kernels]", float,
                   double) {
    using Scalar = TestType;
    using traits = mha::detail::block_kernel_traits<Scalar>;
    const Index w = traits::width;
    const Index vtile = traits::value_packets * w;
    const Index qtile = traits::value_queries;
    const Index chunk = traits::value_key_chunk;
    mha_test::value_source rnd(31);
    // d_v: scalar rows only, one packet plus a row, a full tile, a tile plus a packet and a row.
    // nq: around the query tile. nk: around the key chunk.
    for (Index dv : {Index(1), w + 1, vtile, vtile + w + 1})
        for (Index nq : {Index(1), qtile - 1, qtile, qtile + 1, 2 * qtile + 1})
            for (Index nk : {Index(0), Index(1), chunk - 1, chunk + 1}) {
                const strided<Scalar> v(dv, nk, dv + 3, rnd);
                const Index ld = nq + 4;
                const strided<Scalar> pt(nq, nk, ld, rnd);  // P(j, c) = pt(c, j)
                const mat<Scalar> acc0 = rnd.normal_matrix<Scalar>(dv, nq);
                const Index ld_acc = dv + 2;
                std::vector<Scalar> acc = padded_columns(acc0, ld_acc);
                mha::detail::accumulate_values(v.data.data(), v.stride, dv, nk, pt.data.data(),
                                               pt.stride, nq, acc.data(), ld_acc);
                INFO("values dv " << dv << ", nq " << nq << ", nk " << nk);
                require_accumulated(acc0, acc, ld_acc, nk, v,
                                    [&](Index j, Index c) { return pt(c, j); });
            }
}

TEMPLATE_TEST_CASE("block kernels: the product with a column-major operand at every tile remainder",
                   "[kernels]", float, double) {
    // accumulate_product: acc += A·B with B column-major, the backward's dV = dO·Pᵀ and
    // dK = Q·dSᵀ. Each column must also come out the same bits whether it is computed in a
    // full column tile or alone: the backward's determinism rests on a column's sum not depending
    // on the blocking around it.
    using Scalar = TestType;
    using traits = mha::detail::block_kernel_traits<Scalar>;
    const Index w = traits::width;
    const Index rtile = traits::value_packets * w;
    const Index ctile = traits::value_queries;
    mha_test::value_source rnd(37);
    for (Index d : {Index(1), w + 1, rtile, rtile + w + 1})
        for (Index n : {Index(1), ctile - 1, ctile, ctile + 1, 2 * ctile + 1})
            for (Index m : {Index(0), Index(1), Index(7), Index(130)}) {
                const strided<Scalar> a(d, m, d + 3, rnd);
                const strided<Scalar> b(m, n, m + 5, rnd);  // B(j, c) = b(j, c), column-major
                const mat<Scalar> acc0 = rnd.normal_matrix<Scalar>(d, n);
                const Index ld_acc = d + 2;
                std::vector<Scalar> acc = padded_columns(acc0, ld_acc);
                std::vector<Scalar> one_by_one = acc;
                mha::detail::accumulate_product(a.data.data(), a.stride, d, m, b.data.data(),
                                                b.stride, n, acc.data(), ld_acc);
                for (Index c = 0; c < n; ++c)
                    mha::detail::accumulate_product(a.data.data(), a.stride, d, m,
                                                    b.data.data() + c * b.stride, b.stride, 1,
                                                    one_by_one.data() + c * ld_acc, ld_acc);
                INFO("product d " << d << ", n " << n << ", m " << m);
                require_accumulated(acc0, acc, ld_acc, m, a, b);
                CHECK(acc == one_by_one);
            }
}

TEMPLATE_TEST_CASE("block kernels: per-query key ranges cut tiles short and read nothing outside",
                   "[kernels]", float, double) {
    using Scalar = TestType;
    using traits = mha::detail::block_kernel_traits<Scalar>;
    const Index w = traits::width;
    mha_test::value_source rnd(41);
    // A causal-like staircase with an offset block, a window, and an empty query, over a query
    // count with a single-packet remainder tile and a key count around the key tile.
    const Index nq = 3 * w + 1, nqp = mha::detail::padded_queries<Scalar>(nq);
    const Index nk = 4 * w + 5, offset = 100, dk = 9, dv = 2 * w + 3;
    std::vector<Index> first(static_cast<std::size_t>(nq)), last(first.size());
    for (Index c = 0; c < nq; ++c) {
        const auto s = static_cast<std::size_t>(c);
        first[s] = offset + (c % 3 == 0 ? c / 2 : 0);
        last[s] = offset + std::min(nk + 3, c + 2);
        if (c == 5) last[s] = first[s];  // no key at all
    }
    const mha::detail::query_key_ranges ranges{first.data(), last.data(), nq, offset};
    auto sees = [&](Index c, Index j) {
        const auto s = static_cast<std::size_t>(c);
        return j >= first[s] - offset && j < last[s] - offset;
    };

    const mat<Scalar> qt = rnd.normal_matrix<Scalar>(nqp, dk);
    const strided<Scalar> k(dk, nk, dk, rnd);
    std::vector<Scalar> st(static_cast<std::size_t>(nqp * nk), Scalar(99));
    mha::detail::transposed_scores(qt.data(), nqp, nqp, dk, k.data.data(), k.stride, nk, st.data(),
                                   nqp, ranges);
    std::vector<Scalar> full(st.size());
    mha::detail::transposed_scores(qt.data(), nqp, nqp, dk, k.data.data(), k.stride, nk,
                                   full.data(), nqp);
    for (Index j = 0; j < nk; ++j)
        for (Index c = 0; c < nq; ++c) {
            const auto at = static_cast<std::size_t>(j * nqp + c);
            // Every key a query sees is computed, by the same tile code, so bit-identical.
            if (sees(c, j)) REQUIRE(st[at] == full[at]);
        }
    // Somewhere a tile was cut short (the first query tile sees keys up to its width + 1 only).
    bool skipped = false;
    for (Scalar x : st)
        skipped = skipped || x == Scalar(99);
    REQUIRE(skipped);

    // Values: P is 0 where a query sees nothing and V is NaN in the columns no query sees.
    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    strided<Scalar> v(dv, nk, dv, rnd);
    std::vector<Scalar> pt(static_cast<std::size_t>(nqp * nk));
    for (Index j = 0; j < nk; ++j) {
        bool seen = false;
        for (Index c = 0; c < nq; ++c) {
            const bool s = sees(c, j);
            seen = seen || s;
            pt[static_cast<std::size_t>(j * nqp + c)] =
                s ? static_cast<Scalar>(rnd.uniform(0, 1)) : 0;
        }
        if (!seen)
            for (Index e = 0; e < dv; ++e)
                v.data[static_cast<std::size_t>(j * dv + e)] = nan;
    }
    mat<Scalar> acc = mat<Scalar>::Zero(dv, nq);
    mha::detail::accumulate_values(v.data.data(), dv, dv, nk, pt.data(), nqp, nq, acc.data(), dv,
                                   ranges);
    REQUIRE(acc.allFinite());
    for (Index c = 0; c < nq; ++c)
        for (Index e = 0; e < dv; ++e) {
            long double exact = 0, magnitude = 0;
            for (Index j = 0; j < nk; ++j) {
                if (!sees(c, j)) continue;
                const long double t =
                    static_cast<long double>(v(e, j)) * pt[static_cast<std::size_t>(j * nqp + c)];
                exact += t;
                magnitude += std::fabs(t);
            }
            const long double u = mha_test::unit_roundoff<Scalar>();
            const long double n = static_cast<long double>(nk);
            INFO("query " << c << ", row " << e);
            REQUIRE(std::fabs(acc(e, c) - exact) <= n * u / (1 - n * u) * magnitude);
        }
}

#if defined(EIGEN_DONT_VECTORIZE)
// This file is also built with EIGEN_DONT_VECTORIZE (test attention_block_kernels_scalar), so
// that the one-lane paths run in the ordinary test command; they do only if packets are scalars.
TEMPLATE_TEST_CASE("without vectorisation the kernels use one-lane packets", "[block][scalar]",
                   float, double) {
    STATIC_REQUIRE(mha::detail::block_kernel_traits<TestType>::width == 1);
}
#endif
