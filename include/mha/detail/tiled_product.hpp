// SPDX-License-Identifier: MIT
// The float and double projections' product C = A·B on the attention kernel's register tiles.
//
// Why not Eigen's GEMM: it packs A into its own panel order on every call. For a projection A is
// the weight, the same on every call, and at the token counts of a layer (up to a few thousand
// columns) packing it cost more than the tiles it saves: `accumulate_product`
// (detail/tiled/block_kernels.hpp) reads A's columns where they lie and took 0.60–0.69 of the
// GEMM's time for the layer's projections, 512 and 768 wide, 128 to 2048 tokens (one thread,
// AVX-512; 0.68–0.90 in a loop built for AVX2; docs/performance.md, "fp32 projections on the
// register tiles").
//
// Blocking: rows of A in blocks of `row_block`, and within one, the inner dimension in chunks
// of `inner_chunk`, so that the slice of A that every column tile reads (64 × 512 floats,
// 128 KiB) stays in L2. Each entry of C is one chain of multiply-adds over k in increasing
// order (a chunk continues the sum left in C by the one before it), so its bits depend neither
// on the blocking nor on the number of threads, which split the row blocks.
#pragma once

#include <algorithm>
#include <type_traits>

#include <Eigen/Core>

#include <mha/core.hpp>
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

/// Rows of A per block, and the inner dimension per chunk, of tiled_product (see "Blocking").
inline constexpr Index tiled_product_rows = 64;
inline constexpr Index tiled_product_inner = 512;

/// C (m × n, column-major, ldc) = A·B, A m × k column-major (column j at a + j·lda), B k × n
/// column-major (ldb); on `threads` threads (0: OpenMP's default). C must not overlap A or B.
template <class Scalar>
void tiled_product(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                   Index ldb, Scalar* c, Index ldc, int threads) {
    constexpr Index row_block = tiled_product_rows;
    constexpr Index inner_chunk = tiled_product_inner;
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
            for (Index k0 = 0; k0 < k; k0 += inner_chunk)
                accumulate_product(a + k0 * lda + e, lda, rows, std::min(inner_chunk, k - k0),
                                   b + k0, ldb, n, c + e, ldc);
        }
    });
}

}  // namespace detail
}  // namespace mha
