// SPDX-License-Identifier: MIT
// FLOP counts behind the benchmarks' GFLOP/s counters, in one place so that every benchmark
// family (and the README quoting them) counts the same way.
//
// Formulas, from DESIGN.md "FLOP counts" (self-attention, batch B, length L, model width D):
//   GEMM m×k times k×n         2·m·n·k          (one multiply and one add per term)
//   projections                8·B·L·D²         (fused QKV: 3 GEMMs' worth, 6·B·L·D²;
//                                                output projection: 2·B·L·D²)
//   attention core             4·B·L²·D         (Kᵀ·Q: 2·B·L²·D summed over heads; P·V: the same)
//   causal attention core      2·B·D·L·(L+1)    (only the L·(L+1)/2 allowed query-key pairs)
//   core, Lq queries, Lk keys  4·B·Lq·Lk·D      (decode: Lq = 1)
// Softmax, masking, scaling and biases are not counted. The causal count is what a kernel that
// skips masked blocks must do; a kernel that computes the full L×L scores and then masks them
// does twice that work, so its GFLOP/s reads as half of what the hardware delivered.
#pragma once

namespace mha_bench {

/// C (m×n) = A (m×k) · B (k×n).
constexpr double gemm_flops(double m, double n, double k) {
    return 2.0 * m * n * k;
}

/// Fused Q/K/V projection plus output projection.
constexpr double projection_flops(double batch, double length, double d_model) {
    return 8.0 * batch * length * d_model * d_model;
}

/// Scores and weighted sum of values over all heads (independent of the head count).
constexpr double attention_core_flops(double batch, double length, double d_model, bool causal) {
    return causal ? 2.0 * batch * d_model * length * (length + 1.0)
                  : 4.0 * batch * length * length * d_model;
}

/// Backward of the attention core: 2.5 times attention_core_flops. Per allowed (query, key)
/// pair and head dimension the forward runs two products (S = Kᵀ·Q and O = V·P); the backward
/// needs five: S again (recomputed from Q and K, as nothing L × L is kept), dV = dO·Pᵀ,
/// dP = Vᵀ·dO, dQ = K·dS and dK = Q·dSᵀ, i.e. 5/2 of the forward's count. The exp, D = dO·O
/// and dS = P ∘ (dP − D) are element-wise and not counted, as softmax is not in the forward.
/// The library's tiled backward runs exactly these five products per visited block pair in one
/// pass (its dQ accumulators add O(d·L) more, not counted), so its GFLOP/s is its actual
/// throughput, comparable with BM_gemm_roofline's.
constexpr double attention_backward_flops(double batch, double length, double d_model,
                                          bool causal) {
    return 2.5 * attention_core_flops(batch, length, d_model, causal);
}

/// Attention core of lq queries over lk keys per sequence, no mask (e.g. one decode step: lq = 1).
constexpr double cross_attention_core_flops(double batch, double lq, double lk, double d_model) {
    return 4.0 * batch * lq * lk * d_model;
}

/// The whole layer: projections plus the attention core.
constexpr double forward_flops(double batch, double length, double d_model, bool causal) {
    return projection_flops(batch, length, d_model) +
           attention_core_flops(batch, length, d_model, causal);
}

/// The whole layer's backward: each projection y = W·x + b has two products in its backward
/// (dW = dY·xᵀ and dx = Wᵀ·dY, each the forward's count; db is a row sum, not counted), so
/// twice projection_flops, plus the attention core's backward.
constexpr double layer_backward_flops(double batch, double length, double d_model, bool causal) {
    return 2.0 * projection_flops(batch, length, d_model) +
           attention_backward_flops(batch, length, d_model, causal);
}

}  // namespace mha_bench
