// SPDX-License-Identifier: MIT
// The tiled attention on bfloat16 storage: Q, K and V are Eigen::bfloat16, the scores, the
// online softmax and every accumulation are fp32, the output fp32 (design of the loop:
// detail/tiled/forward.hpp; the products: detail/tiled/block_kernels_bf16.hpp).
//
// It is the fp32 kernel's loop with bf16 products: the same tasks (sequence, head, query block,
// key chunk), the same key blocks visited (positional masks skip whole blocks, boundary blocks
// are masked by selection), the same fp32 max/exp/sum passes (max_per_query,
// exp_shifted_per_query), the same final division with the repair of non-finite columns and the
// same log-sum-exp. What differs:
//   - the query block is packed once per task into the pair-interleaved layout (unscaled; the
//     scale multiplies the fp32 scores); K is copied contiguous and V pair-interleaved once per
//     call for every head that several query blocks read (pack_keys_values_bf16), else per key
//     block;
//   - per key block, P is rounded to bf16 and interleaved, so P·V runs on vdpbf16ps too; its exp
//     is a coarser one, within 6e-6 (the error analysis: docs/performance.md);
//   - the score tiles take the block max of unmasked interior blocks from their registers;
//   - the portable kernel widens Q once per task and K and V once per key block to fp32 and runs
//     the fp32 register tiles, with the same rounding of P; with fewer queries than a packet (a
//     decode step) its tiles read K and V in place and widen them in registers;
//   - the amx kernel, where the CPU and the OS allow it, runs its own online pass
//     (detail/tiled/forward_bf16_amx.hpp) with the same statistics, folds and final division.
// The pass of one task over its key blocks and the final division:
// detail/tiled/online_softmax_bf16.hpp. The call and its per-thread buffers:
// detail/tiled/bf16_problem.hpp; its workspace and once-per-call packing:
// detail/tiled/plan_bf16.hpp.
// Soft-capping and ALiBi change the fp32 scores of a block as in the fp32 kernel
// (modify_key_column, before the mask; such blocks take the separate max pass), a sink joins
// (m, l) in finalize_block_bf16; the amx kernel leaves problems with score terms to the
// vdpbf16ps one.
// The tasks are the fp32 kernel's (tiled_plan): a sequence of few queries and many keys (a
// decode step) is split over key chunks whose partial states are merged in chunk order, except
// on AMX, whose pass takes a task's keys whole.
// Not here yet (refused by the public entry, see multi_head_attention_core for bf16): weights,
// normalisations other than softmax and score modifiers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/bf16_problem.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/forward.hpp>
#include <mha/detail/tiled/forward_bf16_amx.hpp>
#include <mha/detail/tiled/online_softmax_bf16.hpp>
#include <mha/detail/tiled/plan_bf16.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// The problem of sequence b, head h as ws.plan runs it: for a stacked sequence h is a key/value
/// head and the problem reads `view`, which the caller keeps alive while it uses the problem.
/// Query heads g·group … lie d_k apart in the query's column, their outputs d_v apart, their
/// log-sum-exps 1 apart; every one sees what query 0 of head g·group sees.
inline bf16_head_problem planned_bf16_problem(const bf16_attention_problem& p,
                                              const bf16_workspace& ws, Index b, Index h,
                                              mask_view<float>& view, matrix<float>* lse) {
    const Index group = ws.plan.stacked(b);
    if (group == 1) return make_bf16_head_problem(p, b, h, ws.masks(b, h), lse);
    view = ws.masks(b, h * group).stacked();
    bf16_head_problem hp = make_bf16_head_problem(p, b, h * group, view, lse);
    stack_query_heads(hp.f, p.heads.dk, p.heads.dv, group);
    return hp;
}

