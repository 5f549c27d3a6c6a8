// SPDX-License-Identifier: MIT
// Eigen's GEMM kernel with its packing buffers kept by the caller.
//
// `dst.noalias() = a * b` packs blocks of a and b into buffers that Eigen allocates per product:
// on the stack below EIGEN_STACK_ALLOCATION_LIMIT (128 KiB), on the heap above it, so every
// large product allocates and frees. The functions here run the same kernel with the same
// blocking sizes, but pack into `gemm_buffers` that the caller keeps between calls and that only
// grow: once they are large enough for a shape, products of that shape allocate nothing. The
// results are those of Eigen's single-threaded product, bit for bit (same kernel, same blocks).
//
// Threads. Eigen's own OpenMP GEMM allocates (per-thread packing, its parallel-info array), so
// the layer never uses it: `product_into` splits the columns of the result into one range per
// thread, each computed by the single-threaded kernel with the blocking sizes of the whole
// product and the thread's own buffers. Ranges start at multiples of the kernel's column tile
// (nr), so every column goes through the same micro-kernel code with the same k-blocks as in one
// serial product: the result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/eigen_compat.hpp>
#include <mha/detail/parallel.hpp>

namespace mha {
namespace detail {

/// Packing buffers for Eigen's GEMM kernel (its blockA and blockB). They only grow. A product
/// writes into them, so one set serves one thread at a time.
template <class Scalar>
class gemm_buffers {
public:
    /// Room for packed blocks of `size_a` and `size_b` scalars; allocates only to grow.
    void reserve(Index size_a, Index size_b) {
        if (a_.size() < size_a) a_.resize(size_a);
        if (b_.size() < size_b) b_.resize(size_b);
    }
    Scalar* a() { return a_.data(); }
    Scalar* b() { return b_.data(); }
    Index size_a() const { return a_.size(); }
    Index size_b() const { return b_.size(); }

private:
    // Eigen vectors, not std::vector: the kernel reads packed blocks with aligned packet loads,
    // and Eigen's allocator gives the alignment it expects.
    vector<Scalar> a_, b_;
};

using eigen_compat::gemm_blocking;

/// Points `blocking` at `buffers`, growing them if they are too small for its blocks.
template <class Scalar>
void use_buffers(gemm_blocking<Scalar>& blocking, gemm_buffers<Scalar>& buffers) {
    buffers.reserve(blocking.packed_a_size(), blocking.packed_b_size());
    blocking.set_buffers(buffers.a(), buffers.b());
}

/// C (m×n, column-major, ldc) += alpha·A·B by Eigen's GEMM kernel on the calling thread, with A
/// m×k in AOrder and B k×n in BOrder (inner stride 1). With `buffers` the packing goes there;
/// without, where Eigen puts it (the stack, or the heap above EIGEN_STACK_ALLOCATION_LIMIT).
template <class Scalar, int AOrder, int BOrder = Eigen::ColMajor>
void gemm_kernel_add(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                     Index ldb, Scalar* c, Index ldc, Scalar alpha, gemm_buffers<Scalar>* buffers) {
    if (buffers != nullptr) {
        gemm_blocking<Scalar> blocking(m, n, k);
        use_buffers(blocking, *buffers);
        eigen_compat::gemm_run<Scalar, AOrder, BOrder>(m, n, k, a, lda, b, ldb, c, ldc, alpha,
                                                       blocking);
        return;
    }
    eigen_compat::gemm_run_eigen_buffers<Scalar, AOrder, BOrder>(m, n, k, a, lda, b, ldb, c, ldc,
                                                                 alpha);
}

/// Grows every buffer set of `states` (each has a `gemm_buffers<Scalar> gemm`) to the largest
/// of them. Buffers grow where a product runs; when tasks go to threads dynamically, a later
/// call may run a product on a thread that has not needed that size yet. Equal buffers after a
/// call leave room for every product of that call on every thread.
template <class States>
void equalize_gemm_buffers(States& states) {
    Index size_a = 0, size_b = 0;
    for (const auto& state : states) {
        size_a = std::max(size_a, state.gemm.size_a());
        size_b = std::max(size_b, state.gemm.size_b());
    }
    for (auto& state : states)
        state.gemm.reserve(size_a, size_b);
}

/// The GEMM buffers of the calling thread while a kernel that owns them runs, else null.
/// Code that cannot take buffers as an argument (it runs under a fixed signature) finds them
/// here; set them with scoped_gemm_buffers.
template <class Scalar>
gemm_buffers<Scalar>*& thread_gemm_buffers() {
    static thread_local gemm_buffers<Scalar>* current = nullptr;
    return current;
}

/// Makes `buffers` the calling thread's GEMM buffers for its lifetime.
template <class Scalar>
class scoped_gemm_buffers {
public:
    explicit scoped_gemm_buffers(gemm_buffers<Scalar>* buffers)
        : previous_(thread_gemm_buffers<Scalar>()) {
        thread_gemm_buffers<Scalar>() = buffers;
    }
    ~scoped_gemm_buffers() { thread_gemm_buffers<Scalar>() = previous_; }
    scoped_gemm_buffers(const scoped_gemm_buffers&) = delete;
    scoped_gemm_buffers& operator=(const scoped_gemm_buffers&) = delete;

private:
    gemm_buffers<Scalar>* previous_;
};

/// C (m×n, column-major, ldc) += alpha · A·B with A m×k (column-major, or row-major when
/// AOrder = RowMajor, i.e. the transpose of a column-major k×m) and B k×n column-major.
/// Always single-threaded: Eigen's GEMM kernel is called without parallel info. The GEMM packs
/// into `buffers` when given (see detail/gemm.hpp), else where Eigen puts it.
template <class Scalar, int AOrder>
void serial_gemm_add(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                     Index ldb, Scalar* c, Index ldc, Scalar alpha, gemm_buffers<Scalar>* buffers) {
    if (m == 0 || n == 0 || k == 0) return;
    using a_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, AOrder>;
    if (n == 1 || m + n + k < eigen_compat::coeff_based_product_threshold) {
        // GEMV and tiny products: Eigen never parallelises these, nor allocates for them.
        Eigen::Map<const a_type, 0, Eigen::OuterStride<>> am(a, m, k, Eigen::OuterStride<>(lda));
        Eigen::Map<const matrix<Scalar>, 0, Eigen::OuterStride<>> bm(b, k, n,
                                                                     Eigen::OuterStride<>(ldb));
        Eigen::Map<matrix<Scalar>, 0, Eigen::OuterStride<>> cm(c, m, n, Eigen::OuterStride<>(ldc));
        cm.noalias() += alpha * (am * bm);
        return;
    }
    gemm_kernel_add<Scalar, AOrder>(m, n, k, a, lda, b, ldb, c, ldc, alpha, buffers);
}

/// As above, packing into the calling thread's GEMM buffers when the tiled driver has bound
/// them (thread_gemm_buffers), so that block products inside the kernel allocate nothing.
template <class Scalar, int AOrder>
void serial_gemm_add(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                     Index ldb, Scalar* c, Index ldc, Scalar alpha) {
    serial_gemm_add<Scalar, AOrder>(m, n, k, a, lda, b, ldb, c, ldc, alpha,
                                    thread_gemm_buffers<Scalar>());
}

/// The general case of product_into (see there): dst = alpha·lhs·rhs by the GEMM kernel, split
/// by columns over threads.
template <class Scalar, class Dst, class Lhs, class Rhs>
void gemm_kernel_product(Dst& dst, const Lhs& lhs, const Rhs& rhs, Scalar alpha,
                         std::vector<gemm_buffers<Scalar>>& buffer_set, int threads) {
    const Index m = dst.rows(), n = dst.cols(), k = lhs.cols();
    dst.setZero();
    if (m == 0 || n == 0 || k == 0) return;
    // References: extract() returns a plain operand itself, which a copy would allocate.
    const auto& a = eigen_compat::product_operand<Lhs>::extract(lhs);
    const auto& b = eigen_compat::product_operand<Rhs>::extract(rhs);
    using a_type = std::remove_cv_t<std::remove_reference_t<decltype(a)>>;
    using b_type = std::remove_cv_t<std::remove_reference_t<decltype(b)>>;
    constexpr int a_order =
        (a_type::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
    constexpr int b_order =
        (b_type::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
    constexpr Index nr = eigen_compat::gemm_column_tile<Scalar>;
    const Scalar* a_data = a.data();
    const Scalar* b_data = b.data();
    const Index lda = a.outerStride(), ldb = b.outerStride();
    Scalar* c_data = dst.data();
    const Index ldc = dst.outerStride();
    // Column j of B starts at b_data + j·ldb when column-major, b_data + j when row-major.
    const Index b_column_step = b_order == Eigen::ColMajor ? ldb : 1;

    // Blocking of the whole product, shared by every column range: the k-blocks, hence the
    // order of the sums, are those of one serial product.
    gemm_blocking<Scalar> blocking(m, n, k);
    // Eigen's rule of thumb for when a thread pays off: at least nr columns and 50 000
    // multiply-adds each.
    const double work = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    int nt = static_cast<int>(std::min<double>(
        {static_cast<double>(thread_count(threads)), static_cast<double>(n / nr), work / 50000.0}));
    nt = std::max(nt, 1);
    if (buffer_set.size() < static_cast<std::size_t>(nt))
        buffer_set.resize(static_cast<std::size_t>(nt));
    auto columns = [&](Index part, gemm_buffers<Scalar>& own) {
        // Ranges of whole nr-column tiles; the last range takes the remainder.
        const Index tiles = (n + nr - 1) / nr;
        const Index j0 = std::min(n, tiles * part / nt * nr);
        const Index j1 = part + 1 == nt ? n : std::min(n, tiles * (part + 1) / nt * nr);
        if (j0 >= j1) return;
        gemm_blocking<Scalar> range_blocking = blocking;
        use_buffers(range_blocking, own);
        eigen_compat::gemm_run<Scalar, a_order, b_order>(
            m, j1 - j0, k, a_data, lda, b_data + j0 * b_column_step, ldb, c_data + j0 * ldc, ldc,
            alpha, range_blocking);
    };
    parallel_parts(nt, [&](int part, int thread) {
        columns(part, buffer_set[static_cast<std::size_t>(thread)]);
    });
}

/// Whether product_into can hand lhs·rhs → dst to the GEMM kernel directly: operands with
/// inner stride 1 (or transposes of such), no scalar factor folded in, a column-major result
/// with inner stride 1. Other expressions go to Eigen as they are.
template <class Dst, class Lhs, class Rhs>
inline constexpr bool gemm_kernel_operands = [] {
    using lhs = eigen_compat::product_operand<Lhs>;
    using rhs = eigen_compat::product_operand<Rhs>;
    return lhs::direct_access && rhs::direct_access && !lhs::scalar_factor && !rhs::scalar_factor &&
           lhs::unit_inner_stride && rhs::unit_inner_stride && !(Dst::Flags & Eigen::RowMajorBit) &&
           Dst::InnerStrideAtCompileTime == 1;
}();

/// dst = alpha·lhs·rhs (dst must not alias lhs or rhs).
///
/// Without `buffers`: Eigen's `dst.noalias() = alpha * (lhs * rhs)`, as it is.
/// With `buffers` (one per thread, index omp_get_thread_num(); grown here to the thread count):
/// the same result as Eigen on one thread, with no allocation once the buffers have served this
/// shape. Eigen's size rules are kept: the coefficient-based product below
/// EIGEN_GEMM_TO_COEFFBASED_THRESHOLD and GEMV for one column allocate nothing anyway; the
/// general case, including a single row, runs the GEMM kernel split over `threads` threads
/// (0: OpenMP's default) as described at the top of this file.
template <class Scalar, class Dst, class Lhs, class Rhs>
void product_into(Dst&& dst, const Lhs& lhs, const Rhs& rhs, Scalar alpha,
                  std::vector<gemm_buffers<Scalar>>* buffers, int threads = 0) {
    if constexpr (!gemm_kernel_operands<std::decay_t<Dst>, Lhs, Rhs>) {
        dst.noalias() = alpha * (lhs * rhs);
        (void)buffers;
        (void)threads;
    } else {
        const Index m = dst.rows(), n = dst.cols(), k = lhs.cols();
        if (buffers == nullptr ||
            (k + m + n < eigen_compat::coeff_based_product_threshold && k > 0) || n == 1) {
            dst.noalias() = alpha * (lhs * rhs);
            return;
        }
        gemm_kernel_product(dst, lhs, rhs, alpha, *buffers, threads);
    }
}

}  // namespace detail
}  // namespace mha
