// SPDX-License-Identifier: MIT
// The portable path of gemm_bf16 (design: detail/gemm_bf16.hpp): for CPUs without AVX512-BF16,
// the operands widened to fp32 (exactly: a bf16 is the upper half of an fp32) and multiplied on
// the fp32 projections' register tiles and blocking (detail/tiled_product.hpp).
#pragma once

#include <algorithm>

#include <mha/core.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/gemm_bf16_packing.hpp>
#include <mha/detail/tiled_product.hpp>

namespace mha {
namespace detail {

/// The portable path of gemm_bf16: blocks of B and slices of A widened to fp32, the fp32
/// register tiles.
inline void gemm_bf16_portable(Index m, Index n, Index k, bf16_operand a, bf16_operand b, float* c,
                               Index ldc, bool accumulate, const float* bias,
                               bf16_gemm_buffers& buffers, int threads) {
    // A's column q, rows [e, e + count), widened into a panel.
    auto widen_rows = [&](Index q, Index e, Index count, float* to) MHA_ALWAYS_INLINE_LAMBDA {
        if (a.row_stride == 1) {
            widen_bf16(a.data + q * a.col_stride + e, count, to);
            return;
        }
        for (Index i = 0; i < count; ++i)
            to[i] = bf16_to_float(a.data[(e + i) * a.row_stride + q * a.col_stride]);
    };
    // Where more than one tile of columns reads A, all of it is widened once into the fp32
    // panels (P rows over all of k, P·k apart), read contiguous; a decode step's few columns
    // widen each slice into panels on the stack instead, as the fp32 product copies its weight:
    // writing all of A in fp32 and reading it back made the layer's decoding step at E = 4096
    // 1.25x slower (Zen 3), and the slices, read a column stride apart, made a prefill's bf16
    // layer 2 % slower.
    float* wide_a = nullptr;
    if (n > block_kernel_traits<float>::value_queries) {
        constexpr Index panel = product_panel_rows<float>;
        grow(buffers.wide_a, (m + panel - 1) / panel * panel * k);
        wide_a = buffers.wide_a.data();
        pack_row_panels(m, k, panel * k, wide_a, widen_rows);
    }
    bf16_gemm_over_columns(n, threads, buffers, [&](Index j0, Index j1, auto& own) {
        const Index w = j1 - j0;
        grow(own.wide_b, k * w);
        float* wb = own.wide_b.data();  // k × w, column-major
        for (Index j = 0; j < w; ++j) {
            if (b.row_stride == 1) {
                widen_bf16(b.data + (j0 + j) * b.col_stride, k, wb + j * k);
                continue;
            }
            for (Index q = 0; q < k; ++q)
                wb[j * k + q] = bf16_to_float(b.data[q * b.row_stride + (j0 + j) * b.col_stride]);
        }
        if (!accumulate) start_columns(m, j0, j1, bias, c, ldc);
        // The fp32 projections' register tiles and blocking (detail/tiled_product.hpp): 64 rows
        // of A at a time, k in chunks, each entry one chain in increasing k from its starting
        // value, whatever the column block, thread or path below.
        if (wide_a != nullptr) {
            for (Index e = 0; e < m; e += tiled_product_rows)
                accumulate_from_panels(wide_a, k, e, std::min(tiled_product_rows, m - e), wb, k, w,
                                       c + j0 * ldc + e, ldc);
            return;
        }
        for (Index e = 0; e < m; e += tiled_product_rows)
            packed_row_block(
                std::min(tiled_product_rows, m - e), k,
                [&](Index q, Index i, Index count, float* to)
                    MHA_ALWAYS_INLINE_LAMBDA { widen_rows(q, e + i, count, to); },
                wb, k, w, c + j0 * ldc + e, ldc);
    });
}

}  // namespace detail
}  // namespace mha
