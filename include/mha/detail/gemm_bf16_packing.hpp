// SPDX-License-Identifier: MIT
// What the bf16 GEMM's implementations share (detail/gemm_bf16.hpp, detail/gemm_bf16_amx.hpp): the
// operand view, the blocking, the caller's buffers, the split of the columns over threads, the
// start of C from the bias, A packed in pair panels, and a weight packed once in the panels of
// the path the build runs (bf16_packed_matrix).
//
// Pair panels. vdpbf16ps and the AMX tile product TDPBF16PS both pair adjacent elements of the
// reduction dimension (lane i gets a[2i]·b[2i] + a[2i+1]·b[2i+1]), so A is packed once per call
// into panels of mr = 64 rows in which each row holds its pairs (A(i, 2q), A(i, 2q+1)) as one
// 32-bit word, 64 words per pair q. The vdpbf16ps tile reads a pair's 64 words as four zmm; an
// AMX tile reads 16 pairs × 16 of those words as a 16-row tile with a row stride of 256 bytes
// (the VNNI order TDPBF16PS takes for its second operand). An odd k gets a zero partner; pairs
// beyond k up to the panel's pair stride (the AMX path rounds k up to its 32-element chunks) are
// zero.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/aligned_vector.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled_product.hpp>

namespace mha {
namespace detail {

/// A bf16 operand in memory: element (r, c) at data[r·row_stride + c·col_stride].
struct bf16_operand {
    const Eigen::bfloat16* data = nullptr;  ///< element (0, 0)
    Index row_stride = 1;                   ///< distance between rows
    Index col_stride = 0;                   ///< distance between columns
};

/// Blocking and tile sizes of gemm_bf16 (see the top of this file).
struct bf16_gemm_sizes {
    static constexpr Index mr = 64;   ///< rows of the register tile (4 packets of 16)
    static constexpr Index nr = 6;    ///< columns of the register tile
    static constexpr Index kc = 512;  ///< k-block (even: pairs never straddle blocks)
    static constexpr Index mc = 256;  ///< row block (a multiple of mr)
    static constexpr Index nc = 192;  ///< column block: the unit of work a thread takes
};
static_assert(bf16_gemm_sizes::kc % 2 == 0, "k-blocks must hold whole pairs");
static_assert(bf16_gemm_sizes::mc % bf16_gemm_sizes::mr == 0, "row blocks of whole panels");
static_assert(bf16_gemm_sizes::nc % bf16_gemm_sizes::nr == 0, "column blocks of whole panels");

/// Grows v to at least n elements; never shrinks, so a buffer that served a shape allocates
/// nothing for it again.
template <class T, class Allocator>
void grow(std::vector<T, Allocator>& v, Index n) {
    if (static_cast<Index>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
}

/// One thread's buffers of gemm_bf16.
struct bf16_gemm_thread_buffers {
    aligned_vector<std::uint16_t>
        packed_b;                  // native: a k-block × column block of B, in pairs; amx: Bᵀ
    aligned_vector<float> wide_b;  // portable: a column block of B in fp32 (k × nc)
};

/// Buffers of gemm_bf16, kept by the caller between calls; they only grow. One set serves one
/// call at a time.
struct bf16_gemm_buffers {
    aligned_vector<std::uint16_t> packed_a;            // native, amx: all of A, in pair panels
    aligned_vector<float> wide_a;                      // portable: A in fp32, m × k column-major
    std::vector<bf16_gemm_thread_buffers> per_thread;  // one per thread of the call
};

/// Column blocks of n columns.
inline Index bf16_gemm_column_blocks(Index n) {
    return (n + bf16_gemm_sizes::nc - 1) / bf16_gemm_sizes::nc;
}

/// Runs block(column0, column1, thread_buffers) over the column blocks of n columns on up to
/// `threads` threads (0: OpenMP's default), each thread taking a contiguous range of blocks.
template <class Block>
void bf16_gemm_over_columns(Index n, int threads, bf16_gemm_buffers& buffers, Block block) {
    const Index blocks = bf16_gemm_column_blocks(n);
    const int nt =
        static_cast<int>(std::max<Index>(1, std::min<Index>(thread_count(threads), blocks)));
    if (buffers.per_thread.size() < static_cast<std::size_t>(nt))
        buffers.per_thread.resize(static_cast<std::size_t>(nt));
    parallel_parts(nt, [&](int part, int thread) {
        const Index b0 = blocks * part / nt, b1 = blocks * (part + 1) / nt;
        for (Index blk = b0; blk < b1; ++blk) {
            const Index j0 = blk * bf16_gemm_sizes::nc;
            const Index j1 = std::min(n, j0 + bf16_gemm_sizes::nc);
            block(j0, j1, buffers.per_thread[static_cast<std::size_t>(thread)]);
        }
    });
}

/// C(:, j0 : j1) ← bias·1ᵀ, or 0 without a bias (null).
inline void start_columns(Index m, Index j0, Index j1, const float* bias, float* c, Index ldc) {
    for (Index j = j0; j < j1; ++j) {
        if (bias != nullptr)
            std::copy(bias, bias + m, c + j * ldc);
        else
            std::fill(c + j * ldc, c + j * ldc + m, 0.0f);
    }
}

#if defined(MHA_BF16_NATIVE)

/// packed ← A in pair panels: panel p (rows p·mr ...) holds, for each pair q of k, the words
/// (A(i, 2q), A(i, 2q+1)) of its mr rows; zero for rows beyond m, for the partner of an odd k and
/// for the pairs from (k + 1) / 2 up to pair_stride. Word (p, q, r) is at
/// packed + ((p·pair_stride + q)·mr + r)·2.
inline void pack_bf16_gemm_a(Index m, Index k, bf16_operand a, std::uint16_t* packed,
                             Index pair_stride) {
    constexpr Index mr = bf16_gemm_sizes::mr;
    const Index pairs = (k + 1) / 2, panels = (m + mr - 1) / mr;
    if (m % mr != 0 || k % 2 != 0 || pair_stride != pairs)
        std::fill(packed, packed + panels * pair_stride * mr * 2, std::uint16_t(0));
    for (Index p = 0; p < panels; ++p) {
        const Index i0 = p * mr, rows = std::min(mr, m - i0);
        for (Index q = 0; q < pairs; ++q) {
            std::uint16_t* dst = packed + (p * pair_stride + q) * mr * 2;
            const Eigen::bfloat16* x = a.data + i0 * a.row_stride + 2 * q * a.col_stride;
            const bool partner = 2 * q + 1 < k;
            Index r = 0;
            if (a.row_stride == 1 && partner) {
                // Column-major: columns 2q and 2q + 1 interleaved 32 rows at a time by one
                // two-source permute per 32 words.
                alignas(64) static constexpr std::int16_t low[32] = {
                    0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
                alignas(64) static constexpr std::int16_t high[32] = {
                    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
                const __m512i lo = _mm512_load_si512(low), hi = _mm512_load_si512(high);
                const Eigen::bfloat16* y = x + a.col_stride;
                for (; r + 32 <= rows; r += 32) {
                    const __m512i u = _mm512_loadu_si512(x + r), v = _mm512_loadu_si512(y + r);
                    _mm512_storeu_si512(dst + 2 * r, _mm512_permutex2var_epi16(u, lo, v));
                    _mm512_storeu_si512(dst + 2 * r + 32, _mm512_permutex2var_epi16(u, hi, v));
                }
            }
            for (; r < rows; ++r) {
                const Eigen::bfloat16* e = x + r * a.row_stride;
                dst[2 * r] = bf16_bits(e[0]);
                if (partner) dst[2 * r + 1] = bf16_bits(e[a.col_stride]);
            }
        }
    }
}

#endif  // MHA_BF16_NATIVE

/// A view of an A already packed for gemm_bf16, which then reads it instead of packing A again;
/// both null: pack per call. `pairs`: pair panels (pack_bf16_gemm_a with pair_stride
/// (k + 1) / 2), read by the native path. `row_panels`: bf16 panels of product_panel_rows<float>
/// (P) rows over all of k, P·k apart, in pack_row_panels' order (row e + i of column j at
/// [e/P·P·k + j·P + i]), read by the portable path, which widens them a run at a time.
struct bf16_prepacked_a {
    const std::uint16_t* pairs = nullptr;
    const Eigen::bfloat16* row_panels = nullptr;
    Index m = 0, k = 0;
};

/// A matrix packed once in the panels of the path the build runs, kept with a layer's weights:
/// pair panels where the native kernel is compiled in (a projection of a few dozen tokens
/// otherwise spends a third to a half of its time packing the weights again: 1536 × 512
/// weights, 31 µs of 90 at 16 tokens, docs/performance.md), else bf16 row panels (a decode
/// step's product otherwise reads each weight column a column stride away from the last). Costs
/// as much memory as the bf16 matrix itself (rows rounded up to a panel, k to even for pairs).
class bf16_packed_matrix {
public:
    bf16_packed_matrix() = default;
    /// A (m × k) packed.
    bf16_packed_matrix(Index m, Index k, bf16_operand a) : m_(m), k_(k) {
        if (m <= 0 || k <= 0) return;
#if defined(MHA_BF16_NATIVE)
        constexpr Index mr = bf16_gemm_sizes::mr;
        const Index pairs = (k + 1) / 2;
        pairs_.resize(static_cast<std::size_t>((m + mr - 1) / mr * pairs * mr * 2));
        pack_bf16_gemm_a(m, k, a, pairs_.data(), pairs);
#else
        // Rows past m in the last panel are zero: they are widened with the rest, never stored.
        constexpr Index panel = product_panel_rows<float>;
        rows_.assign(static_cast<std::size_t>((m + panel - 1) / panel * panel * k),
                     Eigen::bfloat16(0.0f));
        for (Index j = 0; j < k; ++j)
            for (Index r = 0; r < m; ++r)
                rows_[static_cast<std::size_t>(r / panel * panel * k + j * panel + r % panel)] =
                    a.data[r * a.row_stride + j * a.col_stride];
#endif
    }

    /// The whole matrix.
    bf16_prepacked_a all() const {
        return rows(0, m_);
    }

    /// Rows [r0, r0 + count) (a block of a stacked projection's weights): panels of the whole,
    /// when r0 starts one; else null. The last panel may hold rows of the next block, which the
    /// register tiles compute but do not store.
    bf16_prepacked_a rows(Index r0, Index count) const {
        if (r0 < 0 || count < 0 || r0 + count > m_) return {};
        bf16_prepacked_a view{nullptr, nullptr, count, k_};
        if (!pairs_.empty() && r0 % bf16_gemm_sizes::mr == 0)
            view.pairs =
                pairs_.data() + r0 / bf16_gemm_sizes::mr * ((k_ + 1) / 2) * bf16_gemm_sizes::mr * 2;
        if (!rows_.empty() && r0 % product_panel_rows<float> == 0)
            view.row_panels = rows_.data() + r0 * k_;
        if (view.pairs == nullptr && view.row_panels == nullptr) return {};
        return view;
    }

private:
    aligned_vector<std::uint16_t> pairs_;   // native builds
    aligned_vector<Eigen::bfloat16> rows_;  // portable builds
    Index m_ = 0, k_ = 0;
};

}  // namespace detail
}  // namespace mha
