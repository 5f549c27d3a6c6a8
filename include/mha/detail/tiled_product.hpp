// SPDX-License-Identifier: MIT
// The float and double projections' product C = A·B on the attention kernel's register tiles.
//
// Why not Eigen's GEMM: it packs both operands into its own order on every call, with its own
// blocking overheads. `accumulate_product` (detail/tiled/block_kernels.hpp) reading A's columns
// where they lie took 0.60–0.69 of the GEMM's time for the layer's projections, 512 and 768
// wide, 128 to 2048 tokens (one thread, AVX-512; 0.68–0.90 in a loop built for AVX2;
// docs/performance.md, "fp32 projections on the register tiles").
//
// Why the slice of A is copied all the same: read in place, each step of a micro tile's chain
// loads its rows of A from another column, a column stride apart (2 KiB for a 512-wide weight),
// so one micro tile's pass over 512 steps touches 256 pages. Copied into panels whose columns
// follow one another, the pass reads one contiguous stretch (16 KiB for float on AVX2): the
// projections 1.2–1.3× faster on an AVX2 machine (Zen 3, one thread; docs/performance.md, "One
// thread on an AVX2 machine"; the pages are the likely cause, not a counted one). The copy is
// one load and one store per element of A, so it pays only where more than one tile of columns
// reads the slice (n > value_queries); with fewer columns A is read in place.
//
// Packed once: a matrix that every call reads, as the layer's weights, is kept in the panels
// (row_panels, packed by the layer's constructor). Then no call copies it, and a call with few
// columns (a decode step) reads it contiguous too: the layer's decoding step at E = 4096 2.2×
// faster on the Zen 3 (docs/performance.md, "The layer's weights packed once").
//
// Blocking: rows of A in blocks of `tiled_product_rows`, and within one, the inner dimension in
// chunks small enough that the packed slice takes 64 KiB (256 for float): on the stack, as
// Eigen's GEMM keeps up to 128 KiB of its packing there, and in L2 while every column tile reads
// it. Each entry of C is one chain of multiply-adds over k in increasing order (a chunk continues
// the sum left in C by the one before it), so its bits depend neither on the blocking, nor on
// the packing, nor on the number of threads, which split the row blocks.
#pragma once

#include <algorithm>
#include <type_traits>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/aligned_vector.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/block_kernels.hpp>

