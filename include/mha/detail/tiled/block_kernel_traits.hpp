// SPDX-License-Identifier: MIT
// The register budget of the tiled attention's block kernels (detail/tiled/block_kernels.hpp)
// on each instruction set, the query padding it implies, and the packet load of each operand
// storage: a float or double packet as it lies, or fp32 lanes widened in registers from bf16.
#pragma once

#include <type_traits>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/eigen_compat.hpp>

namespace mha {
namespace detail {

/// The shapes of the block kernels' register tiles for Scalar on the target instruction set.
template <class Scalar>
struct block_kernel_traits {
    using ops = eigen_compat::packet_ops<Scalar>;
    using packet = typename ops::packet;
    static constexpr Index width = ops::width;
    // 32 vector registers (AVX-512, NEON on AArch64): 4 packets × 6, 24 accumulators, 4 loads
    // and a broadcast; 10 loads per 24 FMAs (2 × 8: 10 per 16, 4 % slower at L = 2048). 16
    // (AVX2, SSE): 2 × 6 for both products (2 × 4 scores: GCC folded the query loads into the
    // FMAs, 12 loads per 8, and the AVX2 core ran 1.2× slower). 2 FMA pipes × 4 cycles: 8 chains.
    static constexpr bool many_registers = ops::many_registers;
    static constexpr Index score_query_packets = many_registers ? 4 : 2;
    static constexpr Index score_keys = 6;
    static constexpr Index value_packets = many_registers ? 4 : 2;
    static constexpr Index value_queries = 6;
    /// Keys per pass of the value tiles over a block (accumulate_values). With 16 registers
    /// (AVX2: Zen 3 and Intel client cores, 32 KiB L1d) 64: a row tile's V lines and the query
    /// tiles' probability lines of 64 keys stay in L1 together. Paired with the row-tile order
    /// and score_stride, the float core ran 1.03× faster at L = 2048 than with 128 (Zen 3;
    /// docs/performance.md). The 128 of AVX-512 was chosen on Zen 5 (48 KiB L1d).
    static constexpr Index value_key_chunk = many_registers ? 128 : 64;
    /// The chunk when one query tile is all there is (a decode step's few query heads): V is
    /// then read once, from memory, and the row strips of a 128-key chunk read each key column a
    /// line at a time, 8 passes a column stride apart, which left the value tile waiting on
    /// its loads (perf annotate). 16 keys (8 KiB at d_v = 128 in float) are read whole before
    /// the next: the decode core 1.2-1.5x faster at 4096 cached tokens (Zen 3, AVX2).
    static constexpr Index value_key_chunk_single_tile = 16;
    /// Queries are padded to a multiple of this; blocks with fewer queries take few_query_scores
    /// (detail/tiled/few_query_scores.hpp), which reads K in place.
    static constexpr Index query_multiple = width;
};

/// Whether the float kernels take their AVX-512 paths: Scalar is float and Eigen's packet is
/// __m512 (16 lanes). The score tiles then mask boundary blocks themselves and take the max with
/// vmaxps (mx_skips_nan, tiles_mask_boundaries).
template <class Scalar>
constexpr bool avx512_float_tiles() {
#if defined(__AVX512F__)
    return std::is_same_v<Scalar, float> && block_kernel_traits<Scalar>::width == 16;
#else
    return false;
#endif
}

/// Whether the float kernels take their AVX2 paths: Scalar is float, Eigen's packet is __m256 (8
/// lanes) and the target has FMA, which the exp pass of those paths needs (exp_above_flush_avx2).
/// The score tiles then mask boundary blocks and take the max as on AVX-512.
template <class Scalar>
constexpr bool avx2_float_tiles() {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    return std::is_same_v<Scalar, float> && block_kernel_traits<Scalar>::width == 8;
#else
    return false;
#endif
}

/// Whether the score tiles mask a boundary block themselves (block_key_limits) and the exp pass
/// skips what they did not write (exp_shifted_per_query): float on AVX-512, or on AVX2 with FMA.
template <class Scalar>
constexpr bool tiles_mask_boundaries() {
    return avx512_float_tiles<Scalar>() || avx2_float_tiles<Scalar>();
}

/// Whether transposed_scores' per-query max leaves NaN scores out (float on AVX-512, or AVX2 with
/// FMA) rather than returning NaN for a query with one.
template <class Scalar>
constexpr bool mx_skips_nan() {
    return tiles_mask_boundaries<Scalar>();
}

/// Rounds nq up to the query padding of the score kernel.
template <class Scalar>
constexpr Index padded_queries(Index nq) {
    constexpr Index m = block_kernel_traits<Scalar>::query_multiple;
    return (nq + m - 1) / m * m;
}

/// One packet of fp32 lanes from as many consecutive bf16 values (exact: a bf16 is the upper
/// half of an fp32), widened in registers where the instruction set allows.
MHA_ALWAYS_INLINE block_kernel_traits<float>::ops::packet widen_bf16_packet(
    const Eigen::bfloat16* p) {
    constexpr Index w = block_kernel_traits<float>::width;
#if defined(EIGEN_VECTORIZE_AVX512)
    static_assert(w == 16, "Eigen's float packet on AVX-512 is a zmm");
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(EIGEN_VECTORIZE_AVX2)
    static_assert(w == 8, "Eigen's float packet on AVX2 is a ymm");
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    alignas(64) float lanes[w];
    widen_bf16(p, w, lanes);
    return block_kernel_traits<float>::ops::load(lanes);
#endif
}

/// One packet of Scalar lanes from `width` consecutive operands stored as `Storage`: Scalar
/// itself, or bf16 widened exactly to fp32 (the kernels then read a bf16 K or V in place).
template <class Scalar, class Storage>
MHA_ALWAYS_INLINE typename block_kernel_traits<Scalar>::packet load_packet(const Storage* p) {
    if constexpr (std::is_same_v<Storage, Scalar>) {
        return block_kernel_traits<Scalar>::ops::load(p);
    } else {
        static_assert(std::is_same_v<Scalar, float> && is_bfloat16_v<Storage>,
                      "mha: operands are stored as the kernel's scalar, or as bf16 for float");
        return widen_bf16_packet(p);
    }
}

}  // namespace detail
}  // namespace mha
