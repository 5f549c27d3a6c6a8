// SPDX-License-Identifier: MIT
// A GEMM on bfloat16 operands with fp32 accumulation: C (m×n, fp32, column-major) = or += A·B,
// A m×k and B k×n in Eigen::bfloat16. Eigen's own product on bfloat16 converts every element in
// its inner loop; this one packs instead.
//
// Three implementations, chosen like the bf16 block kernels (detail/tiled/block_kernels_bf16.hpp,
// whose bf16_kernel selects them):
//   amx      (AMX-TILE and AMX-BF16 compiled in, and granted at run time): tiles of TDPBF16PS,
//            detail/gemm_bf16_amx.hpp; otherwise, and for the narrow products below, native.
//   native   (__AVX512BF16__): register tiles of vdpbf16ps. The instruction pairs adjacent
//            elements of the reduction dimension (lane i gets a[2i]·b[2i] + a[2i+1]·b[2i+1]), so
//            A is packed once per call into the pair panels of detail/gemm_bf16_packing.hpp
//            (64 rows, each row's pairs (A(i, 2p), A(i, 2p+1)) as 32-bit words): four zmm loads.
//            B is packed per k-block and column block into panels of 6 columns, its words
//            (B(2p, j), B(2p+1, j)) in the order the tile broadcasts them. An odd k gets a zero
//            partner in both.
//            Up to bf16_narrow_columns columns of B (a decode step's projection) the native
//            path reads A in place instead (column-major A only): packing A would be a pass
//            over every weight for a few columns of work; two columns of A are interleaved in
//            registers into the same words, so the result is the same bits (narrow_rows_bf16).
//   portable (elsewhere, or forced by the tests): A and column blocks of B widened to fp32
//            (exactly: a bf16 is the upper half of an fp32), A into the fp32 projections'
//            panels (a slice at a time on the stack for a few columns), then their register
//            tiles and blocking (accumulate_packed_product, detail/tiled_product.hpp), which
//            were 1.11-1.17x faster than Eigen's GEMM for the bf16 layer on an AVX2 Zen 3 with A
//            read in place.
//
// Register tile (native): 4 zmm of 16 rows × 6 columns, 24 accumulators of the 32 registers;
// per pair of k, 4 loads and 6 broadcasts from memory (vpbroadcastd, one load each) feed 24 dot
// products: 10 loads per 12 cycles of the two dot-product pipes, below the two loads per cycle
// the core sustains. Blocking: k-blocks of kc = 512 (even, so that a pair never
// straddles two blocks), row blocks of mc = 256 (256 × 512 bf16 = 256 KiB of packed A, an L2's
// share), column blocks of nc = 192 (the B block, 192 KiB at most, also in L2; a 6-column panel
// of it, 6 KiB, in L1 while the tile sweeps the row block).
//
// Determinism. Every element of C is the sum over k-blocks in order, and within a block over
// the pairs in order, started from C or 0, whatever tile or thread computes it; threads take
// whole column blocks of a grid fixed by n alone (as detail/gemm.hpp splits by columns), and
// the portable path runs every block with the blocking of the whole product. The result is the
// same bits for any thread count.
//
// Rounding: a product of two bf16 is exact in fp32; the sums round to nearest-even. The native
// instruction treats bf16 and fp32 subnormals as zero (its fixed behaviour), which matters only
// below 1.2·10⁻³⁸. Either way |C − A·B| ≤ γ_k·Σ|a||b| (γ_k = k·u/(1 − k·u), u = 2⁻²⁴), or
// γ_{k+1} with the starting C counted as one more term.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/gemm_bf16_amx.hpp>
#include <mha/detail/gemm_bf16_packing.hpp>
#include <mha/detail/gemm_bf16_portable.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled_product.hpp>