namespace mha {
namespace detail {

/// Whether an Eigen expression type is a column-major matrix in memory with unit inner stride:
/// what tiled_product reads and writes through pointers.
template <class X>
inline constexpr bool column_major_storage =
    (X::Flags & Eigen::DirectAccessBit) != 0 &&
    (X::Flags & Eigen::RowMajorBit) == 0 && X::InnerStrideAtCompileTime == 1;

/// The scalars the register tiles are written for.
template <class Scalar>
inline constexpr bool tiled_product_scalar =
    std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;

/// Rows of A per block, and the inner dimension per chunk of A read in place (see "Blocking").
inline constexpr Index tiled_product_rows = 64;
inline constexpr Index tiled_product_inner = 512;

/// The inner dimension per chunk of A packed into panels: 64 KiB of them (see "Blocking").
template <class Scalar>
inline constexpr Index packed_product_inner = Index(65536 / (sizeof(Scalar) * tiled_product_rows));

/// Rows per panel of pack_row_panels: one value micro tile's rows.
template <class Scalar>
inline constexpr Index product_panel_rows =
    block_kernel_traits<Scalar>::value_packets* block_kernel_traits<Scalar>::width;

/// The panels of A(0 : rows, 0 : kc), product_panel_rows (P) rows each and panel_stride apart:
/// row e + i of column j (e a multiple of P) at pack[e/P·panel_stride + j·P + i].
/// `copy_rows(j, e, count, to)` writes rows [e, e + count) of column j to `to`, contiguous: a
/// plain copy for fp32 (copy_rows_of), a widening one for bf16 (detail/gemm_bf16_portable.hpp).
/// The last panel may hold fewer rows; its other entries are left as they were, never read.
template <class Scalar, class CopyRows>
void pack_row_panels(Index rows, Index kc, Index panel_stride, Scalar* pack, CopyRows copy_rows) {
    constexpr Index panel = product_panel_rows<Scalar>;
    // Column by column, so that each column of A is read once, in one pass down its rows.
    // Filling one panel at a time instead read every column once per panel, a column stride
    // apart each time: 15 % of the product at 1536 rows (profiled).
    for (Index j = 0; j < kc; ++j)
        for (Index e = 0; e < rows; e += panel)
            copy_rows(j, e, std::min(panel, rows - e), pack + e / panel * panel_stride + j * panel);
}

/// copy_rows for pack_row_panels over a column-major A (column j at a + j·lda).
template <class Scalar>
auto copy_rows_of(const Scalar* a, Index lda) {
    return [a, lda](Index j, Index e, Index count, Scalar* to) MHA_ALWAYS_INLINE_LAMBDA {
        using ops = typename block_kernel_traits<Scalar>::ops;
        constexpr Index w = block_kernel_traits<Scalar>::width;
        constexpr Index panel = product_panel_rows<Scalar>;
        static_assert(panel % w == 0, "a packet never straddles two panels");
        const Scalar* from = a + j * lda + e;
        if (count == panel) {
            // A whole panel, a fixed number of packets: unrolled. With the count unknown, g++
            // made the loop a `rep movs`, whose start-up cost on 64 bytes doubled the copy's
            // time (profiled on the Zen 3).
            for (Index i = 0; i < panel; i += w)
                ops::store(to + i, ops::load(from + i));
            return;
        }
        Index i = 0;
        for (; i + w <= count; i += w)
            ops::store(to + i, ops::load(from + i));
        for (; i < count; ++i)
            to[i] = from[i];
    };
}

/// C(0 : rows, 0 : n) += A · B(0 : kc, 0 : n) with A's rows in panels of product_panel_rows
/// (P) rows: panel p's column j at pack + p·panel_stride + j·P (pack_row_panels), B
/// column-major (ldb). accumulate_product's tiles, the panels of one column tile in turn, so
/// that the column tile of B stays in L1 while the panels stream past it from L2.
template <class Scalar>
void accumulate_packed_product(const Scalar* pack, Index panel_stride, Index rows, Index kc,
                               const Scalar* b, Index ldb, Index n, Scalar* c, Index ldc) {
    constexpr int cols = static_cast<int>(block_kernel_traits<Scalar>::value_queries);
    constexpr Index panel = product_panel_rows<Scalar>;
    for_each_key_tile<cols>(0, n, [&](auto width, Index col) MHA_ALWAYS_INLINE_LAMBDA {
        for (Index e = 0; e < rows; e += panel)
            value_rows<Scalar, decltype(width)::value, operand_order::col_major>(
                pack + e / panel * panel_stride, panel, std::min(panel, rows - e), kc,
                b + col * ldb, ldb, c + col * ldc + e, ldc);
    });
}

/// C(0 : rows, 0 : n) += A(0 : rows, 0 : k) · B, A's rows packed into panels one inner chunk at
/// a time (rows ≤ tiled_product_rows), on the stack. `copy_rows(q, i, count, to)` writes rows
/// [i, i + count) of A's column q (q < k) to `to`: copy_rows_of for fp32, a widening copy for
/// bf16 (gemm_bf16_portable).
template <class Scalar, class CopyRows>
void packed_row_block(Index rows, Index k, CopyRows copy_rows, const Scalar* b, Index ldb, Index n,
                      Scalar* c, Index ldc) {
    constexpr Index inner = packed_product_inner<Scalar>;
    alignas(64) Scalar panels[tiled_product_rows * inner];
    for (Index k0 = 0; k0 < k; k0 += inner) {
        const Index kc = std::min(inner, k - k0);
        const Index panel_stride = product_panel_rows<Scalar> * kc;
        pack_row_panels(rows, kc, panel_stride, panels,
                        [&](Index j, Index i, Index count, Scalar* to)
                            MHA_ALWAYS_INLINE_LAMBDA { copy_rows(k0 + j, i, count, to); });
        accumulate_packed_product(panels, panel_stride, rows, kc, b + k0, ldb, n, c, ldc);
    }
}

/// C(0 : rows, 0 : n) += rows [e, e + rows) of A · B, A in panels of product_panel_rows (P)
/// rows over all of its k columns (panel p at panels + p·P·k: pack_row_panels with a panel
/// stride of P·k), e a multiple of P; the inner dimension in chunks as packed_row_block's.
template <class Scalar>
void accumulate_from_panels(const Scalar* panels, Index k, Index e, Index rows, const Scalar* b,
                            Index ldb, Index n, Scalar* c, Index ldc) {
    constexpr Index panel = product_panel_rows<Scalar>;
    constexpr Index inner = packed_product_inner<Scalar>;
    // The callers step e by tiled_product_rows (for_each_product_row_block): each block must
    // start at a panel, or panels + e·k would land inside one.
    static_assert(tiled_product_rows % panel == 0, "row blocks start at a panel");
    for (Index k0 = 0; k0 < k; k0 += inner)
        accumulate_packed_product(panels + e * k + k0 * panel, panel * k, rows,
                                  std::min(inner, k - k0), b + k0, ldb, n, c, ldc);
}

/// A matrix kept in the panels of accumulate_from_panels, packed once: a weight that many
/// products read (the layer's projections, which keep theirs only in this form), so that no
/// product copies it again.
template <class Scalar>
struct row_panels {
    /// Rows [first, first + count) of the panels, or `data` null where first is not at a panel.
    struct view {
        const Scalar* data = nullptr;
        Index rows = 0, inner = 0;
    };

