// SPDX-License-Identifier: MIT
// Linear projections y = W·x + b applied to every token (column) at once: one GEMM.
#pragma once

#include <vector>

#include <mha/config.hpp>
#include <mha/detail/gemm.hpp>

namespace mha {

namespace detail {

/// `linear` with the GEMM's packing buffers in `gemm` (see product_into); null: Eigen's product.
template <class DW, class DB, class DX, class DO>
void linear_into(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
                 const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out_,
                 std::vector<gemm_buffers<typename DX::Scalar>>* gemm) {
    constexpr const char* where = "mha::linear";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    check_size(where, "x.rows()", w.cols(), x.rows(), "w.cols()");
    if (b.size() != 0) check_size(where, "b.size()", w.rows(), b.size(), "w.rows() or 0");
    check_size(where, "out.rows()", w.rows(), out.rows(), "w.rows()");
    check_size(where, "out.cols()", x.cols(), out.cols(), "x.cols()");
    product_into(out.derived(), w.derived(), x.derived(), typename DX::Scalar(1), gemm);
    if (b.size() != 0) out.colwise() += b.col(0);
}

}  // namespace detail

/// out = w·x + b·1ᵀ.
///   w   : d_out × d_in      (PyTorch `Linear.weight`, same bytes)
///   b   : d_out, or size 0 for no bias
///   x   : d_in × N          (one column per token)
///   out : d_out × N         (must not alias x)
template <class DW, class DB, class DX, class DO>
void linear(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
            const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out_) {
    detail::linear_into(w, b, x, out_, nullptr);
}

/// Returns w·x + b·1ᵀ (see the overload writing into `out`).
template <class DW, class DB, class DX>
matrix<typename DX::Scalar> linear(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
                                   const Eigen::MatrixBase<DX>& x) {
    matrix<typename DX::Scalar> out(w.rows(), x.cols());
    linear(w, b, x, out);
    return out;
}

/// Fused Q/K/V projection: one GEMM with the stacked weight
///   w_qkv = [W_q; W_k; W_v] : (2·qk_width + v_width) × d_in,   b_qkv likewise (or size 0).
/// The result `qkv` holds Q in rows [0, qk), K in [qk, 2qk), V in [2qk, 2qk + v); use
/// `split_qkv` to view them without copying.
template <class DW, class DB, class DX, class DO>
void project_qkv(const Eigen::MatrixBase<DW>& w_qkv, const Eigen::MatrixBase<DB>& b_qkv,
                 const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& qkv) {
    linear(w_qkv, b_qkv, x, qkv);
}

/// Views of Q, K and V inside a fused projection result (no copies).
template <class Derived>
struct qkv_views {
    Eigen::Block<Derived> q, k, v;
};

/// Splits `qkv` (as produced by `project_qkv`) into row blocks of widths qk_width, qk_width and
/// v_width. Throws shape_error if the widths do not add up to `qkv.rows()`.
template <class Derived>
qkv_views<Derived> split_qkv(Eigen::MatrixBase<Derived>& qkv, Index qk_width, Index v_width) {
    if (qk_width < 0) detail::fail<value_error>("mha::split_qkv", "qk_width", ">= 0", qk_width);
    if (v_width < 0) detail::fail<value_error>("mha::split_qkv", "v_width", ">= 0", v_width);
    detail::check_size("mha::split_qkv", "qkv.rows()", 2 * qk_width + v_width, qkv.rows(),
                       "2*qk_width + v_width");
    auto& m = qkv.derived();
    return {m.middleRows(0, qk_width), m.middleRows(qk_width, qk_width),
            m.middleRows(2 * qk_width, v_width)};
}

}  // namespace mha
