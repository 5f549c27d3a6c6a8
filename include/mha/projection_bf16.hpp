// SPDX-License-Identifier: MIT
/// @file
/// Linear projections on bfloat16 storage: out = w·x + b with w and x in Eigen::bfloat16, the
/// products summed in fp32 (detail/gemm_bf16.hpp: vdpbf16ps register tiles where the compiler
/// targets AVX512-BF16, fp32 GEMM on widened blocks elsewhere), and the result stored as float
/// or rounded once to bfloat16. The packing buffers are the caller's (bf16_linear_workspace), so
/// that a repeated call of the same shape allocates nothing.
#pragma once

#include <type_traits>
#include <vector>

#include <mha/core.hpp>
#include <mha/detail/aligned_vector.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/gemm_bf16.hpp>

namespace mha {

/// Buffers of the bfloat16 projections (`linear` with a workspace): the packed or widened
/// operands, one set per thread, and the fp32 result of a bfloat16 output. They only grow; once
/// they have served a shape (and a thread count), calls of that shape allocate nothing. One
/// workspace serves one call at a time.
class bf16_linear_workspace {
public:
    /// The GEMM's buffers.
    detail::bf16_gemm_buffers& gemm() { return gemm_; }
    /// Room for an fp32 result of `size` elements (a bfloat16 output is rounded from it).
    float* result(Index size) {
        detail::grow(result_, size);
        return result_.data();
    }
    /// Room for the bias in fp32, `size` elements.
    float* bias(Index size) {
        detail::grow(bias_, size);
        return bias_.data();
    }

private:
    detail::bf16_gemm_buffers gemm_;
    detail::aligned_vector<float> result_, bias_;  // the result: where AMX tiles store C
};

namespace detail {

/// A bf16 operand view of an Eigen expression with direct access.
template <class Derived>
bf16_operand bf16_operand_of(const Eigen::MatrixBase<Derived>& m) {
    const auto& d = m.derived();
    constexpr bool row_major = (Derived::Flags & Eigen::RowMajorBit) != 0;
    return {d.data(), row_major ? d.outerStride() : d.innerStride(),
            row_major ? d.innerStride() : d.outerStride()};
}

/// `linear` on bfloat16 with the GEMM implementation `kernel` (the public overload takes the
/// one the translation unit is compiled for; tests force either), and w's panels when the
/// caller keeps them (`packed_w`, a view of w itself: bf16_packed_matrix).
template <class DW, class DB, class DX, class DO>
void linear_bf16(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
                 const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out_,
                 bf16_linear_workspace& workspace, int threads, bf16_kernel kernel,
                 bf16_prepacked_a packed_w = {}) {
    using bf16 = Eigen::bfloat16;
    using OutScalar = typename DO::Scalar;
    using BiasScalar = typename DB::Scalar;
    static_assert(
        std::is_same_v<typename DW::Scalar, bf16> && std::is_same_v<typename DX::Scalar, bf16>,
        "mha: the bfloat16 linear takes w and x as Eigen::bfloat16");
    static_assert(std::is_same_v<BiasScalar, float> || std::is_same_v<BiasScalar, bf16>,
                  "mha: the bias of the bfloat16 linear is float or Eigen::bfloat16");
    static_assert(std::is_same_v<OutScalar, float> || std::is_same_v<OutScalar, bf16>,
                  "mha: the output of the bfloat16 linear is float or Eigen::bfloat16");
    static_assert((DW::Flags & Eigen::DirectAccessBit) && (DX::Flags & Eigen::DirectAccessBit),
                  "mha: the bfloat16 linear reads w and x in place: pass matrices, maps or "
                  "blocks of them (evaluate an expression into a bfloat16 matrix first)");
    constexpr const char* where = "mha::linear (bfloat16)";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    check_size(where, "x.rows()", w.cols(), x.rows(), "w.cols()");
    if (b.size() != 0) {
        check_size(where, "b.size()", w.rows(), b.size(), "w.rows() or 0");
        check_size(where, "b.cols()", 1, b.cols(), "a column vector");
    }
    check_size(where, "out.rows()", w.rows(), out.rows(), "w.rows()");
    check_size(where, "out.cols()", x.cols(), out.cols(), "x.cols()");
    const Index m = w.rows(), n = x.cols(), k = w.cols();
    if (m == 0 || n == 0) return;

    // The fp32 result: `out` itself when it is a column-major float matrix with unit inner
    // stride, else the workspace's buffer, rounded or copied into `out` at the end.
    constexpr bool in_place =
        std::is_same_v<OutScalar, float> && (DO::Flags & Eigen::DirectAccessBit) &&
        !(DO::Flags & Eigen::RowMajorBit) && DO::InnerStrideAtCompileTime == 1;
    float* c;
    Index ldc;
    if constexpr (in_place) {
        c = out.derived().data();
        ldc = out.derived().outerStride();
    } else {
        c = workspace.result(m * n);
        ldc = m;
    }
    // The bias (in fp32) is the sums' first term: no pass over the result for it.
    float* bias = nullptr;
    if (b.size() != 0) {
        bias = workspace.bias(m);
        for (Index i = 0; i < m; ++i)
            bias[i] = static_cast<float>(b.col(0).coeff(i));
    }
    gemm_bf16(m, n, k, bf16_operand_of(w), bf16_operand_of(x), c, ldc, false, bias,
              workspace.gemm(), threads, kernel, packed_w);
    if constexpr (!in_place) {
        // A bfloat16 output is the fp32 result rounded once (nearest-even).
        constexpr bool bf16_columns =
            std::is_same_v<OutScalar, bf16> && (DO::Flags & Eigen::DirectAccessBit) &&
            !(DO::Flags & Eigen::RowMajorBit) && DO::InnerStrideAtCompileTime == 1;
        if constexpr (bf16_columns) {
            for (Index j = 0; j < n; ++j)
                store_rounded_bf16(c + j * ldc,
                                   out.derived().data() + j * out.derived().outerStride(), m);
        } else {
            for (Index j = 0; j < n; ++j)
                for (Index i = 0; i < m; ++i)
                    out.coeffRef(i, j) = static_cast<OutScalar>(c[j * ldc + i]);
        }
    }
}

}  // namespace detail

/// out = w·x + b·1ᵀ on bfloat16 storage, with fp32 sums.
///   w   : d_out × d_in, Eigen::bfloat16 (row- or column-major; matrix, map or block)
///   b   : d_out × 1, float or Eigen::bfloat16, or size 0 for no bias
///   x   : d_in × N, Eigen::bfloat16       (one column per token)
///   out : d_out × N, float, or Eigen::bfloat16 (the fp32 result rounded once); must not
///         overlap x or w
/// Every output is the fp32 sum of the exact bf16 products (and the bias), so
/// |out − w·x − b| ≤ γ_{d_in+1}·(Σ|w||x| + |b|) with γ_n = n·u/(1 − n·u), u = 2⁻²⁴, plus 2⁻⁸·|out|
/// for a bfloat16 output. `workspace` keeps the packing buffers between calls (a call of a shape
/// it has served allocates nothing). Runs on `threads` threads (0: OpenMP's default), splitting
/// the tokens; the result is the same bits for any thread count. Throws shape_error naming the
/// argument when the shapes do not fit.
template <class DW, class DB, class DX, class DO>
void linear(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
            const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out,
            bf16_linear_workspace& workspace, int threads = 0) {
    detail::linear_bf16(w, b, x, out, workspace, threads, detail::default_bf16_kernel);
}

}  // namespace mha
