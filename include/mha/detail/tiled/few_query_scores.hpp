// SPDX-License-Identifier: MIT
// The score kernel of the tiled attention for a block with fewer queries than a packet (a decode
// step: one query per head, or the 4–8 query heads of a group stacked on their shared key/value
// head). The register tiles of detail/tiled/block_kernels.hpp put queries in the lanes, which
// would leave most lanes empty; Eigen's GEMM, used here before, packs the block's keys on every
// call, a second pass over K when a decode step is bound by reading K and V from memory. This
// kernel puts d_k in the lanes instead and reads every key column once, in place.
#pragma once

#include <algorithm>

#include <mha/core.hpp>
#include <mha/detail/tiled/block_kernels.hpp>

namespace mha {
namespace detail {

/// Keys per tile of few_query_scores: independent FMA chains (two FMA pipes with 4 cycles of
/// latency need 8), and the tile's key columns stay in L1 while each query reads them again.
inline constexpr int few_query_score_keys = 8;

/// `Keys` keys of few_query_scores: st(c, j + r) for every query c < nq and r < Keys.
template <class Scalar, int Keys, class KStorage>
MHA_ALWAYS_INLINE void few_query_score_tile(const Scalar* q, Index q_stride, Index nq, Index dk,
                                            Scalar scale, const KStorage* k, Index k_stride,
                                            Scalar* st, Index ld) {
    using ops = typename block_kernel_traits<Scalar>::ops;
    using packet = typename ops::packet;
    constexpr Index w = block_kernel_traits<Scalar>::width;
    const Index packed = dk / w * w;
    for (Index c = 0; c < nq; ++c) {
        const Scalar* qc = q + c * q_stride;
        packet acc[Keys];
        for (int r = 0; r < Keys; ++r)
            acc[r] = ops::broadcast(Scalar(0));
        for (Index d = 0; d < packed; d += w) {
            const packet x = ops::load(qc + d);
            for (int r = 0; r < Keys; ++r)
                acc[r] = ops::mul_add(x, load_packet<Scalar>(k + r * k_stride + d), acc[r]);
        }
        for (int r = 0; r < Keys; ++r) {
            Scalar s = ops::sum(acc[r]);
            for (Index d = packed; d < dk; ++d)
                s += qc[d] * Scalar(k[r * k_stride + d]);
            st[r * ld + c] = scale * s;
        }
    }
    for (int r = 0; r < Keys; ++r)
        std::fill(st + r * ld + nq, st + (r + 1) * ld, Scalar(0));
}

/// st(c, j) = scale·Σ_d q(d, c)·K(d, j) for queries c < nq and keys j < nk, with query c at
/// q + c·q_stride, key j at k + j·k_stride (both d_k contiguous) and st(c, j) at st[j·ld + c]
/// (the transposed score layout of transposed_scores); rows nq..ld of st are set to 0 (the
/// query padding, which the softmax passes read).
/// Each score is a sum of d_k products in some order, rounded once more by the scale: the
/// bound of any dot product of length d_k + 1. K stored as KStorage: Scalar, or bf16 for float
/// (widened in registers: a decode step reads a bf16 cache once, in place).
template <class Scalar, class KStorage = Scalar>
void few_query_scores(const Scalar* q, Index q_stride, Index nq, Index dk, Scalar scale,
                      const KStorage* k, Index k_stride, Index nk, Scalar* st, Index ld) {
    constexpr Index keys = few_query_score_keys;
    for_each_key_tile<keys>(0, nk, [&](auto n_keys, Index j) MHA_ALWAYS_INLINE_LAMBDA {
        // The next tile's keys, asked for while this one is computed (see prefetch_columns).
        prefetch_columns(k, k_stride, dk, j + keys, j + 2 * keys, nk);
        few_query_score_tile<Scalar, decltype(n_keys)::value, KStorage>(
            q, q_stride, nq, dk, scale, k + j * k_stride, k_stride, st + j * ld, ld);
    });
}

}  // namespace detail
}  // namespace mha
