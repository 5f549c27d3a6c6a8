// SPDX-License-Identifier: MIT
// The online softmax of one task of the tiled kernel (design: detail/tiled/forward.hpp): for a
// block of queries of one (sequence, head), the pass over key blocks that keeps each query's
// running max m and sum l and rescales the output accumulator, the final division with the
// repair of poisoned columns and the log-sum-exp, and the pass that recomputes the weights.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/block_softmax.hpp>
#include <mha/detail/tiled/few_query_scores.hpp>
#include <mha/detail/tiled/tile_scratch.hpp>
#include <mha/normalization.hpp>

namespace mha {
namespace detail {

/// Masks by selection the transposed scores st (ld lds) of queries [i0, i0+nq) against keys
/// [j0, j0+nk), with the queries' intervals in t (key_intervals) and their summary iv: −∞ outside
/// each query's interval, then the mask's element-wise part (keep matrices, biases) inside it.
/// A boundary block's padding rows are set to 0 first: its tiles skipped them, so they hold stale
/// values. Shared by the fp32 and bf16 kernels (masked_scores, masked_scores_bf16).
template <class Scalar>
void mask_by_selection(const mask_view<Scalar>& mask, Scalar* st, Index lds, Index i0, Index nq,
                       Index j0, Index nk, const interval_summary& iv, bool interior,
                       const tile_scratch<Scalar>& t) {
    if (!interior)
        for (Index r = 0; r < nk; ++r)
            std::fill(st + r * lds + nq, st + (r + 1) * lds, Scalar(0));
    if (!mask.has_elementwise()) {
        mask_outside_intervals(st, lds, nq, j0, nk, t.first.data(), t.last.data(), iv.max_first,
                               iv.min_last);
        return;
    }
    for (Index c = 0; c < nq; ++c) {
        const Index f = std::clamp(t.first[static_cast<std::size_t>(c)] - j0, Index(0), nk);
        const Index e = std::clamp(t.last[static_cast<std::size_t>(c)] - j0, f, nk);
        mask.apply(st + c, lds, i0 + c, j0, nk, f, e);  // key r of query c at st[c + r·lds]
    }
}

/// Whether a block of nq queries has its scores from few_query_scores, which reads Q in place,
/// rather than from the register tiles, which read the queries packed into t.qt: fewer queries
/// than a packet (decode steps, short tails) would leave the tiles mostly padding.
template <class Scalar>
constexpr bool reads_queries_in_place(Index nq) {
    return nq < block_kernel_traits<Scalar>::width;
}

/// The scaled queries [i0, i0+nq) packed into t.qt for the register tiles of masked_scores;
/// nothing for a block that reads them in place.
template <class Scalar>
void pack_queries_for_tiles(const head_problem<Scalar>& p, Index i0, Index nq, Index nqp,
                            tile_scratch<Scalar>& t) {
    if (reads_queries_in_place<Scalar>(nq)) return;
    pack_scaled_queries(p.q + i0 * p.q_stride, p.q_stride, p.dk, nq, nqp, p.scale, t.qt.data(),
                        score_stride<Scalar>(nqp));
}

/// Whether one of the first nq queries has keys in the block but a max of −∞ in mx (all −∞ or
/// NaN: a max that skips NaN may have dropped one). By `by_limits`, a query's keys in the block
/// are t.key_from..t.key_to (limits_in); otherwise all of them (an interior block).
template <class Scalar>
bool may_hide_nan(const Scalar* mx, Index nq, bool by_limits, const tile_scratch<Scalar>& t) {
    for (Index c = 0; c < nq; ++c) {
        const auto u = static_cast<std::size_t>(c);
        const bool has_key = !by_limits || t.key_from[u] < t.key_to[u];
        if (has_key && mx[c] == -std::numeric_limits<Scalar>::infinity()) return true;
    }
    return false;
}

/// Sᵀ(0:nqp, 0:nk) = qt · K[:, j0:j0+nk] into t.s (qt and t.s with ld score_stride(nqp)), i.e. the
/// scaled scores of queries [i0, i0+nq) (qt packed by pack_scaled_queries) against keys [j0,
/// j0+nk), then changed by the score terms (soft-capping, ALiBi, the modifier) and masked by
/// selection. Rows nq..nqp are padding and hold finite values. With a non-null `mx` (nqp entries),
/// returns true when it also wrote each query's max there (as max_per_query, but over the scores
/// that are not NaN where mx_skips_nan): for a block whose scores nothing changes after the score
/// kernel, which computes the max while they are in registers.
template <class Scalar, class Mod>
bool masked_scores(const head_problem<Scalar>& p, const Mod& mod, Index i0, Index nq, Index nqp,
                   const key_block& block, const interval_summary& iv, tile_scratch<Scalar>& t,
                   Scalar* mx = nullptr) {
    const auto [j0, nk, interior, ranges] = block;
    Scalar* s = t.s.data();
    const Index lds = score_stride<Scalar>(nqp);
    const Scalar* k = p.k + j0 * p.k_stride;
    const bool as_computed = interior && !modifies_scores(p, mod) && !p.mask->has_elementwise();
    if (!reads_queries_in_place<Scalar>(nq)) {
        // A boundary block's tiles compute only the keys their queries may see; masking below
        // sets everything outside each query's interval to −∞, skipped entries included. Where
        // the tiles can mask (tiles_mask_boundaries) and the mask is intervals alone, they do, and
        // take the max: the skipped entries stay as they were, which the exp pass, given the
        // ranges, does not read.
        const bool in_tiles = tiles_mask_boundaries<Scalar>() && mx != nullptr && !interior &&
                              !modifies_scores(p, mod) && !p.mask->has_elementwise();
        transposed_scores(t.qt.data(), lds, nqp, p.dk, k, p.k_stride, nk, s, lds, ranges,
                          as_computed || in_tiles ? mx : nullptr,
                          in_tiles ? limits_in(t, nq, nqp, j0, nk) : block_key_limits{});
        // A NaN the tiles' max skipped still reaches the output through its own exp, unless the
        // max became −∞ ("no key yet"): such a block takes the NaN-propagating max_per_query, a
        // boundary block after masking by selection (its tiles skipped entries off `ranges`).
        if (as_computed || in_tiles) {
            if (mx == nullptr) return false;
            if (!(mx_skips_nan<Scalar>() && may_hide_nan(mx, nq, in_tiles, t))) return true;
            if (as_computed) return false;
        }
    } else {
        // Also sets rows nq..nqp, the padding the softmax passes read, to 0.
        few_query_scores(p.q + i0 * p.q_stride, p.q_stride, nq, p.dk, p.scale, k, p.k_stride, nk, s,
                         lds);
    }
    // Before the mask, which then replaces excluded entries whatever the terms made of them
    // (entries a boundary tile skipped hold stale finite or ±∞ values until then).
    if (modifies_scores(p, mod))
        for (Index r = 0; r < nk; ++r)
            modify_key_column(p, mod, s + r * lds, i0, nq, j0 + r);
    const auto& mask = *p.mask;
    if (interior && !mask.has_elementwise()) return false;
    mask_by_selection(mask, s, lds, i0, nq, j0, nk, iv, interior, t);
    return false;
}

/// The online pass of queries [i0, i0+nq) over keys [k_lo, k_hi): leaves the unnormalised output
/// in t.acc (dv × nq) and the running max and sum in t.m, t.l. Key blocks the modifier's block
/// predicate rules out are not read.
template <class Scalar, class Mod = no_score_modifier>
void online_pass(const head_problem<Scalar>& p, Index i0, Index nq, Index k_lo, Index k_hi,
                 const tiled_settings& cfg, tile_scratch<Scalar>& t, const Mod& mod = Mod{}) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    t.acc.topLeftCorner(p.dv, nq).setZero();
    t.m.head(nq).setConstant(minus_inf);
    t.l.head(nq).setZero();
    const interval_summary iv = key_intervals(p, i0, nq, k_lo, k_hi, t);
    if (iv.lo >= iv.hi) return;
    const Index nqp = padded_queries<Scalar>(nq);
    pack_queries_for_tiles(p, i0, nq, nqp, t);
    Scalar* st = t.s.data();
    const Index lds = score_stride<Scalar>(nqp);
    for (Index j0 = iv.lo; j0 < iv.hi; j0 += cfg.key_block) {
        const Index nk = std::min(cfg.key_block, iv.hi - j0);
        if (!visits_block(mod, p.sequence, p.head, i0, i0 + nq, j0, j0 + nk)) continue;
        const key_block block = key_block_at(t, iv, nq, j0, nk);
        if (!masked_scores(p, mod, i0, nq, nqp, block, iv, t, t.block_max.data()))
            max_per_query(st, lds, nqp, nk, t.block_max.data());
        for (Index c = 0; c < nqp; ++c) {
            // The new running max; a query with nothing allowed yet (−∞) shifts by 0, so its
            // −∞ scores still give exactly 0 and no −∞ − (−∞) = NaN appears.
            const Scalar m_new = c < nq ? nan_propagating_max(t.m(c), t.block_max(c)) : Scalar(0);
            t.block_max(c) = m_new;
            t.shift(c) = m_new == minus_inf ? Scalar(0) : m_new;
        }
        exp_shifted_per_query(st, lds, nqp, nk, t.shift.data(), t.block_sum.data(), block.ranges);
        for (Index c = 0; c < nq; ++c) {
            const Scalar m_old = t.m(c);
            const Scalar m_new = t.block_max(c);
            if (m_new == minus_inf) continue;  // nothing allowed yet: contributes nothing
            if (m_old == minus_inf) {
                // First allowed keys: start from a clean accumulator (earlier blocks may have
                // added 0·NaN from poisoned excluded values).
                t.acc.col(c).head(p.dv).setZero();
                t.l(c) = t.block_sum(c);
            } else if (m_new != m_old) {
                const Scalar alpha = exp_or_zero(m_old - m_new);
                t.acc.col(c).head(p.dv) *= alpha;
                t.l(c) = alpha * t.l(c) + t.block_sum(c);
            } else {
                t.l(c) += t.block_sum(c);
            }
            t.m(c) = m_new;
        }
        // V's columns lie a whole QKV row apart (3·E floats, 6 KB for E = 512). Copied
        // contiguous, the chunk the value kernel re-reads for every query tile stays in L1;
        // measured a few per cent faster at L = 2048 (copying K as well was slower). V that
        // tiled_attention packed once per call is contiguous already. A block of at most one
        // value tile of queries (a decode step) reads each V column once: a copy would only add
        // a store and a reload.
        const Scalar* vb = p.v + j0 * p.v_stride;
        Index v_stride = p.v_stride;
        if (p.v_stride != p.dv && nq > block_kernel_traits<Scalar>::value_queries) {
            for (Index r = 0; r < nk; ++r)
                std::copy_n(p.v + (j0 + r) * p.v_stride, p.dv, t.v.data() + r * p.dv);
            vb = t.v.data();
            v_stride = p.dv;
        }
        accumulate_values(vb, v_stride, p.dv, nk, st, lds, nq, t.acc.data(), t.acc.rows(),
                          block.ranges);
    }
}

/// Recomputes output column i from its allowed keys alone (see "Poisoned values" in
/// detail/tiled/forward.hpp). A key the score terms exclude (−∞) is skipped like a masked one.
template <class Scalar, class Mod>
void repair_column(const head_problem<Scalar>& p, const Mod& mod, Index i, Scalar m, Scalar inv_l) {
    using cvec = Eigen::Map<const vector<Scalar>>;
    Eigen::Map<vector<Scalar>> out(p.out + i * p.out_stride, p.dv);
    out.setZero();
    const cvec qi(p.q + i * p.q_stride, p.dk);
    const auto& mask = *p.mask;
    const auto range = mask.key_range(i);
    for (Index j = range.first; j < range.second; ++j) {
        if (mask.excludes(j, i)) continue;
        Scalar s = p.scale * cvec(p.k + j * p.k_stride, p.dk).dot(qi);
        s = modified_score(p, mod, i, j, s);
        if (mask.has_bias()) s += mask.bias(j, i);
        if (s == -std::numeric_limits<Scalar>::infinity()) continue;
        out += (std::exp(s - m) * inv_l) * cvec(p.v + j * p.v_stride, p.dv);
    }
}

/// Writes out = acc / l for queries [i0, i0+nq) (0 for a query with no allowed key), repairs
/// non-finite columns, and writes each query's log-sum-exp m + log l (−∞ with no allowed key)
/// when the problem asks for it. The sink, if any, joins (m, l) here, once per query whatever
/// the split-KV chunks, and t.m, t.l keep the result for weights_pass.
template <class Scalar, class Mod = no_score_modifier>
void finalize_block(const head_problem<Scalar>& p, Index i0, Index nq, tile_scratch<Scalar>& t,
                    const Mod& mod = Mod{}) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index c = 0; c < nq; ++c) {
        Eigen::Map<vector<Scalar>> out(p.out + (i0 + c) * p.out_stride, p.dv);
        const bool no_key = t.m(c) == minus_inf;
        const Scalar alpha = fold_sink(p, t.m(c), t.l(c));
        if (p.lse != nullptr)
            p.lse[(i0 + c) * p.lse_stride] =
                t.m(c) == minus_inf ? minus_inf : t.m(c) + std::log(t.l(c));
        if (no_key) {  // exactly 0, with or without a sink
            out.setZero();
            continue;
        }
        const Scalar inv_l = Scalar(1) / t.l(c);
        out = t.acc.col(c).head(p.dv) * (alpha * inv_l);
        if (!all_finite(out)) repair_column(p, mod, i0 + c, t.m(c), inv_l);
    }
}

