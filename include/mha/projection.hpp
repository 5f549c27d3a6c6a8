// SPDX-License-Identifier: MIT
/// @file
/// Linear projections y = W·x + b applied to every token (column) at once (one GEMM), and the
/// views that split a projection into Q, K, V and heads. Head h of a projected matrix is the row
/// block [h·d, (h+1)·d): with one column per token in column-major storage, splitting heads is a
/// view and concatenating them is a no-op.
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include <mha/core.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/tiled_product.hpp>

namespace mha {

namespace detail {

/// The shapes of out = w·x + b·1ᵀ (b of size 0: no bias), or shape_error naming the argument.
inline void check_linear_shapes(Index w_rows, Index w_cols, Index b_size, Index x_rows,
                                Index x_cols, Index out_rows, Index out_cols) {
    constexpr const char* where = "mha::linear";
    check_size(where, "x.rows()", w_cols, x_rows, "w.cols()");
    if (b_size != 0) check_size(where, "b.size()", w_rows, b_size, "w.rows() or 0");
    check_size(where, "out.rows()", w_rows, out_rows, "w.rows()");
    check_size(where, "out.cols()", x_cols, out_cols, "x.cols()");
}

/// `linear`. Float and double operands stored column-major go through tiled_product (the
/// attention kernel's register tiles; detail/tiled_product.hpp); others through Eigen's product,
/// with the GEMM's packing buffers in `gemm` (see product_into; null: where Eigen puts them).
template <class DW, class DB, class DX, class DO>
void linear_into(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
                 const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out_,
                 std::vector<gemm_buffers<typename DX::Scalar>>* gemm) {
    using Scalar = typename DX::Scalar;
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    check_linear_shapes(w.rows(), w.cols(), b.size(), x.rows(), x.cols(), out.rows(), out.cols());
    if constexpr (tiled_product_scalar<Scalar> && std::is_same_v<typename DW::Scalar, Scalar> &&
                  column_major_storage<DW> && column_major_storage<DX> &&
                  column_major_storage<DO>) {
        tiled_product(w.rows(), x.cols(), w.cols(), w.derived().data(), w.derived().outerStride(),
                      x.derived().data(), x.derived().outerStride(), out.derived().data(),
                      out.derived().outerStride(), 0);
    } else {
        product_into(out.derived(), w.derived(), x.derived(), Scalar(1), gemm);
    }
    if (b.size() != 0) out.colwise() += b.col(0);
}

/// `linear` with w kept in panels (row_panels): the layer's projections. x and out must be
/// column-major with unit inner stride (the layer's inputs and workspace matrices are).
template <class Scalar, class DB, class DX, class DO>
void linear_into(const row_panels<Scalar>& w, const Eigen::MatrixBase<DB>& b,
                 const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out_) {
    static_assert(column_major_storage<DX> && column_major_storage<DO>,
                  "mha: the packed weight's product reads x and writes out through pointers");
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    check_linear_shapes(w.rows(), w.cols(), b.size(), x.rows(), x.cols(), out.rows(), out.cols());
    tiled_product(w.all(), x.cols(), x.derived().data(), x.derived().outerStride(),
                  out.derived().data(), out.derived().outerStride(), 0);
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

/// A weight (d_out × d_in, float or double) copied once into the panels `linear` multiplies
/// from, for a weight that many calls read: `linear` otherwise copies w into panels on every
/// call, or, for up to 6 columns of x (a decoding step's tokens), reads its columns a column
/// stride apart. The layer keeps its own weights this way. The same memory as w; the results
/// are the same bits as `linear` with w itself.
template <class Scalar>
class prepacked_weight {
    static_assert(detail::tiled_product_scalar<Scalar>,
                  "mha::prepacked_weight: Scalar must be float or double");

public:
    prepacked_weight() = default;
    /// Copies w (any expression of Scalar, e.g. a block or a Map) into the panels.
    template <class Derived>
    explicit prepacked_weight(const Eigen::MatrixBase<Derived>& w) {
        static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                      "mha::prepacked_weight: w must hold the weight's Scalar");
        if constexpr (detail::column_major_storage<Derived>) {
            panels_ = detail::row_panels<Scalar>(w.derived());
        } else {
            const matrix<Scalar> plain = w;  // row-major or an expression: evaluated once
            panels_ = detail::row_panels<Scalar>(plain);
        }
    }
    Index rows() const { return panels_.rows(); }  ///< d_out
    Index cols() const { return panels_.cols(); }  ///< d_in
    /// The weight it was packed from, exactly.
    matrix<Scalar> unpacked() const { return panels_.unpacked(); }
    /// The panels (for the library's products).
    const detail::row_panels<Scalar>& panels() const { return panels_; }

private:
    detail::row_panels<Scalar> panels_;
};

/// out = w·x + b·1ᵀ with a weight packed once (see prepacked_weight); b, x and out as for
/// `linear`. x and out in column-major storage with unit inner stride (plain matrices, their
/// column blocks, Maps) are read and written in place; others go through a column-major copy.
template <class Scalar, class DB, class DX, class DO>
void linear(const prepacked_weight<Scalar>& w, const Eigen::MatrixBase<DB>& b,
            const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out_) {
    static_assert(
        std::is_same_v<typename DX::Scalar, Scalar> && std::is_same_v<typename DO::Scalar, Scalar>,
        "mha::linear: x and out must hold the prepacked weight's Scalar");
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    if constexpr (detail::column_major_storage<DX> && detail::column_major_storage<DO>) {
        detail::linear_into(w.panels(), b, x, out);
    } else {
        // Shapes first: a copy of the wrong shape would be made before any error.
        detail::check_linear_shapes(w.rows(), w.cols(), b.size(), x.rows(), x.cols(), out.rows(),
                                    out.cols());
        auto into = [&](const auto& plain_x) {
            if constexpr (detail::column_major_storage<DO>) {
                detail::linear_into(w.panels(), b, plain_x, out);
            } else {
                matrix<Scalar> plain_out(out.rows(), out.cols());
                detail::linear_into(w.panels(), b, plain_x, plain_out);
                out = plain_out;
            }
        };
        if constexpr (detail::column_major_storage<DX>)
            into(x);
        else
            into(matrix<Scalar>(x));
    }
}

/// Returns w·x + b·1ᵀ with a weight packed once (see the overload writing into `out`).
template <class Scalar, class DB, class DX>
matrix<Scalar> linear(const prepacked_weight<Scalar>& w, const Eigen::MatrixBase<DB>& b,
                      const Eigen::MatrixBase<DX>& x) {
    matrix<Scalar> out(w.rows(), x.cols());
    linear(w, b, x, out);
    return out;
}

/// Views of Q, K and V inside a fused projection result (no copies).
template <class Derived>
struct qkv_views {
    Eigen::Block<Derived> q;  ///< the query rows
    Eigen::Block<Derived> k;  ///< the key rows
    Eigen::Block<Derived> v;  ///< the value rows
};

/// Fused Q/K/V projection: `linear` with the stacked weight
///   w_qkv = [W_q; W_k; W_v] : (q_width + k_width + v_width) × d_in,   b_qkv likewise (or size 0),
/// is one GEMM whose result holds Q in rows [0, q_width), K in the next k_width rows and V in the
/// last v_width. Splits such a result into those row blocks (with grouped heads K and V are
/// narrower than Q). Throws shape_error if the widths do not add up to `qkv.rows()`.
template <class Derived>
qkv_views<Derived> split_qkv(Eigen::MatrixBase<Derived>& qkv, Index q_width, Index k_width,
                             Index v_width) {
    constexpr const char* where = "mha::split_qkv";
    if (q_width < 0) detail::fail<value_error>(where, "q_width", ">= 0", q_width);
    if (k_width < 0) detail::fail<value_error>(where, "k_width", ">= 0", k_width);
    if (v_width < 0) detail::fail<value_error>(where, "v_width", ">= 0", v_width);
    const Index rows = detail::checked_add<value_error>(
        where, "q_width + k_width + v_width",
        detail::checked_add<value_error>(where, "q_width + k_width", q_width, k_width), v_width);
    detail::check_size(where, "qkv.rows()", rows, qkv.rows(), "q_width + k_width + v_width");
    auto& m = qkv.derived();
    // Zero tokens: the matrix may have no storage (a null data pointer), and a block starting at
    // a later row would offset that null pointer, which is undefined. Empty blocks at row 0 have
    // the same shapes and no element to tell them apart.
    if (m.cols() == 0)
        return {m.middleRows(0, q_width), m.middleRows(0, k_width), m.middleRows(0, v_width)};
    return {m.middleRows(0, q_width), m.middleRows(q_width, k_width),
            m.middleRows(q_width + k_width, v_width)};
}

/// The split of a fused projection with as many key/value heads as query heads: Q and K of
/// width qk_width, V of width v_width.
template <class Derived>
qkv_views<Derived> split_qkv(Eigen::MatrixBase<Derived>& qkv, Index qk_width, Index v_width) {
    if (qk_width < 0) detail::fail<value_error>("mha::split_qkv", "qk_width", ">= 0", qk_width);
    if (v_width < 0) detail::fail<value_error>("mha::split_qkv", "v_width", ">= 0", v_width);
    const Index rows = detail::checked_add<value_error>(
        "mha::split_qkv", "2*qk_width + v_width",
        detail::checked_add<value_error>("mha::split_qkv", "2*qk_width", qk_width, qk_width),
        v_width);
    detail::check_size("mha::split_qkv", "qkv.rows()", rows, qkv.rows(), "2*qk_width + v_width");
    return split_qkv(qkv, qk_width, qk_width, v_width);
}

namespace detail {
// Checks a head index against a stacked matrix and returns the head's width.
inline Index head_width(Index rows, Index h, Index num_heads) {
    constexpr const char* where = "mha::head_view";
    if (num_heads <= 0) fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (rows % num_heads != 0)
        fail<shape_error>(where, "rows()", "a multiple of num_heads = " + std::to_string(num_heads),
                          rows);
    if (h < 0 || h >= num_heads)
        fail<value_error>(where, "h", "in [0, " + std::to_string(num_heads) + ")", h);
    return rows / num_heads;
}
}  // namespace detail

/// Rows of head `h` in a matrix holding `num_heads` heads stacked by rows (`(H·d) × N`):
/// a `d × N` block, writable if `stacked` is. No copy.
template <class Derived>
auto head_view(Eigen::MatrixBase<Derived>& stacked, Index h, Index num_heads) {
    const Index d = detail::head_width(stacked.rows(), h, num_heads);
    return stacked.derived().middleRows(h * d, d);
}

/// The same, read-only, for a const matrix.
template <class Derived>
auto head_view(const Eigen::MatrixBase<Derived>& stacked, Index h, Index num_heads) {
    const Index d = detail::head_width(stacked.rows(), h, num_heads);
    return stacked.derived().middleRows(h * d, d);
}

/// Stacks per-head outputs (each `d_h × N`) by rows into `(Σ d_h) × N`. Only needed for heads
/// computed separately; the layer writes each head into its rows of one buffer directly.
template <class Scalar>
matrix<Scalar> concat_heads(const std::vector<matrix<Scalar>>& heads) {
    Index rows = 0;
    const Index cols = heads.empty() ? 0 : heads.front().cols();
    for (std::size_t h = 0; h < heads.size(); ++h) {
        detail::check_size("mha::concat_heads", "heads[" + std::to_string(h) + "].cols()", cols,
                           heads[h].cols(), "heads[0].cols()");
        rows += heads[h].rows();
    }
    matrix<Scalar> out(rows, cols);
    Index at = 0;
    for (const auto& head : heads) {
        out.middleRows(at, head.rows()) = head;
        at += head.rows();
    }
    return out;
}

}  // namespace mha
