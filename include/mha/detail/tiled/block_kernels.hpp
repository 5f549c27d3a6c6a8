// SPDX-License-Identifier: MIT
// Register-tiled block kernels of the tiled attention (detail/tiled/forward.hpp): the two
// products of one (query block, key block) step, written with Eigen's packet primitives so that
// they compile to AVX-512, AVX2, SSE or NEON instructions, or to plain scalar code.
//
// Why not Eigen's GEMM per block: it packs both operands on every call (the query block once per
// key block, the probabilities once per step) and writes C += αAB, which needs the score tile
// zeroed first. The kernels below read K and V where they lie (strided head views), pack only
// the query block (once per task, with the scale folded in), and write the scores directly.
//
// Layouts (all column-major):
//   qt : nq_padded × d_k      qt(c, d) = scale·Q(d, c); zero rows pad nq up to a packet multiple
//   st : nq_padded × nk       st(c, j) = score of query c against key j: a column holds one key's
//                             scores for every query, so the online softmax's per-query max, exp
//                             and sum run across packets of queries with no horizontal reduction
//   acc: d_v × nq             the unnormalised output, as the output matrix lays out a head
//
// Scores: a micro tile is (score_query_packets · W queries) × score_keys keys kept in
// registers; per step d it loads the packets of qt(:, d) and broadcasts K(d, j) for each key.
// Values: a micro tile is (value_packets · W rows of d_v) × value_queries queries; per key j it
// loads value_packets packets of V(:, j) and broadcasts P(j, c) for each query. Keys are taken
// in chunks of value_key_chunk, and within a chunk every query tile runs one row tile before the
// next, so that the row tile's V lines stay in L1 while the query tiles read them (smaller
// chunks when a single query tile reads V, once).
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/tiled/block_kernel_traits.hpp>
#include <mha/detail/tiled/key_ranges.hpp>
#include <mha/detail/tiled/pack_queries.hpp>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mha {
namespace detail {

/// f(std::integral_constant<int, n>{}) for a runtime n in [1, Max] (nothing otherwise): a tile
/// whose width is known at compile time for the columns left after the full tiles.
template <int Max, class F>
MHA_ALWAYS_INLINE void with_tile_width(Index n, F&& f) {
    if constexpr (Max > 0) {
        if (n == Max)
            f(std::integral_constant<int, Max>{});
        else
            with_tile_width<Max - 1>(n, std::forward<F>(f));
    }
}

/// tile(std::integral_constant<int, n>{}, j) over keys [j0, j1): tiles of n = Keys keys from j0,
/// then one narrower tile for the rest (one key at a time would leave too few independent
/// multiply-add chains: inferred, not measured). Mark `tile` MHA_ALWAYS_INLINE_LAMBDA: left to
/// GCC it stayed a call per tile, 4–7 % slower.
template <int Keys, class F>
MHA_ALWAYS_INLINE void for_each_key_tile(Index j0, Index j1, F&& tile) {
    Index j = j0;
    for (; j + Keys <= j1; j += Keys)
        tile(std::integral_constant<int, Keys>{}, j);
    with_tile_width<Keys - 1>(j1 - j, [&](auto rest) { tile(rest, j); });
}

/// One score micro tile: st(0 : QP·W, 0 : Keys) = qt(0 : QP·W, :) · K(:, 0 : Keys); with a
/// non-null `mx`, also mx(0 : QP·W) = max(mx, the tile's max per query), over the scores that
/// are not NaN for float on AVX-512 and AVX2 with FMA (mx_skips_nan), NaN winning elsewhere.
/// With Masks (on those targets only: tiles_mask_boundaries), the tile's first key is key j of
/// the block and a score of query c outside [limits.from[c], limits.to[c]) becomes −∞ before it
/// is stored or taken into the max.
template <class Scalar, int QP, int Keys, bool Masks = false>
MHA_ALWAYS_INLINE void score_micro_tile(const Scalar* qt, Index ldq, Index dk, const Scalar* k,
                                        Index k_stride, Scalar* st, Index ld, Scalar* mx,
                                        [[maybe_unused]] const block_key_limits& limits = {},
                                        [[maybe_unused]] Index j = 0) {
    static_assert(!Masks || tiles_mask_boundaries<Scalar>(), "no tile masking on this target");
    using ops = typename block_kernel_traits<Scalar>::ops;
    using packet = typename ops::packet;
    constexpr Index w = block_kernel_traits<Scalar>::width;
    packet acc[QP][Keys];
    for (int p = 0; p < QP; ++p)
        for (int r = 0; r < Keys; ++r)
            acc[p][r] = ops::broadcast(Scalar(0));
    for (Index d = 0; d < dk; ++d) {
        packet x[QP];
        for (int p = 0; p < QP; ++p)
            x[p] = ops::load(qt + d * ldq + p * w);
        for (int r = 0; r < Keys; ++r) {
            const packet b = ops::broadcast(k[r * k_stride + d]);
            for (int p = 0; p < QP; ++p)
                acc[p][r] = ops::mul_add(x[p], b, acc[p][r]);
        }
    }
#if defined(__AVX2__)
    if constexpr (Masks) mask_outside_limits(acc, limits, j);
#endif
    for (int r = 0; r < Keys; ++r)
        for (int p = 0; p < QP; ++p)
            ops::store(st + r * ld + p * w, acc[p][r]);
    if (mx == nullptr) return;
    for (int p = 0; p < QP; ++p) {
        packet m = ops::load(mx + p * w);
        for (int r = 0; r < Keys; ++r) {
#if defined(__AVX512F__)
            // vmaxps returns its second operand when either is NaN: m skips NaN scores in one
            // instruction, where Eigen's NaN-propagating max took five (vcmpps, vpmovm2d, a
            // masked move, a blend, a test): 14 % of this kernel's time at L = 2048 (profiled).
            if constexpr (mx_skips_nan<Scalar>()) {
                m = _mm512_max_ps(acc[p][r], m);
                continue;
            }
#elif defined(__AVX2__)
            if constexpr (mx_skips_nan<Scalar>()) {  // as on AVX-512, one vmaxps per score
                m = _mm256_max_ps(acc[p][r], m);
                continue;
            }
#endif
            m = ops::max_nan(m, acc[p][r]);
        }
        ops::store(mx + p * w, m);
    }
}

/// st(0 : nq_padded, 0 : nk) = qt · K(:, 0 : nk), with qt packed by pack_scaled_queries (leading
/// dimension ldq >= nq_padded) and key j at k + j·k_stride. nq_padded must be a multiple of the
/// packet width. With `ranges`, each half of a query tile (split_query_tile) computes only the keys
/// in the union of its queries' ranges; the entries outside are left as they were, for the caller
/// to mask. With a non-null `mx` (nq_padded entries), mx(c) becomes the max of query c's scores (−∞
/// with no key) while they are still in registers, which saves the online softmax a pass over st;
/// only for blocks whose scores the caller leaves as they are (no mask, no score terms), or masks
/// by `limits` (score_micro_tile; tiles_mask_boundaries). Where mx_skips_nan, a NaN score is left
/// out of mx(c), not taken as its max (see masked_scores for what the caller does about it);
/// elsewhere mx(c) is NaN when one of the scores is.
template <class Scalar>
void transposed_scores(const Scalar* qt, Index ldq, Index nq_padded, Index dk, const Scalar* k,
                       Index k_stride, Index nk, Scalar* st, Index ld,
                       const query_key_ranges& ranges = {}, Scalar* mx = nullptr,
                       const block_key_limits& limits = {}) {
    using traits = block_kernel_traits<Scalar>;
    constexpr Index w = traits::width;
    constexpr int qp = static_cast<int>(traits::score_query_packets);
    constexpr int keys = static_cast<int>(traits::score_keys);
    if (mx != nullptr) std::fill(mx, mx + nq_padded, -std::numeric_limits<Scalar>::infinity());
    // Tiles of QP packets for queries [i, i + QP·W) over keys [j0, j1).
    auto tiles = [&](auto packets, auto width, Index i, Index j0, Index j1) {
        constexpr int n_packets = decltype(packets)::value;
        Scalar* m = mx == nullptr ? nullptr : mx + i;
        const block_key_limits lim = limits.at(i);
        auto run = [&](auto masks) {
            for_each_key_tile<decltype(width)::value>(
                j0, j1, [&](auto n_keys, Index j) MHA_ALWAYS_INLINE_LAMBDA {
                    score_micro_tile<Scalar, n_packets, decltype(n_keys)::value,
                                     decltype(masks)::value>(qt + i, ldq, dk, k + j * k_stride,
                                                             k_stride, st + j * ld + i, ld, m, lim,
                                                             j);
                });
        };
        // Two instantiations: with the check for limits inside every tile, interior blocks ran
        // 2 % slower at L = 2048 (paired comparison, Zen 3; near that method's noise).
        if constexpr (tiles_mask_boundaries<Scalar>()) {
            if (lim.from != nullptr) {
                run(std::true_type{});
                return;
            }
        }
        run(std::false_type{});
    };
    static_assert(qp % 2 == 0, "a score tile splits into two halves of whole packets");
    Index i = 0;
    // The query tile (QP·W queries × d_k) stays in L1 while the key block streams past it.
    for (; i + qp * w <= nq_padded; i += qp * w)
        split_query_tile<qp / 2, w>(ranges, i, nk, [&](auto packets, Index at, Index j0, Index j1) {
            tiles(packets, std::integral_constant<int, keys>{}, at, j0, j1);
        });
    for (; i < nq_padded; i += w) {
        const auto [j_lo, j_hi] = ranges.of(i, i + w, nk);
        tiles(std::integral_constant<int, 1>{}, std::integral_constant<int, 2 * keys>{}, i, j_lo,
              j_hi);
    }
}

/// Where B(j, c) lies: `b[j·ld + c]` (row-major: the transposed probabilities of the forward,
/// one column per key) or `b[c·ld + j]` (column-major: the backward's Pᵀ and dSᵀ read as the
/// right operand of dV = dO·Pᵀ and dK = Q·dSᵀ, which would otherwise need a transpose).
enum class operand_order { row_major, col_major };

template <operand_order Order, class Scalar>
MHA_ALWAYS_INLINE const Scalar& operand_at(const Scalar* b, Index ld, Index j, Index c) {
    if constexpr (Order == operand_order::row_major)
        return b[j * ld + c];
    else
        return b[c * ld + j];
}

/// One value micro tile: acc(0 : VP·W, 0 : Queries) += V(0 : VP·W, 0 : nk) · B(0 : nk, 0 : Queries)
/// with B(j, c) placed as Order says and V(:, j) at v + j·v_stride, stored as VStorage (Scalar,
/// or bf16 widened in registers: load_packet).
template <class Scalar, int VP, int Queries, operand_order Order = operand_order::row_major,
          class VStorage = Scalar>
MHA_ALWAYS_INLINE void value_micro_tile(const VStorage* v, Index v_stride, Index nk,
                                        const Scalar* pt, Index ld, Scalar* acc, Index ld_acc) {
    using ops = typename block_kernel_traits<Scalar>::ops;
    using packet = typename ops::packet;
    constexpr Index w = block_kernel_traits<Scalar>::width;
    packet o[VP][Queries];
    for (int c = 0; c < Queries; ++c)
        for (int p = 0; p < VP; ++p)
            o[p][c] = ops::load(acc + c * ld_acc + p * w);
    for (Index j = 0; j < nk; ++j) {
        packet x[VP];
        for (int p = 0; p < VP; ++p)
            x[p] = load_packet<Scalar>(v + j * v_stride + p * w);
        for (int c = 0; c < Queries; ++c) {
            const packet b = ops::broadcast(operand_at<Order>(pt, ld, j, c));
            for (int p = 0; p < VP; ++p)
                o[p][c] = ops::mul_add(x[p], b, o[p][c]);
        }
    }
    for (int c = 0; c < Queries; ++c)
        for (int p = 0; p < VP; ++p)
            ops::store(acc + c * ld_acc + p * w, o[p][c]);
}

/// Rows [0, dv) of `Queries` output columns: full tiles, then single packets, then scalar rows.
template <class Scalar, int Queries, operand_order Order = operand_order::row_major,
          class VStorage = Scalar>
void value_rows(const VStorage* v, Index v_stride, Index dv, Index nk, const Scalar* pt, Index ld,
                Scalar* acc, Index ld_acc) {
    using traits = block_kernel_traits<Scalar>;
    constexpr Index w = traits::width;
    constexpr int vp = static_cast<int>(traits::value_packets);
    Index e = 0;
    for (; e + vp * w <= dv; e += vp * w)
        value_micro_tile<Scalar, vp, Queries, Order, VStorage>(v + e, v_stride, nk, pt, ld, acc + e,
                                                               ld_acc);
    for (; e + w <= dv; e += w)
        value_micro_tile<Scalar, 1, Queries, Order, VStorage>(v + e, v_stride, nk, pt, ld, acc + e,
                                                              ld_acc);
    for (; e < dv; ++e)
        for (int c = 0; c < Queries; ++c) {
            Scalar s = acc[c * ld_acc + e];
            for (Index j = 0; j < nk; ++j)
                s += Scalar(v[j * v_stride + e]) * operand_at<Order>(pt, ld, j, c);
            acc[c * ld_acc + e] = s;
        }
}

/// acc(0 : dv, 0 : nq) += V(:, 0 : nk) · P with P(j, c) = pt[j·ld + c] (the transposed
/// probabilities left by the online softmax in the score tile) and V(:, j) at v + j·v_stride.
/// With `ranges`, a query tile reads only the keys in the union of its queries' ranges: P is
/// exactly 0 outside them, so the sums are the same, and V columns no query of the tile may see
/// (possibly NaN or Inf) are not read at all. V stored as VStorage: Scalar, or bf16 for float
/// (widened in registers as the tiles read it).
template <class Scalar, class VStorage = Scalar>
void accumulate_values(const VStorage* v, Index v_stride, Index dv, Index nk, const Scalar* pt,
                       Index ld, Index nq, Scalar* acc, Index ld_acc,
                       const query_key_ranges& ranges = {}) {
    using traits = block_kernel_traits<Scalar>;
    constexpr int queries = static_cast<int>(traits::value_queries);
    constexpr Index tile_rows = traits::value_packets * traits::width;
    const Index chunk =
        nq <= queries ? traits::value_key_chunk_single_tile : traits::value_key_chunk;
    const Index full_rows = dv / tile_rows * tile_rows;
    for (Index j0 = 0; j0 < nk; j0 += chunk) {
        const Index kc = std::min(chunk, nk - j0);
        // One query tile reads V in place (a decode step): the next chunk's columns are asked
        // for while this one is summed (with few_query_scores' prefetch of K, a decode step over
        // 8 key/value heads 1.1-1.6x faster, docs/performance.md).
        if (nq <= queries) prefetch_columns(v, v_stride, dv, j0 + chunk, j0 + 2 * chunk, nk);
        // f(tile, c, lo, hi) for each query tile of the chunk with keys [lo, hi) to read; the
        // rest in one narrower tile, so that V is read once more, not once per query (a decode
        // step's group of 4 query heads read it 4 times). Each sum is still one chain in
        // increasing j: the same bits as single columns.
        auto each_query_tile = [&](auto&& f) {
            auto visit = [&](auto tile, Index c) {
                auto [lo, hi] = ranges.of(c, c + decltype(tile)::value, nk);
                lo = std::max(lo, j0);
                hi = std::min(hi, j0 + kc);
                if (lo < hi) f(tile, c, lo, hi);
            };
            Index c = 0;
            for (; c + queries <= nq; c += queries)
                visit(std::integral_constant<int, queries>{}, c);
            with_tile_width<queries - 1>(nq - c, [&](auto width) { visit(width, c); });
        };
        // Row tiles outside, query tiles inside: a row tile's V lines (one per key) are read
        // by every query tile while they are in L1.
        for (Index e = 0; e < full_rows; e += tile_rows)
            each_query_tile([&](auto tile, Index c, Index lo, Index hi) {
                value_micro_tile<Scalar, static_cast<int>(traits::value_packets),
                                 decltype(tile)::value, operand_order::row_major, VStorage>(
                    v + lo * v_stride + e, v_stride, hi - lo, pt + lo * ld + c, ld,
                    acc + c * ld_acc + e, ld_acc);
            });
        if (full_rows < dv)
            each_query_tile([&](auto tile, Index c, Index lo, Index hi) {
                value_rows<Scalar, decltype(tile)::value, operand_order::row_major, VStorage>(
                    v + lo * v_stride + full_rows, v_stride, dv - full_rows, hi - lo,
                    pt + lo * ld + c, ld, acc + c * ld_acc + full_rows, ld_acc);
            });
    }
}

/// acc(0 : d, 0 : n) += A(:, 0 : m) · B, B column-major (m × n, B(j, c) = b[c·ld + j]), A(:, j)
/// at a + j·a_stride: the value kernel's register tiles with the operand read in place. The
/// backward's dV = dO·Pᵀ and dK = Q·(scale·dS)ᵀ (detail/tiled/backward.hpp), whose Pᵀ and dSᵀ
/// lie one column per key; through Eigen's GEMM both operands were packed on every block pair,
/// and transposing P for accumulate_values cost what the kernel saved. Each acc entry sums its
/// m terms in increasing j in one chain, so the bits do not depend on the blocking around it.
template <class Scalar>
void accumulate_product(const Scalar* a, Index a_stride, Index d, Index m, const Scalar* b,
                        Index ld, Index n, Scalar* acc, Index ld_acc) {
    using traits = block_kernel_traits<Scalar>;
    constexpr int cols = static_cast<int>(traits::value_queries);
    constexpr operand_order col_major = operand_order::col_major;
    if (m == 0) return;
    Index c = 0;
    for (; c + cols <= n; c += cols)
        value_rows<Scalar, cols, col_major>(a, a_stride, d, m, b + c * ld, ld, acc + c * ld_acc,
                                            ld_acc);
    // The rest in one narrower tile: A is read once more, not once per column.
    with_tile_width<cols - 1>(n - c, [&](auto width) {
        value_rows<Scalar, decltype(width)::value, col_major>(a, a_stride, d, m, b + c * ld, ld,
                                                              acc + c * ld_acc, ld_acc);
    });
}

}  // namespace detail
}  // namespace mha
