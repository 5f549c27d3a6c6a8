// SPDX-License-Identifier: MIT
// The tiled (online-softmax, "flash") attention kernel: the fast path for softmax attention.
//
// Design
// ------
// Work units. Tasks are (sequence b, head h, query block of `query_block` columns). A task owns
// its output columns, so tasks never write the same memory and need no reduction: the result of
// a task does not depend on which thread runs it or when. Tasks are handed out dynamically
// (OpenMP `schedule(dynamic)`), the most expensive first (causal and sliding-window blocks differ).
//
// Loop of one task. The query block is packed once, transposed and pre-scaled:
// Qtᵀ = scale·Q_blkᵀ (nq × d_k, padded to a packet multiple). Then over key blocks of `key_block`:
//   Sᵀ = Qtᵀ·K_blk                    (nq × key_block; register tiles, K read in place or
//                                      from its contiguous copy: pack_keys_values)
//   mask Sᵀ by selection              (−∞, whatever K held: poisoned keys never leak)
//   m' = max(m, rowmax Sᵀ)            per query (NaN wins, so NaN in allowed inputs propagates)
//   Pᵀ = exp(Sᵀ − m'), −∞ → exactly 0 (float on AVX-512 or AVX2: exp_above_flush; else pexp)
//   l  = exp(m − m')·l + rowsum Pᵀ;  O = exp(m − m')·O + V_blk·P   (register tiles)
// At the end O /= l, and the query's log-sum-exp is m + log l (returned when asked for, at no
// extra pass); a query that saw no allowed key (m = −∞) gets exactly 0 and a log-sum-exp of −∞. The
// scores are kept transposed, one key per column, so that the max, the exp and the sum run across
// packets of queries: no horizontal reduction, no per-query loop in the hot path. The kernels live
// in detail/tiled/block_kernels.hpp; a block with fewer queries than a packet (a decode step)
// computes its scores with d_k in the lanes instead (detail/tiled/few_query_scores.hpp), as
// padding would waste most of the tile.
//
// Tile sizes. query_block = 128, key_block = 512: Sᵀ is 128×512 floats = 256 KB and stays in
// the 1 MB L2 of the target (Zen 5) together with the O accumulator (d_v×128), the packed
// queries (128×d_k) and the V block (d_v×512). 128 keeps enough tasks for 2 threads at
// L = 512 with 8 heads (32 tasks); larger key blocks amortise the per-block bookkeeping.
// An earlier design called Eigen's GEMM for both products of a block; it reached 0.75 of
// BM_gemm_roofline at L = 2048, the register tiles about 1.0 (bench/bench_attention.cpp).

