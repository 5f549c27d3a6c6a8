// SPDX-License-Identifier: MIT
// The buffers the bf16 tiled kernel (detail/tiled/forward_bf16.hpp) keeps between calls: its
// plan, which is the fp32 kernel's (detail/tiled/plan.hpp: tasks, stacked decode steps, split-KV
// partials; it depends only on the shapes, the masks and the settings, never on the thread
// count), and the native kernel's K and V packed once per call for the heads that several query
// blocks read.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/aligned_vector.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/bf16_problem.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/detail/tiled/plan.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// K and V of one (sequence, key/value head) packed for the native kernel once per call
/// (bf16_workspace::pack_keys_values): K contiguous (key j at k + j·d_k), V pair-interleaved
/// from key 0 (pack_value_pairs over all keys, row stride bf16_padded(d_v)). Null pointers: the
/// kernel copies and packs each key block itself.
struct bf16_packed_head {
    const Eigen::bfloat16* k = nullptr;
    const std::uint16_t* v = nullptr;
};

/// The buffers of a bf16 call (see tiled_workspace); they only grow, so a call of a shape the
/// workspace has served allocates nothing.
struct bf16_workspace {
    mask_views<float> masks;  // refer to the mask of the current call; stale between calls
    tiled_plan<float> plan;   // the tasks and split-KV partials, as the fp32 kernel's
    std::vector<bf16_thread_state> threads;
    // The native kernel's K and V of the (sequence, key/value head) pairs that more than one
    // query block reads, packed once per call: before, each query block copied K and packed V
    // again (16 times per head at L = 2048 with blocks of 128; 5–8 % of the call, profiled).
    // Offsets per b·num_kv_heads + g, −1 where not packed; the memory is that of K and V.
    // Not zero-filled when they grow: the packing writes every element of an entry.
    uninitialized_aligned_vector<Eigen::bfloat16> packed_k;
    uninitialized_aligned_vector<std::uint16_t> packed_v;
    std::vector<Index> packed_k_at, packed_v_at;

    bf16_packed_head packed_head(const head_layout& heads, Index b, Index h) const {
        const std::size_t e = static_cast<std::size_t>(b * heads.num_kv_heads + heads.kv_head(h));
        if (e >= packed_k_at.size() || packed_k_at[e] < 0) return {};
        return {packed_k.data() + packed_k_at[e], packed_v.data() + packed_v_at[e]};
    }
};

/// Packs K and V of every (sequence, key/value head) whose sequence has more than one query
/// block into ws (see bf16_workspace), on up to `threads` threads.
inline void pack_keys_values_bf16(const bf16_attention_problem& p, const tiled_settings& cfg,
                                  bf16_workspace& ws) {
    const head_layout& heads = p.heads;
    const Index dk = heads.dk, dv = heads.dv, dvp = bf16_padded(dv);
    const Index entries = p.batch.size() * heads.num_kv_heads;
    ws.packed_k_at.assign(static_cast<std::size_t>(entries), -1);
    ws.packed_v_at.assign(static_cast<std::size_t>(entries), -1);
    Index k_size = 0, v_size = 0;
    for (Index b = 0; b < p.batch.size(); ++b) {
        if (p.batch.query_length(b) <= cfg.query_block) continue;
        const Index lk = p.batch.key_length(b);
        for (Index g = 0; g < heads.num_kv_heads; ++g) {
            const auto e = static_cast<std::size_t>(b * heads.num_kv_heads + g);
            ws.packed_k_at[e] = k_size;
            ws.packed_v_at[e] = v_size;
            k_size += lk * dk;
            v_size += (lk + 1) / 2 * dvp * 2;
        }
    }
    if (ws.packed_k.size() < static_cast<std::size_t>(k_size))
        ws.packed_k.resize(static_cast<std::size_t>(k_size));
    if (ws.packed_v.size() < static_cast<std::size_t>(v_size))
        ws.packed_v.resize(static_cast<std::size_t>(v_size));
    const Index group = heads.num_heads / heads.num_kv_heads;
    for_each_listed(ws.packed_k_at, heads.num_kv_heads, cfg.threads, [&](Index b, Index g) {
        const auto e = static_cast<std::size_t>(b * heads.num_kv_heads + g);
        // Any query head of the group locates the group's keys and values.
        const bf16_head_problem hp =
            make_bf16_head_problem(p, b, g * group, ws.masks(b, g * group), nullptr);
        Eigen::bfloat16* k = ws.packed_k.data() + ws.packed_k_at[e];
        for (Index j = 0; j < hp.f.lk; ++j)
            std::copy_n(hp.k + j * hp.f.k_stride, dk, k + j * dk);
        pack_value_pairs(hp.v, hp.f.v_stride, dv, hp.f.lk, dvp,
                         ws.packed_v.data() + ws.packed_v_at[e]);
    });
}

}  // namespace detail
}  // namespace mha
