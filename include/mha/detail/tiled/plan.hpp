// SPDX-License-Identifier: MIT
// The work plan of the tiled kernel (design: detail/tiled/forward.hpp): which tasks a call
// runs, in which order, and how a decode-like sequence is split over key chunks whose partial
// results are merged by log-sum-exp. The plan depends only on the shapes, the masks and the
// settings, never on the thread count, so results are the same for every thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/state_merge.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// A task: queries [i0, i0 + nq) of sequence b, head h (-1: every head in order), over all keys
/// or, for chunk >= 0, over split-KV chunk `chunk` only. A task owns the output columns it
/// writes (a chunk task owns its partial), so tasks need no reduction.
struct tiled_task {
    Index b, h, i0, nq, chunk;
    double cost;
    Index order;  // creation index: breaks cost ties, so the order does not depend on the sort
};

/// The tasks of one call and the split-KV partials. Its vectors are cleared, never shrunk, and
/// the partials only grow: a call with the shapes of an earlier one allocates nothing.
template <class Scalar>
class tiled_plan {
public:
    std::vector<tiled_task> tasks;                // most expensive first
    std::vector<std::pair<Index, Index>> merges;  // (b, h) of each split head, to merge

    /// Plans `p`. Weights need every key block of a query in one task, so a call that returns
    /// weights never splits.
    void build(const attention_problem<Scalar>& p, const mask_views<Scalar>& masks,
               const tiled_settings& cfg, bool per_head_scores = false) {
        build(p.heads, p.batch, masks, cfg, per_head_scores, p.request.weights);
    }