// Masks. Positional masks (causal, sliding windows, key_lengths) give each query an allowed key
// interval [first_i, last_i) (mask_view::key_range, detail/mask_view.hpp). A task only visits keys
// in the union of its queries' intervals, so blocks above the causal diagonal, outside a window or
// past a key length are never computed. Key blocks inside every query's interval are "interior" and
// pay nothing for masking; only boundary blocks set the out-of-interval entries to −∞ query by
// query. keep_mask and additive_bias are applied element-wise to each visited block (a −∞ bias
// is a selection, like keep_mask, so NaN + (−∞) cannot resurrect an excluded key).
//
// Score terms (detail/score_terms.hpp). Soft-capping, ALiBi and the caller's score modifier
// change each visited block's scores between the score kernel and the mask (masked_scores); the
// modifier is a template argument, so a call without one compiles to the loop above. A block the
// modifier's predicate rules out is skipped before its scores are computed. A sink joins (m, l)
// once per query in finalize_block, after the split-KV merge. Heads that differ in their terms
// are never stacked.
//
// Poisoned values. P·V by GEMM multiplies excluded value columns by 0, and 0·NaN = NaN (0·Inf as
// well). As in the materialised path, such an output column is the only non-finite one that can
// be wrong, so after the last block every non-finite output column is recomputed from its
// allowed keys alone with the final (m, l), skipping excluded keys. NaN from allowed inputs comes
// out again from that recomputation, so it still propagates.
//
// Weights. When asked for, they come from the same kernel: after (m, l) are final, the block
// scores are recomputed (one more score GEMM per block) and exp(S − m)/l is written straight into
// the caller's Lk×Lq matrix. Only that requested output grows with L².
//
// Decode (few queries, many keys). A single (b, h, query block) task would leave the other core
// idle, so when a sequence has at most one query block and at least 2·split_chunk keys, its keys
// are split into chunks of `split_chunk`; each chunk yields a partial (m, l, O) and the partials
// are merged in chunk order by log-sum-exp. The decision depends only on the shapes, never on the
// thread count, so results are identical for every thread count.
//
// Memory. Per thread: Sᵀ (query_block × key_block), the packed queries, the V block,
// O (d_v × query_block), m, l and the query intervals: independent of L. Split partials are d_v ×
// Lq per chunk, the contiguous copies of V and K (pack_keys_values) d_v or d_k × Lk per key/value
// head: linear in Lk. No L×L buffer exists unless weights are requested.
//
// Files. online_softmax.hpp: one task's passes (the loop above, the final division, the
// weights); tile_scratch.hpp: the tile sizes, a thread's scratch and the queries' key intervals;
// plan.hpp: the tasks and the split-KV merge; block_kernels.hpp: the register tiles (their packed
// queries: pack_queries.hpp); this file: the driver. Views of one (sequence, head) come from
// detail/head_problem.hpp, masks from detail/mask_view.hpp, threads from detail/parallel.hpp.
//
// Threads. OpenMP when the compiler has it enabled (CMake option MHA_OPENMP), otherwise serial.
// The block products are the library's own single-threaded register tiles: no OpenMP region
// nests inside a task, and a 1-thread call is really 1 thread.
//
// Normalisations other than softmax (relu, sigmoid) have no online form worth having here; the
// dispatcher in attention.hpp sends them to the materialised path.
#pragma once

#include <algorithm>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/aligned_vector.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/detail/tiled/plan.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// What a tile_scratch was made for: make_tile_scratch's inputs. A thread's scratch is made
/// again when they change.
struct tile_scratch_key {
    Index dk = -1, dv = -1, query_block = -1, key_block = -1;
    bool operator==(const tile_scratch_key& o) const {
        return dk == o.dk && dv == o.dv && query_block == o.query_block && key_block == o.key_block;
    }
};

/// One thread's state in the tiled driver.
template <class Scalar>
struct tiled_thread_state {
    tile_scratch<Scalar> tile;
    tile_scratch_key made_for;  // default: made for nothing yet
};

/// The buffers of tiled_attention, kept between calls: a call with the shapes and settings of
/// an earlier call on the same workspace allocates nothing. One workspace per concurrent call.
template <class Scalar>
struct tiled_workspace {
    mask_views<Scalar> masks;  // refer to the mask of the current call; stale between calls
    tiled_plan<Scalar> plan;
    std::vector<tiled_thread_state<Scalar>> threads;
    // K and V of each (sequence, key/value head) that several query blocks read, copied
    // contiguous once per call (pack_keys_values). V: the value kernel wants a block's columns
    // adjacent (a QKV row apart they left L1), and each query block copied its key blocks again
    // (16 times per head at L = 2048; 4.6 % of the call). K, where the target has 16 vector
    // registers (packs_keys): a QKV row apart, the 6 keys of a score tile lay on 6 pages and a
    // key block on 512; packed, the float core ran 1.07× faster at L = 2048 (AVX2 Zen 3, paired
    // comparison). On AVX-512 (Zen 5, with the score tiles of 2026-12-04) packing K measured
    // 1.45× slower, so K stays in place there. packed_at: where the keys of
    // b·num_kv_heads + g start, in keys (K at packed_at·dk, V at packed_at·dv); −1: not packed.
    // Not zero-filled when they grow: pack_keys_values writes every element of an entry.
    uninitialized_aligned_vector<Scalar> packed_k, packed_v;
    std::vector<Index> packed_at;
};

