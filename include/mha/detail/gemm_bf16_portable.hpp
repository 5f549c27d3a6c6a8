// SPDX-License-Identifier: MIT
// The portable path of gemm_bf16 (design: detail/gemm_bf16.hpp): for CPUs without AVX512-BF16,
// the operands widened to fp32 (exactly: a bf16 is the upper half of an fp32) and multiplied on
// the fp32 projections' register tiles and blocking (detail/tiled_product.hpp).
#pragma once

#include <algorithm>

#include <mha/core.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/gemm_bf16_packing.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled_product.hpp>

namespace mha {
namespace detail {

/// C(r, 0 : N) += A(r, :)·B(:, 0 : N) for the rows r of one row panel of A (bf16, P rows ×
/// all of k, column q at panel + q·P), B widened to fp32 (k × N, column-major): the value tile
/// with the panel's packets widened in registers as it reads them, one chain per output in
/// increasing q from C's value (the bits of the tile over a widened copy). `rows` ≤ P:
/// a short last panel computes its zero rows in a scratch copy of C and stores only its own.
template <int N>
void accumulate_row_panel_bf16(const Eigen::bfloat16* panel, Index rows, Index k, const float* b,
                               float* c, Index ldc) {
    constexpr Index w = block_kernel_traits<float>::width;
    constexpr Index p_rows = product_panel_rows<float>;
    constexpr int vp = static_cast<int>(p_rows / w);
    alignas(64) float scratch[N * p_rows];
    float* to = c;
    Index ld = ldc;
    if (rows < p_rows) {
        for (int j = 0; j < N; ++j)
            std::copy(c + j * ldc, c + j * ldc + rows, scratch + j * p_rows);
        to = scratch;
        ld = p_rows;
    }
    value_micro_tile<float, vp, N, operand_order::col_major, Eigen::bfloat16>(panel, p_rows, k, b,
                                                                              k, to, ld);
    if (to == scratch)
        for (int j = 0; j < N; ++j)
            std::copy(scratch + j * p_rows, scratch + j * p_rows + rows, c + j * ldc);
}

/// The portable path for up to value_queries columns over A's row panels packed once (a decode
/// step's projection): C started from C, the bias or 0, then each panel widened in registers as
/// it is multiplied, the panels split over threads (each output is computed alike whoever
/// computes it). Widening into panels on the stack and reading them back, as the path does
/// without packed panels, cost about as much as the product.
inline void gemm_bf16_portable_narrow(Index m, Index n, Index k, const Eigen::bfloat16* row_panels,
                                      bf16_operand b, float* c, Index ldc, bool accumulate,
                                      const float* bias, bf16_gemm_buffers& buffers, int threads) {
    constexpr Index panel = product_panel_rows<float>;
    constexpr int narrow = static_cast<int>(block_kernel_traits<float>::value_queries);
    if (buffers.per_thread.empty()) buffers.per_thread.resize(1);
    auto& wide_b = buffers.per_thread.front().wide_b;  // read by every thread, written first
    grow(wide_b, k * n);
    float* wb = wide_b.data();  // k × n, column-major
    for (Index j = 0; j < n; ++j)
        widen_bf16_strided(b.data + j * b.col_stride, b.row_stride, k, wb + j * k);
    if (!accumulate) start_columns(m, 0, n, bias, c, ldc);
    // Parts of at least 1024 rows, as the native narrow product's: below that a thread's start
    // costs more than its share.
    const Index panels = (m + panel - 1) / panel;
    const int nt = static_cast<int>(
        std::max<Index>(1, std::min<Index>(thread_count(threads), (m + 1023) / 1024)));
    parallel_parts(nt, [&](int part, int) {
        for (Index p = panels * part / nt; p < panels * (part + 1) / nt; ++p) {
            const Index r0 = p * panel;
            with_tile_width<narrow>(n, [&](auto width) {
                accumulate_row_panel_bf16<decltype(width)::value>(
                    row_panels + r0 * k, std::min(panel, m - r0), k, wb, c + r0, ldc);
            });
        }
    });
}

/// The portable path of gemm_bf16: blocks of B and slices of A widened to fp32, the fp32
/// register tiles. `row_panels`: A already in bf16 row panels (bf16_packed_matrix), or null.
inline void gemm_bf16_portable(Index m, Index n, Index k, bf16_operand a, bf16_operand b, float* c,
                               Index ldc, bool accumulate, const float* bias,
                               bf16_gemm_buffers& buffers, int threads,
                               const Eigen::bfloat16* row_panels = nullptr) {
    constexpr Index panel = product_panel_rows<float>;
    if (row_panels != nullptr && n <= block_kernel_traits<float>::value_queries) {
        gemm_bf16_portable_narrow(m, n, k, row_panels, b, c, ldc, accumulate, bias, buffers,
                                  threads);
        return;
    }
    // A's column q, rows [e, e + count), widened into a panel.
    auto widen_rows = [&](Index q, Index e, Index count, float* to) MHA_ALWAYS_INLINE_LAMBDA {
        widen_bf16_strided(a.data + e * a.row_stride + q * a.col_stride, a.row_stride, count, to);
    };
    // Where more than one tile of columns reads A, all of it is widened once into the fp32
    // panels (P rows over all of k, P·k apart), read contiguous (from row panels packed once:
    // one run, the layout is the same); a few columns without packed panels widen each slice
    // into panels on the stack instead, as the fp32 product copies its weight: writing all of A
    // in fp32 and reading it back made the layer's decoding step at E = 4096 1.25x slower
    // (Zen 3), and the slices, read a column stride apart, made a prefill's bf16 layer 2 %
    // slower.
    float* wide_a = nullptr;
    if (n > block_kernel_traits<float>::value_queries) {
        grow(buffers.wide_a, (m + panel - 1) / panel * panel * k);
        wide_a = buffers.wide_a.data();
        if (row_panels != nullptr)  // the same layout already: one contiguous run
            widen_bf16(row_panels, (m + panel - 1) / panel * panel * k, wide_a);
        else
            pack_row_panels(m, k, panel * k, wide_a, widen_rows);
    }
    bf16_gemm_over_columns(n, threads, buffers, [&](Index j0, Index j1, auto& own) {
        const Index w = j1 - j0;
        grow(own.wide_b, k * w);
        float* wb = own.wide_b.data();  // k × w, column-major
        for (Index j = 0; j < w; ++j)
            widen_bf16_strided(b.data + (j0 + j) * b.col_stride, b.row_stride, k, wb + j * k);
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
