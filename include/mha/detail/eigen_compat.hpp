// SPDX-License-Identifier: MIT
// Every part of Eigen's internal namespace the library uses, and nothing else: the GEMM kernel
// with caller-kept packing buffers (detail/gemm.hpp) and the packet primitives of the tiled
// kernel (detail/tiled/). Eigen does not promise these across releases, so no other header
// names Eigen::internal; when a release changes them, this file is the one to adapt.
// Checked against Eigen 3.4.0 and 5.0.1 (which have the same interfaces for all of it).
#pragma once

#include <cmath>

#include <Eigen/Core>

// Eigen 3.x numbers itself WORLD.MAJOR.MINOR (3.4.0 is 3, 4, 0); from 5.0 on it follows semantic
// versioning in MAJOR.MINOR.PATCH and keeps WORLD at 3. One spelling for both:
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION < 5
#define MHA_EIGEN_VERSION_MAJOR EIGEN_WORLD_VERSION
#define MHA_EIGEN_VERSION_MINOR EIGEN_MAJOR_VERSION
#define MHA_EIGEN_VERSION_PATCH EIGEN_MINOR_VERSION
#else
#define MHA_EIGEN_VERSION_MAJOR EIGEN_MAJOR_VERSION
#define MHA_EIGEN_VERSION_MINOR EIGEN_MINOR_VERSION
#define MHA_EIGEN_VERSION_PATCH EIGEN_PATCH_VERSION
#endif

#if MHA_EIGEN_VERSION_MAJOR == 3 && MHA_EIGEN_VERSION_MINOR < 4
#error "mha needs Eigen 3.4 or 5.x; this Eigen is older than 3.4"
#endif

// Forces inlining of the register-tiled micro kernels, whose accumulators must stay in registers.
#define MHA_ALWAYS_INLINE EIGEN_ALWAYS_INLINE
// The same for a lambda that wraps a micro kernel (written after its parameter list): GCC left the
// wrapper of the score tiles a call per tile, and the fp32 and bf16 cores lost 4–7 % (measured by
// bench/paired/compare_revisions.sh). Elsewhere than GCC and clang the compiler decides.
#if defined(__GNUC__)
#define MHA_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define MHA_ALWAYS_INLINE_LAMBDA
#endif