/// Whether pack_keys_values copies K as well as V (see tiled_workspace).
template <class Scalar>
inline constexpr bool packs_keys = !block_kernel_traits<Scalar>::many_registers;

/// Copies V, and K where packs_keys, of every (sequence, key/value head) whose sequence has more
/// than one query block and is not stacked into ws.packed_v and ws.packed_k (see
/// tiled_workspace), on up to `threads` threads.
template <class Scalar>
void pack_keys_values(const attention_problem<Scalar>& p, const tiled_settings& cfg,
                      tiled_workspace<Scalar>& ws) {
    const head_layout& heads = p.heads;
    const Index dk = heads.dk, dv = heads.dv;
    ws.packed_at.assign(static_cast<std::size_t>(p.batch.size() * heads.num_kv_heads), -1);
    Index keys = 0;
    for (Index b = 0; b < p.batch.size(); ++b) {
        if (p.batch.query_length(b) <= cfg.query_block || ws.plan.stacked(b) != 1) continue;
        for (Index g = 0; g < heads.num_kv_heads; ++g) {
            ws.packed_at[static_cast<std::size_t>(b * heads.num_kv_heads + g)] = keys;
            keys += p.batch.key_length(b);
        }
    }
    if (packs_keys<Scalar> && ws.packed_k.size() < static_cast<std::size_t>(keys * dk))
        ws.packed_k.resize(static_cast<std::size_t>(keys * dk));
    if (ws.packed_v.size() < static_cast<std::size_t>(keys * dv))
        ws.packed_v.resize(static_cast<std::size_t>(keys * dv));
    const Index group = heads.num_heads / heads.num_kv_heads;
    for_each_listed(ws.packed_at, heads.num_kv_heads, cfg.threads, [&](Index b, Index g) {
        // Any query head of the group locates the group's keys and values.
        const head_problem<Scalar> hp = make_head_problem(p, b, g * group, ws.masks(b, g * group),
                                                          static_cast<matrix<Scalar>*>(nullptr));
        const Index at = ws.packed_at[static_cast<std::size_t>(b * heads.num_kv_heads + g)];
        Scalar* v = ws.packed_v.data() + at * dv;
        for (Index j = 0; j < hp.lk; ++j)
            std::copy_n(hp.v + j * hp.v_stride, dv, v + j * dv);
        if constexpr (packs_keys<Scalar>) {
            Scalar* k = ws.packed_k.data() + at * dk;
            for (Index j = 0; j < hp.lk; ++j)
                std::copy_n(hp.k + j * hp.k_stride, dk, k + j * dk);
        }
    });
}