/// Weights of queries [i0, i0+nq): w = exp(S − m)/l over every visited block, written
/// (divisor 0) or added divided by `divisor` (the head count, averaged mode) into `w`, an
/// lk × lq matrix that is zero outside the visited blocks.
template <class Scalar, class Mod = no_score_modifier>
void weights_pass(const head_problem<Scalar>& p, Index i0, Index nq, const tiled_settings& cfg,
                  tile_scratch<Scalar>& t, matrix<Scalar>& w, Scalar divisor,
                  const Mod& mod = Mod{}) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const interval_summary iv = key_intervals(p, i0, nq, 0, p.lk, t);
    if (iv.lo >= iv.hi) return;
    const Index nqp = padded_queries<Scalar>(nq);
    const Index lds = score_stride<Scalar>(nqp);
    pack_queries_for_tiles(p, i0, nq, nqp, t);
    for (Index j0 = iv.lo; j0 < iv.hi; j0 += cfg.key_block) {
        const Index nk = std::min(cfg.key_block, iv.hi - j0);
        if (!visits_block(mod, p.sequence, p.head, i0, i0 + nq, j0, j0 + nk)) continue;
        masked_scores(p, mod, i0, nq, nqp, key_block_at(t, iv, nq, j0, nk), iv, t);
        for (Index c = 0; c < nq; ++c) {
            if (t.m(c) == minus_inf) continue;   // no allowed key: weights stay 0
            const Scalar* row = t.s.data() + c;  // key r at row[r·lds]
            const Scalar m = t.m(c), l = t.l(c);
            Scalar* dst = w.data() + (i0 + c) * w.rows() + j0;
            // Scalar std::exp and a true division, not the packet exp of the online pass:
            // returned weights are compared element by element with other paths (the
            // materialised softmax evaluates std::exp too), and 1-ulp packet exp errors showed
            // up there. This pass is O(Lk·Lq) like the weights themselves.
            for (Index r = 0; r < nk; ++r) {
                const Scalar sr = row[r * lds];
                const Scalar x = sr == minus_inf ? Scalar(0) : std::exp(sr - m) / l;
                if (divisor != Scalar(0))
                    dst[r] += x / divisor;
                else
                    dst[r] = x;
            }
        }
    }
}

}  // namespace detail
}  // namespace mha
