// SPDX-License-Identifier: MIT
// Heads as views. Head h of a projected matrix is the row block [h·d, (h+1)·d): with one column
// per token in column-major storage, splitting heads is a view and concatenating them is a no-op.
#pragma once

#include <string>
#include <vector>

#include <mha/config.hpp>
#include <mha/projection.hpp>

namespace mha {

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

/// Output projection of the concatenated heads: out = w_o·heads + b_o.
///   heads : (H·d_v) × N,  w_o : E_out × (H·d_v),  b_o : E_out or size 0,  out : E_out × N.
template <class DW, class DB, class DH, class DO>
void output_projection(const Eigen::MatrixBase<DW>& w_o, const Eigen::MatrixBase<DB>& b_o,
                       const Eigen::MatrixBase<DH>& heads, const Eigen::MatrixBase<DO>& out) {
    linear(w_o, b_o, heads, out);
}

}  // namespace mha