    row_panels() = default;
    /// The panels of A (rows × inner, column j at a + j·lda).
    row_panels(const Scalar* a, Index lda, Index rows, Index inner) : rows_(rows), inner_(inner) {
        constexpr Index panel = product_panel_rows<Scalar>;
        panels_.resize(static_cast<std::size_t>((rows + panel - 1) / panel * panel * inner));
        pack_row_panels(rows, inner, panel * inner, panels_.data(), copy_rows_of(a, lda));
    }
    template <class Derived>
    explicit row_panels(const Eigen::MatrixBase<Derived>& a)
        : row_panels(a.derived().data(), a.derived().outerStride(), a.rows(), a.cols()) {}

    view all() const { return rows(0, rows_); }
    view rows(Index first, Index count) const {
        if (first % product_panel_rows<Scalar> != 0 || first + count > rows_) return {};
        return {panels_.data() + first * inner_, count, inner_};
    }
    Index rows() const { return rows_; }
    Index cols() const { return inner_; }

    /// The matrix the panels were packed from, exactly.
    matrix<Scalar> unpacked() const {
        constexpr Index panel = product_panel_rows<Scalar>;
        matrix<Scalar> a(rows_, inner_);
        for (Index j = 0; j < inner_; ++j)
            for (Index e = 0; e < rows_; e += panel)
                std::copy_n(panels_.data() + e * inner_ + j * panel, std::min(panel, rows_ - e),
                            a.data() + j * rows_ + e);
        return a;
    }

private:
    uninitialized_aligned_vector<Scalar> panels_;
    Index rows_ = 0, inner_ = 0;
};

/// f(e, rows) for each block of `tiled_product_rows` rows of an m × n product with inner
/// dimension k, with C's rows [e, e + rows) zeroed first (column-major, ldc); the blocks on up
/// to `threads` threads (0: OpenMP's default).
template <class Scalar, class F>
void for_each_product_row_block(Index m, Index n, Index k, Scalar* c, Index ldc, int threads,
                                F&& f) {
    constexpr Index row_block = tiled_product_rows;
    if (m == 0 || n == 0) return;
    const Index blocks = (m + row_block - 1) / row_block;
    // As for the GEMM (detail/gemm.hpp): a thread pays off from about 50 000 multiply-adds.
    const double work = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    const int parts =
        static_cast<int>(std::max(1.0, std::min({static_cast<double>(thread_count(threads)),
                                                 static_cast<double>(blocks), work / 50000.0})));
    parallel_parts(parts, [&](int part, int) {
        for (Index r = part; r < blocks; r += parts) {
            const Index e = r * row_block, rows = std::min(row_block, m - e);
            for (Index col = 0; col < n; ++col)
                std::fill(c + col * ldc + e, c + col * ldc + e + rows, Scalar(0));
            f(e, rows);
        }
    });
}

/// C (m × n, column-major, ldc) = A·B, A m × k column-major (column j at a + j·lda), B k × n
/// column-major (ldb); on `threads` threads (0: OpenMP's default). C must not overlap A or B.
template <class Scalar>
void tiled_product(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                   Index ldb, Scalar* c, Index ldc, int threads) {
    constexpr Index inner_chunk = tiled_product_inner;
    // Packing pays where more than one column tile reads the slice (see "Why the slice...").
    const bool pack = n > block_kernel_traits<Scalar>::value_queries;
    for_each_product_row_block(m, n, k, c, ldc, threads, [&](Index e, Index rows) {
        if (pack) {
            packed_row_block(rows, k, copy_rows_of(a + e, lda), b, ldb, n, c + e, ldc);
            return;
        }
        for (Index k0 = 0; k0 < k; k0 += inner_chunk) {
            const Index kc = std::min(inner_chunk, k - k0);
            accumulate_product(a + k0 * lda + e, lda, rows, kc, b + k0, ldb, n, c + e, ldc);
        }
    });
}

/// tiled_product with A in panels packed beforehand (row_panels), for every n: the same chains,
/// so the same bits, without the copy (a sixth of the product's time at 128 columns on an AVX2
/// Zen 3, where the weight comes from L3 on every call; profiled).
template <class Scalar>
void tiled_product(const typename row_panels<Scalar>::view& a, Index n, const Scalar* b, Index ldb,
                   Scalar* c, Index ldc, int threads) {
    for_each_product_row_block(a.rows, n, a.inner, c, ldc, threads, [&](Index e, Index rows) {
        accumulate_from_panels(a.data, a.inner, e, rows, b, ldb, n, c + e, ldc);
    });
}

}  // namespace detail
}  // namespace mha