namespace mha {
namespace detail {

/// Columns of B up to which the native gemm_bf16 runs the narrow product, A read in place (a
/// decode step's projection).
inline constexpr Index bf16_narrow_columns = 4;

#if defined(MHA_BF16_NATIVE)

/// packed ← B(2·q0 ..., j0 : j1) for the pairs [q0, q0 + pairs) in panels of nr columns: the
/// panel at column jr (relative to j0, width w = min(nr, j1 − j0 − jr)) starts at word jr·pairs
/// and holds word (q, c) = (B(2q, j), B(2q+1, j)) at (q·w + c); the partner beyond k is zero.
inline void pack_bf16_gemm_b(Index k, bf16_operand b, Index q0, Index pairs, Index j0, Index j1,
                             std::uint16_t* packed) {
    constexpr Index nr = bf16_gemm_sizes::nr;
    for (Index jr = 0; jr < j1 - j0; jr += nr) {
        const Index w = std::min(nr, j1 - j0 - jr);
        std::uint16_t* panel = packed + jr * pairs * 2;
        for (Index c = 0; c < w; ++c) {
            const Eigen::bfloat16* col = b.data + (j0 + jr + c) * b.col_stride;
            for (Index q = 0; q < pairs; ++q) {
                const Index kk = 2 * (q0 + q);
                std::uint16_t* dst = panel + (q * w + c) * 2;
                if (b.row_stride == 1 && kk + 1 < k) {
                    std::memcpy(dst, col + kk, 2 * sizeof(std::uint16_t));
                } else {
                    dst[0] = bf16_bits(col[kk * b.row_stride]);
                    dst[1] = kk + 1 < k ? bf16_bits(col[(kk + 1) * b.row_stride]) : 0;
                }
            }
        }
    }
}

/// One register tile: C(0 : rows, 0 : Cols) += the packed A panel times the packed B panel over
/// `pairs` pairs of k when load_c; else C = bias(0 : rows)·1ᵀ + that product (bias null: 0). VP
/// packets of 16 rows; the last one reads and writes the lanes of `last` only.
template <int VP, int Cols>
MHA_ALWAYS_INLINE void gemm_tile_bf16(const std::uint16_t* ap, const std::uint16_t* bp, Index pairs,
                                      float* c, Index ldc, bool load_c, const float* bias,
                                      __mmask16 last) {
    constexpr Index mr = bf16_gemm_sizes::mr;
    __m512 acc[VP][Cols];
    for (int p = 0; p < VP; ++p) {
        // The sums start from C, the bias or 0: no pass over C before the product.
        const __m512 start = bias == nullptr ? _mm512_setzero_ps()
                             : p + 1 < VP    ? _mm512_loadu_ps(bias + p * bf16_lanes)
                                             : _mm512_maskz_loadu_ps(last, bias + p * bf16_lanes);
        for (int j = 0; j < Cols; ++j) {
            float* cj = c + j * ldc + p * bf16_lanes;
            acc[p][j] = !load_c      ? start
                        : p + 1 < VP ? _mm512_loadu_ps(cj)
                                     : _mm512_maskz_loadu_ps(last, cj);
        }
    }
    for (Index q = 0; q < pairs; ++q) {
        __m512i x[VP];
        for (int p = 0; p < VP; ++p)
            x[p] = _mm512_loadu_si512(ap + (q * mr + p * bf16_lanes) * 2);
        for (int j = 0; j < Cols; ++j) {
            const __m512i y =
                _mm512_set1_epi32(static_cast<int>(load_pair(bp + (q * Cols + j) * 2)));
            for (int p = 0; p < VP; ++p)
                acc[p][j] = dot_pairs(acc[p][j], x[p], y);
        }
    }
    for (int j = 0; j < Cols; ++j)
        for (int p = 0; p < VP; ++p) {
            float* cj = c + j * ldc + p * bf16_lanes;
            if (p + 1 < VP)
                _mm512_storeu_ps(cj, acc[p][j]);
            else
                _mm512_mask_storeu_ps(cj, last, acc[p][j]);
        }
}

/// gemm_tile_bf16 with the column count chosen at run time (1 ... nr).
template <int VP>
void gemm_tile_bf16_columns(Index cols, const std::uint16_t* ap, const std::uint16_t* bp,
                            Index pairs, float* c, Index ldc, bool load_c, const float* bias,
                            __mmask16 last) {
    static_assert(bf16_gemm_sizes::nr == 6, "one case per column count below");
    switch (cols) {
        case 6:
            gemm_tile_bf16<VP, 6>(ap, bp, pairs, c, ldc, load_c, bias, last);
            break;
        case 5:
            gemm_tile_bf16<VP, 5>(ap, bp, pairs, c, ldc, load_c, bias, last);
            break;
        case 4:
            gemm_tile_bf16<VP, 4>(ap, bp, pairs, c, ldc, load_c, bias, last);
            break;
        case 3:
            gemm_tile_bf16<VP, 3>(ap, bp, pairs, c, ldc, load_c, bias, last);
            break;
        case 2:
            gemm_tile_bf16<VP, 2>(ap, bp, pairs, c, ldc, load_c, bias, last);
            break;
        default:
            gemm_tile_bf16<VP, 1>(ap, bp, pairs, c, ldc, load_c, bias, last);
            break;
    }
}

/// The native path of gemm_bf16.
inline void gemm_bf16_native(Index m, Index n, Index k, bf16_operand a, bf16_operand b, float* c,
                             Index ldc, bool accumulate, const float* bias,
                             bf16_gemm_buffers& buffers, int threads, bf16_prepacked_a prepacked) {
    using s = bf16_gemm_sizes;
    const Index all_pairs = (k + 1) / 2, panels = (m + s::mr - 1) / s::mr;
    const std::uint16_t* pa = prepacked.pairs;
    if (pa == nullptr) {
        grow(buffers.packed_a, panels * all_pairs * s::mr * 2);
        pack_bf16_gemm_a(m, k, a, buffers.packed_a.data(), all_pairs);
        pa = buffers.packed_a.data();
    }
    bf16_gemm_over_columns(n, threads, buffers, [&](Index j0, Index j1, auto& own) {
        grow(own.packed_b, std::min(k + 1, s::kc) * s::nc);
        std::uint16_t* pb = own.packed_b.data();
        for (Index k0 = 0; k0 < k; k0 += s::kc) {
            const Index q0 = k0 / 2, pairs = (std::min(k, k0 + s::kc) - k0 + 1) / 2;
            pack_bf16_gemm_b(k, b, q0, pairs, j0, j1, pb);
            const bool load_c = accumulate || k0 > 0;
            for (Index i0 = 0; i0 < m; i0 += s::mc) {
                const Index i1 = std::min(m, i0 + s::mc);
                for (Index jr = j0; jr < j1; jr += s::nr) {
                    const Index cols = std::min(s::nr, j1 - jr);
                    const std::uint16_t* bp = pb + (jr - j0) * pairs * 2;
                    for (Index i = i0; i < i1; i += s::mr) {
                        const Index rows = std::min(s::mr, m - i);
                        const std::uint16_t* ap = pa + ((i / s::mr) * all_pairs + q0) * s::mr * 2;
                        const Index vp = (rows + bf16_lanes - 1) / bf16_lanes;
                        const Index tail = rows - (vp - 1) * bf16_lanes;  // 1 ... 16
                        const auto last = static_cast<__mmask16>((1u << tail) - 1u);
                        float* ct = c + jr * ldc + i;
                        const float* bias_i = bias != nullptr ? bias + i : nullptr;
                        switch (vp) {
                            case 4:
                                gemm_tile_bf16_columns<4>(cols, ap, bp, pairs, ct, ldc, load_c,
                                                          bias_i, last);
                                break;
                            case 3:
                                gemm_tile_bf16_columns<3>(cols, ap, bp, pairs, ct, ldc, load_c,
                                                          bias_i, last);
                                break;
                            case 2:
                                gemm_tile_bf16_columns<2>(cols, ap, bp, pairs, ct, ldc, load_c,
                                                          bias_i, last);
                                break;
                            default:
                                gemm_tile_bf16_columns<1>(cols, ap, bp, pairs, ct, ldc, load_c,
                                                          bias_i, last);
                                break;
                        }
                    }
                }
            }
        }
    });
}

/// C(:, 0 : Cols) += A·B(:, j0 : j0 + Cols) for a column-major A (row stride 1), A read in place:
/// the narrow product of gemm_bf16, for a few columns, where packing A would cost a pass over
/// every weight (a decode step's projection reads each weight once). Each sweep takes G pairs of
/// A's columns over every row: their two columns interleaved in registers (vpermt2w) into the
/// words vdpbf16ps takes, C loaded, G dot products, C stored. Every element of C thus gets the
/// sequence of vdpbf16ps of gemm_bf16_native (over the pairs in order, the odd k's partner 0)
/// from the same start, so the narrow and the packed products give the same bits; C's store and
/// reload between sweeps are exact. Rows [r0, r1) only (a thread's share; r0 a multiple of 16).
template <int Cols>
void narrow_rows_bf16(Index r0, Index r1, Index k, bf16_operand a, bf16_operand b, float* c,
                      Index ldc) {
    constexpr Index G = 4;  // pairs per sweep: 8 streams of A
    const Index pairs = (k + 1) / 2;
    alignas(64) std::uint16_t order[32];
    for (int i = 0; i < 16; ++i) {
        order[2 * i] = static_cast<std::uint16_t>(i);           // word i's low half: column 2q
        order[2 * i + 1] = static_cast<std::uint16_t>(32 + i);  // its high half: column 2q + 1
    }
    const __m512i interleave = _mm512_load_si512(order);
    for (Index q0 = 0; q0 < pairs; q0 += G) {
        const Index g = std::min(G, pairs - q0);
        __m512i y[G][Cols];
        for (Index t = 0; t < g; ++t)
            for (int j = 0; j < Cols; ++j) {
                const Eigen::bfloat16* col = b.data + j * b.col_stride;
                const Index kk = 2 * (q0 + t);
                const std::uint32_t lo = bf16_bits(col[kk * b.row_stride]);
                const std::uint32_t hi = kk + 1 < k ? bf16_bits(col[(kk + 1) * b.row_stride]) : 0u;
                y[t][j] = _mm512_set1_epi32(static_cast<int>(lo | (hi << 16)));
            }
        for (Index r = r0; r < r1; r += bf16_lanes) {
            const auto rows = static_cast<unsigned>(std::min(bf16_lanes, r1 - r));
            const auto mask16 = static_cast<__mmask16>((1u << rows) - 1u);
            const auto mask32 = static_cast<__mmask32>(mask16);
            __m512 acc[Cols];
            for (int j = 0; j < Cols; ++j)
                acc[j] = _mm512_maskz_loadu_ps(mask16, c + j * ldc + r);
            for (Index t = 0; t < g; ++t) {
                const Index kk = 2 * (q0 + t);
                const Eigen::bfloat16* col0 = a.data + kk * a.col_stride + r;
                const __m512i lo = _mm512_maskz_loadu_epi16(mask32, col0);
                const __m512i hi = kk + 1 < k
                                       ? _mm512_maskz_loadu_epi16(mask32, col0 + a.col_stride)
                                       : _mm512_setzero_si512();
                const __m512i x = _mm512_permutex2var_epi16(lo, interleave, hi);
                for (int j = 0; j < Cols; ++j)
                    acc[j] = dot_pairs(acc[j], x, y[t][j]);
            }
            for (int j = 0; j < Cols; ++j)
                _mm512_mask_storeu_ps(c + j * ldc + r, mask16, acc[j]);
        }
    }
}

/// The narrow path of gemm_bf16 (n ≤ bf16_narrow_columns, A column-major): C started from C, the
/// bias or 0, then narrow_rows_bf16, the rows split over threads in whole packets (each element
/// is computed alike whoever computes it).
inline void gemm_bf16_narrow(Index m, Index n, Index k, bf16_operand a, bf16_operand b, float* c,
                             Index ldc, bool accumulate, const float* bias, int threads) {
    if (!accumulate) start_columns(m, 0, n, bias, c, ldc);
    // Parts of at least 1024 rows: below that a thread's start costs more than its share.
    const Index packets = (m + bf16_lanes - 1) / bf16_lanes;
    const int nt = static_cast<int>(
        std::max<Index>(1, std::min<Index>(thread_count(threads), (m + 1023) / 1024)));
    parallel_parts(nt, [&](int part, int) {
        const Index r0 = packets * part / nt * bf16_lanes;
        const Index r1 = std::min(m, packets * (part + 1) / nt * bf16_lanes);
        switch (n) {
            case 1:
                narrow_rows_bf16<1>(r0, r1, k, a, b, c, ldc);
                break;
            case 2:
                narrow_rows_bf16<2>(r0, r1, k, a, b, c, ldc);
                break;
            case 3:
                narrow_rows_bf16<3>(r0, r1, k, a, b, c, ldc);
                break;
            default:
                narrow_rows_bf16<4>(r0, r1, k, a, b, c, ldc);
                break;
        }
    });
}

#endif  // MHA_BF16_NATIVE

/// C (m×n, fp32, column-major, ldc) = bias·1ᵀ + A·B (bias: m floats, or null for none), or
/// C += A·B when `accumulate` (bias ignored), with A m×k and B k×n in bfloat16 (any strides) and
/// fp32 sums (the bias or C is each sum's first term), on up to `threads` threads (0: OpenMP's
/// default; the result does not depend on it). `kernel` picks the implementation; native and amx
/// are only available when MHA_BF16_NATIVE is defined (else the portable path runs); amx runs the
/// AMX tiles where MHA_BF16_AMX is defined and amx_usable(), the native path elsewhere and for up
/// to bf16_narrow_columns columns. Allocates only to grow `buffers`. C must not overlap A or B.
/// With `prepacked` (A packed once, its m and k those of the call), the native path reads its
/// pair panels instead of packing A, the portable path widens its row panels instead of A's
/// columns: the same bits.
inline void gemm_bf16(Index m, Index n, Index k, bf16_operand a, bf16_operand b, float* c,
                      Index ldc, bool accumulate, const float* bias, bf16_gemm_buffers& buffers,
                      int threads = 0, bf16_kernel kernel = default_bf16_kernel,
                      bf16_prepacked_a prepacked = {}) {
    if (m == 0 || n == 0) return;
    if ((prepacked.pairs != nullptr || prepacked.row_panels != nullptr) &&
        (prepacked.m != m || prepacked.k != k))
        fail<std::logic_error>("mha::detail::gemm_bf16", "prepacked",
                               "panels of the product's A, " + to_text(m) + " x " + to_text(k),
                               to_text(prepacked.m) + " x " + to_text(prepacked.k));
    if (k == 0) {
        if (!accumulate) start_columns(m, 0, n, bias, c, ldc);
        return;
    }
#if defined(MHA_BF16_NATIVE)
    if (uses_dot_pairs(kernel)) {
        if (n <= bf16_narrow_columns && a.row_stride == 1)
            gemm_bf16_narrow(m, n, k, a, b, c, ldc, accumulate, bias, threads);
#if defined(MHA_BF16_AMX)
        else if (kernel == bf16_kernel::amx && amx_usable())
            gemm_bf16_amx(m, n, k, a, b, c, ldc, accumulate, bias, buffers, threads);
#endif
        else
            gemm_bf16_native(m, n, k, a, b, c, ldc, accumulate, bias, buffers, threads, prepacked);
        return;
    }
#endif
    (void)kernel;
    gemm_bf16_portable(m, n, k, a, b, c, ldc, accumulate, bias, buffers, threads,
                       prepacked.row_panels);
}

}  // namespace detail
}  // namespace mha