    /// The plan of a call on these heads and batch (the bf16 kernel's too, which returns no
    /// weights); `per_head_scores`: the heads' scores differ beyond their inputs (ALiBi, sinks,
    /// a modifier), so a decode step's query heads cannot be stacked.
    void build(const head_layout& heads, const packed_batch& batch, const mask_views<Scalar>& masks,
               const tiled_settings& cfg, bool per_head_scores, weights_mode weights) {
        const Index nb = batch.size();
        const Index num_heads = heads.num_heads;
        const bool want_weights = weights != weights_mode::none;
        const bool averaged = weights == weights_mode::averaged;
        split_chunk_ = cfg.split_chunk;
        dv_ = heads.dv;
        tasks.clear();
        chunks_of_.assign(static_cast<std::size_t>(nb), 0);
        // One query per sequence with grouped heads (a decode step): the query heads of each
        // key/value head become the queries of one problem (make_stacked_problem) when they
        // share their masks and no weights are asked (weights are per query head).
        const Index group = heads.num_heads / heads.num_kv_heads;
        // (Scores that differ by head, ALiBi, sinks or a modifier, cannot be stacked either.)
        const bool can_stack = group > 1 && group <= cfg.query_block && !want_weights &&
                               !per_head_scores && masks.same_for_every_head();
        stack_.assign(static_cast<std::size_t>(nb), 1);
        auto add_task = [this](Index b, Index h, Index i0, Index nq, Index chunk, double cost) {
            tasks.push_back({b, h, i0, nq, chunk, cost, static_cast<Index>(tasks.size())});
        };
        for (Index b = 0; b < nb; ++b) {
            Index lq = batch.query_length(b);
            const Index lk = batch.key_length(b);
            if (lq == 0) continue;
            Index problem_heads = num_heads;
            if (can_stack && lq == 1) {
                stack_[static_cast<std::size_t>(b)] = group;
                problem_heads = heads.num_kv_heads;
                lq = group;
            }
            // Decode (few queries, many keys): one (b, h, query block) task per head would leave
            // threads idle, so the keys are split into chunks.
            const bool split = !want_weights && lq <= cfg.query_block && lk >= 2 * cfg.split_chunk;
            const Index nchunks = split ? (lk + cfg.split_chunk - 1) / cfg.split_chunk : 0;
            chunks_of_[static_cast<std::size_t>(b)] = nchunks;
            for (Index i0 = 0; i0 < lq; i0 += cfg.query_block) {
                const Index nq = std::min(cfg.query_block, lq - i0);
                // Cost estimate: the keys the block's first and last queries may see (exact
                // enough to hand out the long causal blocks first).
                const auto& mask = masks(b, 0);
                const Index last_query = stack_[static_cast<std::size_t>(b)] > 1 ? 0 : i0 + nq - 1;
                const auto r0 = mask.key_range(i0), r1 = mask.key_range(last_query);
                const double keys = static_cast<double>(std::max(r0.second, r1.second) -
                                                        std::min(r0.first, r1.first));
                const double cost = static_cast<double>(nq) * (keys + 1);
                if (averaged) {
                    // Averaged weights add the heads into one matrix: one task owns all of
                    // them, so the sum has the same order as in the materialised path.
                    add_task(b, -1, i0, nq, -1, cost * static_cast<double>(num_heads));
                    continue;
                }
                for (Index h = 0; h < problem_heads; ++h) {
                    if (!split) {
                        add_task(b, h, i0, nq, -1, cost);
                        continue;
                    }
                    for (Index c = 0; c < nchunks; ++c)
                        add_task(b, h, i0, nq, c,
                                 static_cast<double>(nq) * static_cast<double>(cfg.split_chunk));
                }
            }
        }
        // Most expensive first; equal costs head by head (a head's K and V, 4 MB at L = 8192,
        // stay in cache for its next query block, where alternating heads would stream all of
        // them: 10% at L = 8192), then in creation order. std::sort with a total order: no
        // buffer, unlike std::stable_sort, and the same order every time.
        // Split-KV chunks go chunk by chunk, then key/value head by key/value head, then over
        // the query heads of the group: the query heads sharing a chunk of K and V read it while
        // it is in cache, so a decode step streams each cached key once, not once per query
        // head; and the key/value heads of a chunk read the same cache columns (a KV cache
        // keeps a token's heads in one column), so the chunk's memory is read whole and in
        // turn, where head by head each pass read 256 or 512 bytes per column a column apart
        // (one decode step over 32768 cached tokens, one thread: 1.3-1.7x faster,
        // docs/performance.md).
        // (A stacked sequence's task already covers a whole group: its h is the key/value head.)
        std::sort(
            tasks.begin(), tasks.end(), [this, group](const tiled_task& a, const tiled_task& b) {
                if (a.cost != b.cost) return a.cost > b.cost;
                if (a.b != b.b) return a.b < b.b;
                if (a.chunk >= 0 && b.chunk >= 0 && a.i0 == b.i0) {
                    if (a.chunk != b.chunk) return a.chunk < b.chunk;
                    const Index kv_group = stack_[static_cast<std::size_t>(a.b)] > 1 ? 1 : group;
                    if (a.h / kv_group != b.h / kv_group) return a.h / kv_group < b.h / kv_group;
                }
                if (a.h != b.h) return a.h < b.h;
                return a.order < b.order;
            });

        // Split partials: (acc dv × lq, m lq, l lq) per sequence, head and chunk.
        partial_column_.assign(static_cast<std::size_t>(nb), 0);
        query_length_.assign(static_cast<std::size_t>(nb), 0);
        Index columns = 0;
        merges.clear();
        for (Index b = 0; b < nb; ++b) {
            const auto bi = static_cast<std::size_t>(b);
            // A stacked sequence has H_kv problems of `group` queries: the same H columns.
            const Index problem_heads = stack_[bi] > 1 ? heads.num_kv_heads : num_heads;
            partial_column_[bi] = columns;
            query_length_[bi] = batch.query_length(b) * stack_[bi];
            columns += problem_heads * chunks_of_[bi] * query_length_[bi];
            if (chunks_of_[bi] > 0)
                for (Index h = 0; h < problem_heads; ++h)
                    merges.emplace_back(b, h);
        }
        grow(acc_, dv_ * columns);
        grow(m_, columns);
        grow(l_, columns);
    }