/// The multi-head tiled attention over a packed batch (softmax; `p` validated). `outputs`
/// holds what p.request asks for, sized and zeroed (see size_outputs). `workspace`, when given,
/// keeps every buffer of the call for the next one; null: a workspace local to the call.
/// `mod`: the caller's score modifier (see score_modifier), inlined into the block loop.
template <class Scalar, class Mod = no_score_modifier>
void tiled_attention(const attention_problem<Scalar>& p, attention_outputs<Scalar>& outputs,
                     const tiled_settings& cfg = {}, tiled_workspace<Scalar>* workspace = nullptr,
                     const Mod& mod = Mod{}) {
    tiled_workspace<Scalar> local;
    tiled_workspace<Scalar>& ws = workspace != nullptr ? *workspace : local;
    const Index num_heads = p.heads.num_heads;
    const weights_mode mode = p.request.weights;
    matrix<Scalar>* lse = p.request.log_sum_exp ? &outputs.log_sum_exp : nullptr;
    ws.masks.build(p.mask, num_heads, p.batch);
    ws.plan.build(p, ws.masks, cfg, has_per_head_terms(p) || is_active_modifier_v<Mod>);
    // The problem of sequence b, head h; for a stacked sequence h is a key/value head and the
    // problem reads `view`, which the caller keeps alive while it uses the problem.
    pack_keys_values(p, cfg, ws);
    auto problem = [&](Index b, Index h, mask_view<Scalar>& view) {
        const Index group = ws.plan.stacked(b);
        if (group == 1) {
            head_problem<Scalar> hp = make_head_problem(p, b, h, ws.masks(b, h), lse);
            const Index at = ws.packed_at[static_cast<std::size_t>(b * p.heads.num_kv_heads +
                                                                   p.heads.kv_head(h))];
            if (at >= 0) {  // the same keys and values, contiguous: the kernels read them there
                if constexpr (packs_keys<Scalar>) {
                    hp.k = ws.packed_k.data() + at * p.heads.dk;
                    hp.k_stride = p.heads.dk;
                }
                hp.v = ws.packed_v.data() + at * p.heads.dv;
                hp.v_stride = p.heads.dv;
            }
            return hp;
        }
        view = ws.masks(b, h * group).stacked();
        return make_stacked_problem(p, b, h, group, view, lse);
    };

    const tile_scratch_key key{p.heads.dk, p.heads.dv, cfg.query_block, cfg.key_block};
    // Each thread readies its state once per call: the scratch is made only when the shapes it
    // depends on changed.
    auto enter = [&](tiled_thread_state<Scalar>& state) {
        if (!(state.made_for == key)) {
            state.tile = make_tile_scratch<Scalar>(p.heads.dk, p.heads.dv, cfg);
            state.made_for = key;
        }
        return nothing_held{};
    };
    auto run = [&](Index index, tiled_thread_state<Scalar>& state) {
        tile_scratch<Scalar>& t = state.tile;
        const tiled_task& task = ws.plan.tasks[static_cast<std::size_t>(index)];
        const Index h_begin = task.h < 0 ? 0 : task.h;
        const Index h_end = task.h < 0 ? num_heads : task.h + 1;
        mask_view<Scalar> view(0, 0);
        for (Index h = h_begin; h < h_end; ++h) {
            const head_problem<Scalar> hp = problem(task.b, h, view);
            if (task.chunk >= 0) {
                const auto keys = ws.plan.chunk_keys(task.chunk, hp.lk);
                online_pass(hp, task.i0, task.nq, keys.first, keys.second, cfg, t, mod);
                ws.plan.store_partial(task.b, h, task.chunk, task.i0, task.nq, t);
                continue;
            }
            online_pass(hp, task.i0, task.nq, 0, hp.lk, cfg, t, mod);
            finalize_block(hp, task.i0, task.nq, t, mod);
            if (mode == weights_mode::averaged)
                weights_pass(hp, task.i0, task.nq, cfg, t,
                             outputs.weights[static_cast<std::size_t>(task.b)], Scalar(num_heads),
                             mod);
            else if (mode == weights_mode::per_head)
                weights_pass(hp, task.i0, task.nq, cfg, t,
                             outputs.weights[static_cast<std::size_t>(task.b * num_heads + h)],
                             Scalar(0), mod);
        }
    };
    parallel_tasks(static_cast<Index>(ws.plan.tasks.size()), cfg.threads, ws.threads, enter, run);

    const auto& merges = ws.plan.merges;
    if (merges.empty()) return;
    auto merge = [&](Index index, tiled_thread_state<Scalar>& state) {
        const auto [b, h] = merges[static_cast<std::size_t>(index)];
        mask_view<Scalar> view(0, 0);
        ws.plan.merge(problem(b, h, view), b, h, cfg.query_block, state.tile, mod);
    };
    parallel_tasks(static_cast<Index>(merges.size()), cfg.threads, ws.threads, enter, merge);
}

}  // namespace detail
}  // namespace mha