/// The multi-head tiled attention on bf16 inputs (p validated): out and, when asked, the
/// log-sum-exp (sized H × Nq by the caller). `workspace`, when given, keeps every buffer of the
/// call for the next one; null: a workspace local to the call.
template <bf16_kernel Kernel = default_bf16_kernel>
void tiled_attention_bf16(const bf16_attention_problem& p, matrix<float>* lse,
                          const tiled_settings& settings = {},
                          bf16_workspace* workspace = nullptr) {
#if !defined(MHA_BF16_NATIVE)
    static_assert(Kernel == bf16_kernel::portable,
                  "mha: the native bf16 kernel needs AVX512-BF16 (e.g. -mavx512bf16)");
#endif
    // amx where the CPU and the OS allow it, else its vdpbf16ps kernels (as native).
    tiled_settings cfg = settings;
#if defined(MHA_BF16_AMX)
    // Its online pass has no score terms: such problems take the vdpbf16ps tiles.
    const bool amx = Kernel == bf16_kernel::amx && amx_usable() && !has_score_terms(p);
    // Its own task and key block sizes (block_kernels_amx.hpp says why; the figures:
    // docs/performance.md, "bfloat16 on AMX tiles").
    // Its online pass runs over all keys of a task: no split-KV chunks.
    if (amx) {
        cfg.query_block *= amx_query_blocks_per_task;
        cfg.key_block = std::min(cfg.key_block, amx_key_block);
        cfg.split_chunk = std::numeric_limits<Index>::max() / 4;
    }
#endif
    bf16_workspace local;
    bf16_workspace& ws = workspace != nullptr ? *workspace : local;
    ws.masks.build(p.mask, p.heads.num_heads, p.batch);
    // The fp32 kernel's plan (detail/tiled/plan.hpp): the same tasks, stacked decode steps and
    // split-KV chunks, merged in chunk order, so a long decode runs on every thread and the bits
    // do not depend on their number.
    ws.plan.build(p.heads, p.batch, ws.masks, cfg, has_per_head_terms(p), weights_mode::none);
    bool pack_once = false;
#if defined(MHA_BF16_NATIVE)
    pack_once = uses_dot_pairs(Kernel);
#if defined(MHA_BF16_AMX)
    pack_once = pack_once && !amx;
#endif
#endif
    if (pack_once)
        pack_keys_values_bf16(p, cfg, ws);
    else
        ws.packed_k_at.clear();
    const tile_scratch_key key{p.heads.dk, p.heads.dv, cfg.query_block, cfg.key_block};
    auto enter = [&](bf16_thread_state& state) {
        if (!(state.made_for == key)) {
            make_bf16_scratch<Kernel>(state, p.heads.dk, p.heads.dv, cfg);
            state.made_for = key;
        }
        return nothing_held{};
    };
    auto problem = [&](Index b, Index h, mask_view<float>& view) {
        return planned_bf16_problem(p, ws, b, h, view, lse);
    };
    auto run = [&](Index index, bf16_thread_state& state) {
        const tiled_task& task = ws.plan.tasks[static_cast<std::size_t>(index)];
        mask_view<float> view(0, 0);
        const bf16_head_problem hp = problem(task.b, task.h, view);
        const bool stacked = ws.plan.stacked(task.b) > 1;
        const bf16_packed_head packed =
            stacked ? bf16_packed_head{} : ws.packed_head(p.heads, task.b, task.h);
        const auto [k_lo, k_hi] = task.chunk >= 0 ? ws.plan.chunk_keys(task.chunk, hp.f.lk)
                                                  : std::pair<Index, Index>{0, hp.f.lk};
#if defined(MHA_BF16_AMX)
        if (amx)
            online_pass_bf16_amx(hp, task.i0, task.nq, cfg, state);
        else
#endif
            online_pass_bf16<Kernel>(hp, packed, task.i0, task.nq, k_lo, k_hi, cfg, state);
        if (task.chunk >= 0)
            ws.plan.store_partial(task.b, task.h, task.chunk, task.i0, task.nq, state.t);
        else
            finalize_block_bf16(hp, task.i0, task.nq, state.t);
    };
    parallel_tasks(static_cast<Index>(ws.plan.tasks.size()), cfg.threads, ws.threads, enter, run);

    const auto& merges = ws.plan.merges;
    if (merges.empty()) return;
    auto merge = [&](Index index, bf16_thread_state& state) {
        const auto [b, h] = merges[static_cast<std::size_t>(index)];
        mask_view<float> view(0, 0);
        const bf16_head_problem hp = problem(b, h, view);
        ws.plan.merge(b, h, hp.f.lq, cfg.query_block, state.t,
                      [&](Index i0, Index nq) { finalize_block_bf16(hp, i0, nq, state.t); });
    };
    parallel_tasks(static_cast<Index>(merges.size()), cfg.threads, ws.threads, enter, merge);
}

}  // namespace detail
}  // namespace mha
