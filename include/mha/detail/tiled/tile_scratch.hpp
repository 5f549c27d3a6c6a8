// SPDX-License-Identifier: MIT
// What one thread of the tiled kernel keeps between the passes of a task (design:
// detail/tiled/forward.hpp): the tile sizes and their settings, the per-thread scratch and the
// leading dimension of its transposed scores, and the bookkeeping of each query's allowed key
// interval within a block (read by the score, exp and value passes of online_softmax.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/tiled/block_kernel_traits.hpp>
#include <mha/detail/tiled/key_ranges.hpp>
#include <mha/detail/tiled/pack_queries.hpp>

namespace mha {
namespace detail {

/// Queries per task (columns of a score tile). See "Tile sizes" in detail/tiled/forward.hpp.
inline constexpr Index tiled_query_block = 128;
/// Keys per block (rows of a score tile).
inline constexpr Index tiled_key_block = 512;
/// Keys per split-KV chunk for decode-like shapes (a multiple of tiled_key_block).
inline constexpr Index tiled_split_chunk = 1024;

/// Tunables of the tiled kernel; the defaults are the constants above. Tests shrink the blocks to
/// reach many tile boundaries with small inputs.
struct tiled_settings {
    Index query_block = tiled_query_block;
    Index key_block = tiled_key_block;
    Index split_chunk = tiled_split_chunk;
    int threads = 0;  ///< 0: OpenMP's default (omp_get_max_threads()); ignored without OpenMP
};

/// Per-thread scratch, sized once per thread, independent of L. "nqp" is the query block padded
/// to the score kernel's packet multiple (padded_queries).
template <class Scalar>
struct tile_scratch {
    // Flat buffers whose columns start score_stride(nqp) entries apart; one cache line of rows
    // more than nqp leaves room for that stride.
    matrix<Scalar> qt;    // (nqp + line) × dk: the block's queries, transposed and scaled
    matrix<Scalar> s;     // (nqp + line) × key_block: transposed scores, then probabilities
    matrix<Scalar> acc;   // dv × query_block unnormalised output
    matrix<Scalar> v;     // dv × key_block: the block's values, contiguous
    vector<Scalar> m, l;  // query_block: running max and sum
    vector<Scalar> block_max, shift, block_sum;  // nqp: per-block softmax bookkeeping
    std::vector<Index> first, last;              // allowed key interval of each query of the block
    std::vector<std::int32_t> key_from, key_to;  // nqp: the same within a key block (limits_in)
};

/// The leading dimension of t.s and t.qt (one row per padded query) for a block of nqp padded
/// queries: nqp, or one cache line more when a column of nqp entries is a whole number of
/// 256-byte blocks. Consecutive columns would otherwise start 256·n bytes apart, on 16/n of L1's
/// 64 sets (8 sets for 128 floats): the value tiles read a line of Sᵀ per key of a chunk
/// (value_key_chunk), the exp pass a line per key of the block, and the score tiles a line of qt
/// per d, as many as or more than those sets' 8 ways hold. Padded, the float core ran 1.02×
/// faster at L = 2048 (t.s; paired comparison, Zen 3), and the score tiles alone about 5 % faster
/// (t.qt; the same machine).
template <class Scalar>
constexpr Index score_stride(Index nqp) {
    constexpr Index line = cache_line_bytes / static_cast<Index>(sizeof(Scalar));
    return (nqp * static_cast<Index>(sizeof(Scalar))) % 256 == 0 ? nqp + line : nqp;
}

/// A thread's scratch for heads of widths dk, dv and the tile sizes of `cfg`.
template <class Scalar>
tile_scratch<Scalar> make_tile_scratch(Index dk, Index dv, const tiled_settings& cfg) {
    tile_scratch<Scalar> t;
    const Index nqp = padded_queries<Scalar>(cfg.query_block);
    // A shorter block of queries may take one line more than nqp (score_stride).
    const Index rows = nqp + cache_line_bytes / static_cast<Index>(sizeof(Scalar));
    t.qt.resize(rows, std::max<Index>(dk, 1));
    t.s.resize(rows, cfg.key_block);
    t.acc.resize(std::max<Index>(dv, 1), cfg.query_block);
    t.v.resize(std::max<Index>(dv, 1), cfg.key_block);
    t.m.resize(cfg.query_block);
    t.l.resize(cfg.query_block);
    t.block_max.resize(nqp);
    t.shift.resize(nqp);
    t.block_sum.resize(nqp);
    t.key_from.assign(static_cast<std::size_t>(nqp), 0);
    t.key_to.assign(static_cast<std::size_t>(nqp), 0);
    // key_intervals sizes these to the block; reserved so that no later block grows them.
    t.first.reserve(static_cast<std::size_t>(cfg.query_block));
    t.last.reserve(static_cast<std::size_t>(cfg.query_block));
    return t;
}

/// The allowed key intervals of queries [i0, i0 + nq), clipped to [k_lo, k_hi); returns the
/// union [lo, hi) and the intersection bounds (max first, min last) of the non-empty ones.
struct interval_summary {
    Index lo, hi;  // union of the intervals (lo >= hi: nothing to visit)
    Index max_first, min_last;
};

template <class Scalar>
interval_summary key_intervals(const head_problem<Scalar>& p, Index i0, Index nq, Index k_lo,
                               Index k_hi, tile_scratch<Scalar>& t) {
    t.first.resize(static_cast<std::size_t>(nq));
    t.last.resize(static_cast<std::size_t>(nq));
    interval_summary r{k_hi, k_lo, k_lo, k_hi};
    for (Index c = 0; c < nq; ++c) {
        auto range = p.mask->key_range(i0 + c);
        const Index f = std::max(range.first, k_lo);
        const Index e = std::max(f, std::min(range.second, k_hi));
        t.first[static_cast<std::size_t>(c)] = f;
        t.last[static_cast<std::size_t>(c)] = e;
        r.max_first = std::max(r.max_first, f);
        r.min_last = std::min(r.min_last, e);
        if (f < e) {
            r.lo = std::min(r.lo, f);
            r.hi = std::max(r.hi, e);
        }
    }
    return r;
}

/// Keys [j0, j0 + nk) of a query block's pass, derived once per key block and read by the score,
/// exp and value kernels: interior when every query of the block may see all of them (no mask
/// to apply); else `ranges` holds each query's allowed keys (from key_intervals).
struct key_block {
    Index j0, nk;
    bool interior;
    query_key_ranges ranges;  // empty when interior
};

/// The key block [j0, j0 + nk) of queries whose intervals key_intervals left in t and summed in iv.
template <class Scalar>
key_block key_block_at(const tile_scratch<Scalar>& t, const interval_summary& iv, Index nq,
                       Index j0, Index nk) {
    const bool interior = iv.max_first <= j0 && j0 + nk <= iv.min_last;
    return {
        j0, nk, interior,
        interior ? query_key_ranges{} : query_key_ranges{t.first.data(), t.last.data(), nq, j0}};
}

/// Each query's allowed keys [from, to) within keys [j0, j0+nk), from the intervals in t
/// (key_intervals), for the score tiles to mask by (block_key_limits); padding queries up to nqp
/// get none.
template <class Scalar>
block_key_limits limits_in(tile_scratch<Scalar>& t, Index nq, Index nqp, Index j0, Index nk) {
    for (Index c = 0; c < nqp; ++c) {
        const auto u = static_cast<std::size_t>(c);
        const Index f = c < nq ? std::clamp(t.first[u] - j0, Index(0), nk) : 0;
        const Index e = c < nq ? std::clamp(t.last[u] - j0, f, nk) : 0;
        t.key_from[u] = static_cast<std::int32_t>(f);
        t.key_to[u] = static_cast<std::int32_t>(e);
    }
    return {t.key_from.data(), t.key_to.data()};
}

}  // namespace detail
}  // namespace mha
