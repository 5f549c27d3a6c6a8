// SPDX-License-Identifier: MIT
// Where the layers place rotary positions on a packed batch: shared by the fp32 layer's forward
// and backward and by the bf16 layer.
#pragma once

#include <algorithm>

#include <mha/batch.hpp>
#include <mha/rotary.hpp>

namespace mha {
namespace detail {

/// The layer's rotary positions on a packed batch: in each sequence key j is at position j and
/// query i at Lk − Lq + i (the queries are the last tokens, as with bottom-right causal
/// alignment; for self-attention simply i). `transposed`: apply the transpose (the backward).
///   q : (H·d_k) × Nq,   k : (H_kv·d_k) × Nk
template <class Scalar, class DQ, class DK>
void rotate_packed(const rotary_embedding<Scalar>& rotary, DQ&& q, DK&& k,
                   const packed_batch& batch, Index num_heads, Index num_kv_heads,
                   bool transposed = false) {
    for (Index b = 0; b < batch.size(); ++b) {
        const Index lq = batch.query_length(b), lk = batch.key_length(b);
        const Index first_query = std::max<Index>(lk - lq, 0);
        auto qs = q.middleCols(batch.query_offset(b), lq);
        auto ks = k.middleCols(batch.key_offset(b), lk);
        if (transposed) {
            if (lq > 0) rotary.apply_transposed(qs, num_heads, first_query);
            if (lk > 0) rotary.apply_transposed(ks, num_kv_heads, 0);
        } else {
            if (lq > 0) rotary.apply(qs, num_heads, first_query);
            if (lk > 0) rotary.apply(ks, num_kv_heads, 0);
        }
    }
}

}  // namespace detail
}  // namespace mha
