// SPDX-License-Identifier: MIT
// The bf16 GEMM of detail/gemm_bf16.hpp on AMX tiles (Intel's Advanced Matrix Extensions, from
// Sapphire Rapids on): C (m×n, fp32, column-major) = or += A·B with TDPBF16PS, which multiplies a
// 16 × 32 bf16 tile by a 32 × 16 one into a 16 × 16 fp32 tile: 8192 multiply-adds per
// instruction, about 13 times the fp32 FMA rate of the same core (3.0 TFLOP/s against 231 GFLOP/s
// on one core of a 2-vCPU Xeon, measured with a 4-accumulator loop), and 26 times vdpbf16ps,
// which on that core runs at half the FMA rate.
//
// When it is compiled in and usable: detail/amx.hpp. Elsewhere gemm_bf16 runs its vdpbf16ps path.
//
// Orientation. A tile's rows are contiguous in memory and C is column-major, so the tiles hold
// Cᵀ: tile row r is column j0 + r of C (16 of its rows i0 ... i0 + 15), and the product is
// Cᵀ = Bᵀ·Aᵀ. The first operand, Bᵀ, is 16 columns of B along k: a column of B is contiguous in
// a column-major B; it is staged per column block into rows of k rounded up to 32, zero-filled
// (any strides, and no read past B's end). The second operand needs k in pairs (A(i, 2q),
// A(i, 2q+1)) for 16 rows i: the pair panels of detail/gemm_bf16_packing.hpp, read in place.
//
// Register blocking: four accumulator tiles (32 columns × 32 rows of C), two tiles of Bᵀ and two
// of A per 32 elements of k; 4 TDPBF16PS per 4 tile loads. Edges of m and n go through a 16 × 16
// scratch tile (zero beyond the edge), so no tile reads or writes outside C.
//
// Determinism and rounding. Every element of C is its start (C, the bias or 0) plus the chunks of
// 32 products in k order, whatever thread computes it: threads take whole column blocks of the
// grid of detail/gemm_bf16_packing.hpp. The products are exact in fp32, the sums round to
// nearest-even (subnormals read and written as zero, the instruction's fixed behaviour), so the
// bound of gemm_bf16, γ_{k+1}·Σ|a||b|, holds; the bits may differ from the vdpbf16ps path's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <mha/core.hpp>
#include <mha/detail/amx.hpp>
#include <mha/detail/gemm_bf16_packing.hpp>