    /// Keeps the partial (t.acc, t.m, t.l) of queries [i0, i0 + nq) of (b, h, chunk).
    void store_partial(Index b, Index h, Index chunk, Index i0, Index nq,
                       const tile_scratch<Scalar>& t) {
        const Index at = partial_at(b, h, chunk) + i0;
        Eigen::Map<matrix<Scalar>>(acc_.data() + at * dv_, dv_, nq) = t.acc.topLeftCorner(dv_, nq);
        m_.segment(at, nq) = t.m.head(nq);
        l_.segment(at, nq) = t.l.head(nq);
    }

    /// 1, or the number of query heads stacked into each problem of sequence b (its tasks and
    /// merges then index key/value heads; see make_stacked_problem).
    Index stacked(Index b) const { return stack_[static_cast<std::size_t>(b)]; }

    /// Keys [lo, hi) of chunk `chunk` of a sequence with lk keys.
    std::pair<Index, Index> chunk_keys(Index chunk, Index lk) const {
        const Index lo = chunk * split_chunk_;
        return {lo, std::min(lk, lo + split_chunk_)};
    }

    /// Merges the partials of problem p (sequence b, head h) chunk by chunk in order (the same
    /// sums for every thread count; merge_state_parts, the merge mha::merge_attention_states
    /// also uses) and finalises its output.
    template <class Mod = no_score_modifier>
    void merge(const head_problem<Scalar>& p, Index b, Index h, Index query_block,
               tile_scratch<Scalar>& t, const Mod& mod = Mod{}) const {
        merge(b, h, p.lq, query_block, t,
              [&](Index i0, Index nq) { finalize_block(p, i0, nq, t, mod); });
    }

    /// The merge of (sequence b, problem h) of lq queries, each query block's merged state left
    /// in t and handed to finalize(i0, nq), which writes the outputs (the bf16 kernel's own).
    template <class Finalize>
    void merge(Index b, Index h, Index lq, Index query_block, tile_scratch<Scalar>& t,
               const Finalize& finalize) const {
        const Index nchunks = chunks_of_[static_cast<std::size_t>(b)];
        const Index first = partial_at(b, h, 0);  // chunk ch of query i: column first + ch·lq + i
        for (Index i0 = 0; i0 < lq; i0 += query_block) {
            const Index nq = std::min(query_block, lq - i0);
            for (Index c = 0; c < nq; ++c) {
                const Index i = i0 + c;
                const auto chunk_part = [&](Index ch) {
                    const Index at = first + ch * lq + i;
                    return state_part<Scalar>{m_(at), l_(at), acc_.data() + at * dv_};
                };
                t.m(c) = merge_state_parts(nchunks, chunk_part, dv_, t.acc.col(c).data(), t.l(c));
            }
            finalize(i0, nq);
        }
    }

private:
    // First column of the partial of (b, h, chunk): sequence b, head h, chunk c, query i at
    // column partial_column[b] + (h·chunks_of[b] + c)·lq + i; acc is dv × columns.
    Index partial_at(Index b, Index h, Index chunk) const {
        const auto bi = static_cast<std::size_t>(b);
        return partial_column_[bi] + (h * chunks_of_[bi] + chunk) * query_length_[bi];
    }
    static void grow(vector<Scalar>& buffer, Index size) {
        if (buffer.size() < size) buffer.resize(size);
    }

    std::vector<Index> chunks_of_;       // split-KV chunks of each sequence, 0 when not split
    std::vector<Index> stack_;           // query heads stacked per problem of each sequence
    std::vector<Index> partial_column_;  // first partial column of each sequence
    std::vector<Index> query_length_;    // of each sequence
    vector<Scalar> acc_, m_, l_;
    Index split_chunk_ = 0;
    Index dv_ = 0;
};

}  // namespace detail
}  // namespace mha