namespace mha {
namespace detail {
namespace eigen_compat {

using Eigen::Index;

// ---- GEMM -------------------------------------------------------------------------------------

/// Below this m + n + k, Eigen evaluates a product coefficient by coefficient (no packing, no
/// allocation) rather than through its GEMM kernel.
inline constexpr Index coeff_based_product_threshold = EIGEN_GEMM_TO_COEFFBASED_THRESHOLD;

/// Columns of the GEMM kernel's register tile: column ranges split at multiples of it go through
/// the same micro-kernel code as one whole product.
template <class Scalar>
inline constexpr Index gemm_column_tile = Eigen::internal::gebp_traits<Scalar, Scalar>::nr;

/// Eigen's blocking sizes for a single-threaded m×n×k product into a column-major result, with
/// the packed blocks in buffers the caller provides (at least mc·kc and kc·nc scalars).
template <class Scalar>
class gemm_blocking : public Eigen::internal::level3_blocking<Scalar, Scalar> {
public:
    gemm_blocking(Index m, Index n, Index k) {
        this->m_mc = m;
        this->m_nc = n;
        this->m_kc = k;
        Eigen::internal::computeProductBlockingSizes<Scalar, Scalar, 1>(this->m_kc, this->m_mc,
                                                                        this->m_nc, Index(1));
    }
    Index packed_a_size() const { return this->m_mc * this->m_kc; }
    Index packed_b_size() const { return this->m_kc * this->m_nc; }
    void set_buffers(Scalar* a, Scalar* b) {
        this->m_blockA = a;
        this->m_blockB = b;
    }
};

/// C (m×n, column-major, ldc) += alpha·A·B on the calling thread, A m×k in AOrder, B k×n in
/// BOrder (inner stride 1), packing where `blocking` says.
template <class Scalar, int AOrder, int BOrder>
void gemm_run(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b, Index ldb,
              Scalar* c, Index ldc, Scalar alpha, gemm_blocking<Scalar>& blocking) {
    using product =
        Eigen::internal::general_matrix_matrix_product<Index, Scalar, AOrder, false, Scalar, BOrder,
                                                       false, Eigen::ColMajor, 1>;
    product::run(m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
}

/// As gemm_run, packing where Eigen itself would: on the stack below
/// EIGEN_STACK_ALLOCATION_LIMIT, on the heap above it.
template <class Scalar, int AOrder, int BOrder>
void gemm_run_eigen_buffers(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                            Index ldb, Scalar* c, Index ldc, Scalar alpha) {
    using product =
        Eigen::internal::general_matrix_matrix_product<Index, Scalar, AOrder, false, Scalar, BOrder,
                                                       false, Eigen::ColMajor, 1>;
    Eigen::internal::gemm_blocking_space<Eigen::ColMajor, Scalar, Scalar, Eigen::Dynamic,
                                         Eigen::Dynamic, Eigen::Dynamic, 1, false>
        blocking(m, n, k, 1, true);
    product::run(m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
}

/// What Eigen's BLAS-style products see of an operand: the plain object under transposes and
/// conjugates (`extract`), whether its memory can go to the kernel as it is, and whether a
/// scalar factor is folded into the expression.
template <class Xpr>
struct product_operand {
    using traits = Eigen::internal::blas_traits<Xpr>;
    static constexpr bool direct_access = traits::HasUsableDirectAccess;
    static constexpr bool scalar_factor = traits::HasScalarFactor;
    // DenseBase's public constant, not internal::inner_stride_at_compile_time (gone after 5.0).
    static constexpr bool unit_inner_stride = Xpr::InnerStrideAtCompileTime == 1;
    static decltype(auto) extract(const Xpr& x) { return traits::extract(x); }
};

// ---- Packet primitives ------------------------------------------------------------------------

/// The SIMD packet of Scalar for the instruction set the translation unit is compiled for, with
/// the few operations the tiled kernel needs. One packet of width 1 is a plain scalar
/// (EIGEN_DONT_VECTORIZE, or a type without SIMD support).
template <class Scalar>
struct packet_ops {
    using packet = typename Eigen::internal::packet_traits<Scalar>::type;
    static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;
    static constexpr bool has_exp = Eigen::internal::packet_traits<Scalar>::HasExp;
    /// 32 vector registers (AVX-512, NEON on AArch64) or fewer: sizes the register tiles.
    static constexpr bool many_registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;

    static MHA_ALWAYS_INLINE packet broadcast(Scalar x) {
        return Eigen::internal::pset1<packet>(x);
    }
    static MHA_ALWAYS_INLINE packet load(const Scalar* p) {
        return Eigen::internal::ploadu<packet>(p);
    }
    static MHA_ALWAYS_INLINE void store(Scalar* p, const packet& x) {
        Eigen::internal::pstoreu(p, x);
    }
    /// a·b + c, fused where the instruction set has FMA. A one-lane packet is a plain scalar,
    /// whose a·b + c the compiler may or may not contract depending on the code around it (g++
    /// -march=native fused it in a 6-column value tile and not in a 1-column one), so that a
    /// column's bits would depend on its tile: with FMA it is fused explicitly, always.
    static MHA_ALWAYS_INLINE packet mul_add(const packet& a, const packet& b, const packet& c) {
#ifdef __FMA__
        if constexpr (width == 1) return std::fma(a, b, c);  // packet is Scalar
#endif
        return Eigen::internal::pmadd(a, b, c);
    }
    static MHA_ALWAYS_INLINE packet add(const packet& a, const packet& b) {
        return Eigen::internal::padd(a, b);
    }
    static MHA_ALWAYS_INLINE packet sub(const packet& a, const packet& b) {
        return Eigen::internal::psub(a, b);
    }
    static MHA_ALWAYS_INLINE packet mul(const packet& a, const packet& b) {
        return Eigen::internal::pmul(a, b);
    }
    /// Lane-wise max, NaN when either lane is NaN.
    static MHA_ALWAYS_INLINE packet max_nan(const packet& a, const packet& b) {
        return Eigen::internal::pmax<Eigen::PropagateNaN>(a, b);
    }
    static MHA_ALWAYS_INLINE packet exp(const packet& x) {
        return Eigen::internal::pexp(x);
    }
    /// The sum of a's lanes (in the order Eigen's reduction takes them).
    static MHA_ALWAYS_INLINE Scalar sum(const packet& a) {
        return Eigen::internal::predux(a);
    }
    /// All bits set in the lanes where a == b, else zero.
    static MHA_ALWAYS_INLINE packet equal(const packet& a, const packet& b) {
        return Eigen::internal::pcmp_eq(a, b);
    }
    /// All bits set in the lanes where a < b (false for NaN), else zero.
    static MHA_ALWAYS_INLINE packet less(const packet& a, const packet& b) {
        return Eigen::internal::pcmp_lt(a, b);
    }
    /// The lanes set in either mask.
    static MHA_ALWAYS_INLINE packet either(const packet& a, const packet& b) {
        return Eigen::internal::por(a, b);
    }
    /// a with the lanes set in `mask` cleared to +0.
    static MHA_ALWAYS_INLINE packet clear_where(const packet& a, const packet& mask) {
        return Eigen::internal::pandnot(a, mask);
    }
};

}  // namespace eigen_compat
}  // namespace detail
}  // namespace mha