namespace mha {
namespace detail {

#if defined(MHA_BF16_AMX)

/// Elements of k per tile row of Bᵀ (32 bf16 = 64 bytes); k is rounded up to a multiple of it.
inline constexpr Index amx_k_chunk = 32;

/// staged ← Bᵀ for the columns [j0, j1) of B: row r holds B(0 : k, j0 + r), then zeros up to kp;
/// rows from j1 − j0 up to `rows` are zero.
inline void stage_bf16_amx_b(Index k, Index kp, bf16_operand b, Index j0, Index j1, Index rows,
                             std::uint16_t* staged) {
    for (Index r = 0; r < rows; ++r) {
        std::uint16_t* dst = staged + r * kp;
        Index q = 0;
        if (j0 + r < j1) {
            const Eigen::bfloat16* col = b.data + (j0 + r) * b.col_stride;
            if (b.row_stride == 1) {
                std::memcpy(dst, col, static_cast<std::size_t>(k) * sizeof(std::uint16_t));
                q = k;
            } else {
                for (; q < k; ++q)
                    dst[q] = bf16_bits(col[q * b.row_stride]);
            }
        }
        std::fill(dst + q, dst + kp, std::uint16_t(0));
    }
}

// The tile instructions name their tile by a literal (GCC's intrinsics are macros that paste it
// into the assembly), so the helpers below hand back where a tile loads from or stores to, and the
// caller issues the instruction.

/// Where a tile loads the 16 × 16 block of Cᵀ at column j (tile rows) and row i (tile columns) of
/// C from, of which `cols` × `rows` lie inside C: C itself when the block is whole (row stride
/// ldc floats), else `scratch` (16 floats per row) holding the part inside and zeros.
inline const float* c_tile_source(const float* c, Index ldc, Index cols, Index rows, float* scratch,
                                  Index& stride_bytes) {
    if (cols == 16 && rows == 16) {
        stride_bytes = ldc * static_cast<Index>(sizeof(float));
        return c;
    }
    std::fill(scratch, scratch + 256, 0.0f);
    for (Index j = 0; j < cols; ++j)
        std::copy(c + j * ldc, c + j * ldc + rows, scratch + j * 16);
    stride_bytes = 64;
    return scratch;
}

/// Where a tile starts the 16 × 16 block of Cᵀ at rows i0 ... of C, `rows` of them inside C, when
/// the product does not accumulate into C: every tile row (a column of C) starts as
/// bias(i0 : i0 + 16), or 0 without a bias, so the tile loads one row with a row stride of 0. The
/// bias itself when the 16 rows are inside C, else `scratch` (the rows inside, then zeros).
inline const float* start_tile_row(const float* bias, Index i0, Index rows, float* scratch) {
    if (bias != nullptr && rows == 16) return bias + i0;
    std::fill(scratch, scratch + 16, 0.0f);
    if (bias != nullptr) std::copy(bias + i0, bias + i0 + rows, scratch);
    return scratch;
}

/// Where a tile stores that block: C itself when whole, else `scratch`, which
/// finish_c_tile then copies into C's part of the block.
inline float* c_tile_target(float* c, Index ldc, Index cols, Index rows, float* scratch,
                            Index& stride_bytes) {
    const bool whole = cols == 16 && rows == 16;
    stride_bytes = whole ? ldc * static_cast<Index>(sizeof(float)) : 64;
    return whole ? c : scratch;
}

inline void finish_c_tile(float* c, Index ldc, Index cols, Index rows, const float* scratch) {
    if (cols == 16 && rows == 16) return;
    for (Index j = 0; j < cols; ++j)
        std::copy(scratch + j * 16, scratch + j * 16 + rows, c + j * ldc);
}

/// The AMX path of gemm_bf16 (same contract; call only when amx_usable()).
inline void gemm_bf16_amx(Index m, Index n, Index k, bf16_operand a, bf16_operand b, float* c,
                          Index ldc, bool accumulate, const float* bias, bf16_gemm_buffers& buffers,
                          int threads) {
    constexpr Index mr = bf16_gemm_sizes::mr;
    const Index kp = (k + amx_k_chunk - 1) / amx_k_chunk * amx_k_chunk;
    const Index pair_stride = kp / 2, panels = (m + mr - 1) / mr;
    grow(buffers.packed_a, panels * pair_stride * mr * 2);
    pack_bf16_gemm_a(m, k, a, buffers.packed_a.data(), pair_stride);
    const std::uint16_t* pa = buffers.packed_a.data();
    const auto clamp16 = [](Index v) { return std::max<Index>(0, std::min<Index>(16, v)); };
    bf16_gemm_over_columns(n, threads, buffers, [&](Index j0, Index j1, auto& own) {
        const Index rows = (j1 - j0 + 31) / 32 * 32;  // whole pairs of 16-row tiles
        grow(own.packed_b, rows * kp);
        std::uint16_t* staged = own.packed_b.data();  // rows × kp: Bᵀ
        stage_bf16_amx_b(k, kp, b, j0, j1, rows, staged);
        const amx_tile_scope tiles;
        alignas(64) float scratch[256];
        // Rows of C 32 at a time (two 16-word halves of a 64-row panel), columns 32 at a time:
        // the A pieces of a row step (32 rows × kp) stay in L1/L2 while the columns sweep.
        for (Index i0 = 0; i0 < m; i0 += 32) {
            const std::uint16_t* ap = pa + ((i0 / mr) * pair_stride * mr + i0 % mr) * 2;
            const Index rows0 = clamp16(m - i0), rows1 = clamp16(m - i0 - 16);
            for (Index jt = j0; jt < j1; jt += 32) {
                const std::uint16_t* bt = staged + (jt - j0) * kp;
                const Index cols0 = clamp16(j1 - jt), cols1 = clamp16(j1 - jt - 16);
                float* c00 = c + jt * ldc + i0;
                float* c01 = c00 + 16;
                float* c10 = c00 + 16 * ldc;
                float* c11 = c10 + 16;
                Index stride = 0;
                if (accumulate) {
                    _tile_loadd(0, c_tile_source(c00, ldc, cols0, rows0, scratch, stride), stride);
                    _tile_loadd(1, c_tile_source(c01, ldc, cols0, rows1, scratch, stride), stride);
                    _tile_loadd(2, c_tile_source(c10, ldc, cols1, rows0, scratch, stride), stride);
                    _tile_loadd(3, c_tile_source(c11, ldc, cols1, rows1, scratch, stride), stride);
                } else {
                    // The bias (or 0) as every column's start: no pass over C before the
                    // products, and the same sums in the same order as starting from C.
                    _tile_loadd(0, start_tile_row(bias, i0, rows0, scratch), 0);
                    _tile_loadd(1, start_tile_row(bias, i0 + 16, rows1, scratch), 0);
                    _tile_loadd(2, start_tile_row(bias, i0, rows0, scratch), 0);
                    _tile_loadd(3, start_tile_row(bias, i0 + 16, rows1, scratch), 0);
                }
                for (Index q = 0; q < kp; q += amx_k_chunk) {
                    const std::uint16_t* aq = ap + (q / 2) * mr * 2;
                    _tile_loadd(4, bt + q, kp * 2);
                    _tile_loadd(5, bt + 16 * kp + q, kp * 2);
                    _tile_loadd(6, aq, mr * 4);
                    _tile_loadd(7, aq + 32, mr * 4);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, c_tile_target(c00, ldc, cols0, rows0, scratch, stride), stride);
                finish_c_tile(c00, ldc, cols0, rows0, scratch);
                _tile_stored(1, c_tile_target(c01, ldc, cols0, rows1, scratch, stride), stride);
                finish_c_tile(c01, ldc, cols0, rows1, scratch);
                _tile_stored(2, c_tile_target(c10, ldc, cols1, rows0, scratch, stride), stride);
                finish_c_tile(c10, ldc, cols1, rows0, scratch);
                _tile_stored(3, c_tile_target(c11, ldc, cols1, rows1, scratch, stride), stride);
                finish_c_tile(c11, ldc, cols1, rows1, scratch);
            }
        }
    });
}

#endif  // MHA_BF16_AMX

}  // namespace detail
}  // namespace mha
