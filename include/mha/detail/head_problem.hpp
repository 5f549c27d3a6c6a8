// SPDX-License-Identifier: MIT
// How a multi-head call over a packed batch splits into (sequence, head) problems: which rows
// and columns of Q, K, V and the output one problem reads and writes, and which key/value head a
// query head reads. Every kernel takes its views from here, so the mapping is written once.
#pragma once

#include <string>

#include <Eigen/Core>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

template <class Scalar>
using const_matrix_ref = Eigen::Ref<const matrix<Scalar>, 0, Eigen::OuterStride<>>;
template <class Scalar>
using matrix_ref = Eigen::Ref<matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Heads stacked by rows: query head h owns rows [h·d_k, (h+1)·d_k) of Q and [h·d_v, (h+1)·d_v)
/// of the output; it reads key/value head kv_head(h), rows [g·d_k, (g+1)·d_k) of K and
/// [g·d_v, (g+1)·d_v) of V. Query heads h of one group (num_heads / num_kv_heads consecutive
/// heads) share their K and V by index, never by copy.
struct head_layout {
    Index num_heads = 1;
    Index num_kv_heads = 1;  ///< divides num_heads; equal to it without grouping
    Index dk = 0;            ///< per-head query/key width
    Index dv = 0;            ///< per-head value width

    Index kv_head(Index h) const { return h / (num_heads / num_kv_heads); }
    Index q_row(Index h) const { return h * dk; }
    Index k_row(Index h) const { return kv_head(h) * dk; }
    Index v_row(Index h) const { return kv_head(h) * dv; }
    Index out_row(Index h) const { return h * dv; }
};

/// The layout of `num_heads` query heads over Q rows `q_rows` and output rows, sharing
/// `num_kv_heads` key/value heads with V rows `v_rows`; throws naming the argument that does not
/// divide.
inline head_layout make_head_layout(const char* where, Index num_heads, Index num_kv_heads,
                                    Index q_rows, Index v_rows) {
    if (num_heads <= 0) fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (num_kv_heads <= 0) fail<value_error>(where, "num_kv_heads", ">= 1", num_kv_heads);
    if (num_heads % num_kv_heads != 0)
        fail<shape_error>(where, "num_heads",
                          "a multiple of num_kv_heads = " + std::to_string(num_kv_heads),
                          num_heads);
    if (q_rows % num_heads != 0)
        fail<shape_error>(where, "q.rows()",
                          "a multiple of num_heads = " + std::to_string(num_heads), q_rows);
    // Without grouping the key/value head count is the query head count, named as the caller
    // knows it.
    const char* kv_name = num_kv_heads == num_heads ? "num_heads = " : "num_kv_heads = ";
    if (v_rows % num_kv_heads != 0)
        fail<shape_error>(where, "v.rows()",
                          "a multiple of " + (kv_name + std::to_string(num_kv_heads)), v_rows);
    return {num_heads, num_kv_heads, q_rows / num_heads, v_rows / num_kv_heads};
}

/// Where one sequence's keys and values live when they are not columns of the problem's packed K
/// and V (a decode step reads each sequence's own cache): key j of the sequence starts at
/// k + j·k_stride and value j at v + j·v_stride, each holding every key/value head stacked.
template <class Scalar>
struct sequence_keys_values {
    const Scalar* k;
    const Scalar* v;
    Index k_stride, v_stride;
};

/// A validated multi-head call over a packed batch, as the kernels receive it:
///   q : (H·d_k) × Nq,  k : (H_kv·d_k) × Nk,  v : (H_kv·d_v) × Nk,  out : (H·d_v) × Nq
/// with Nq and Nk the batch's total query and key counts. With `per_sequence` (one entry per
/// sequence) the keys and values are read there instead, and k and v are not read.
template <class Scalar>
struct attention_problem {
    const_matrix_ref<Scalar> q, k, v;
    mutable matrix_ref<Scalar> out;  // a view: a const problem still writes its output
    head_layout heads;
    const packed_batch& batch;
    const attention_mask<Scalar>& mask;  ///< validated against batch and heads
    Scalar scale;
    normalization normalize;
    attention_request request;
    const sequence_keys_values<Scalar>* per_sequence;  ///< null: keys and values in k and v
    /// Soft-capping, ALiBi and sinks (validated by check_score_terms); null: none.
    const attention_options* terms = nullptr;
};

/// One (sequence, head): strided views of its Q, K, V, output and log-sum-exp, and its mask.
template <class Scalar>
struct head_problem {
    const Scalar* q;  // query i at q + i·q_stride, dk entries
    const Scalar* k;  // key j at k + j·k_stride, dk entries
    const Scalar* v;  // value j at v + j·v_stride, dv entries
    Scalar* out;      // output of query i at out + i·out_stride, dv entries
    Scalar* lse;      // log-sum-exp of query i at lse[i·lse_stride]; null when not asked
    Index q_stride, k_stride, v_stride, out_stride, lse_stride;
    Index dk, dv, lq, lk;
    Scalar scale;
    const mask_view<Scalar>* mask;
    // Score terms of this (sequence, head), see attention_options.
    Index sequence = 0, head = 0;  // as the score modifier sees them
    Scalar softcap = 0;            // 0: no soft-capping
    bool alibi = false;
    Scalar alibi_slope = 0;
    bool has_sink = false;
    Scalar sink = 0;
};

/// Sequence b's keys and values, key 0 first: its columns of the problem's packed K and V, or its
/// own entry of `per_sequence` (a decode step's cache). An empty sequence's columns do not exist
/// and are never read: its pointers are the matrices' own. Serves every problem type with k, v,
/// batch and per_sequence (attention_problem, the bf16 problem).
template <class Scalar, class Problem>
sequence_keys_values<Scalar> keys_values_of(const Problem& p, Index b) {
    if (p.per_sequence != nullptr) return p.per_sequence[b];
    const Index k0 = p.batch.key_length(b) == 0 ? 0 : p.batch.key_offset(b);
    return {p.k.data() + k0 * p.k.outerStride(), p.v.data() + k0 * p.v.outerStride(),
            p.k.outerStride(), p.v.outerStride()};
}

/// Makes hp, the problem of the first query head of a group, the problem of the group's `group`
/// query heads stacked as the queries of one sequence of one query (see make_stacked_problem):
/// query vectors d_k apart, outputs d_v apart, log-sum-exps 1 apart.
template <class HeadProblem>
void stack_query_heads(HeadProblem& hp, Index dk, Index dv, Index group) {
    hp.q_stride = dk;
    hp.out_stride = dv;
    hp.lse_stride = 1;
    hp.lq = group;
}

/// One (sequence, head) of a call: `f` as the passes read it (output, log-sum-exp, strides,
/// widths, lengths, scale, mask; its q, k and v null), and where the head's inputs start, in the
/// inputs' own type (Scalar for attention_problem, Eigen::bfloat16 for the bf16 problem).
template <class Scalar, class Input>
struct located_head_problem {
    head_problem<Scalar> f;
    const Input* q;
    const Input* k;
    const Input* v;
};

/// Sequence b, head h of any problem type with q, out, heads, batch, scale, k, v and
/// per_sequence. `lse`, when given, is the H × Nq log-sum-exp matrix.
template <class Scalar, class Input, class Problem>
located_head_problem<Scalar, Input> locate_head_problem(const Problem& p, Index b, Index h,
                                                        const mask_view<Scalar>& mask,
                                                        matrix<Scalar>* lse) {
    const head_layout& heads = p.heads;
    const Index q0 = p.batch.query_offset(b);
    const Index lq = p.batch.query_length(b), lk = p.batch.key_length(b);
    // An empty sequence's columns do not exist (the matrix may even be empty, with a null data
    // pointer): offsetting into them would be undefined, and they are never read.
    auto at = [](auto* base, Index length, Index offset) {
        return length == 0 ? base : base + offset;
    };
    Scalar* lse_at =
        lse == nullptr || lse->size() == 0 ? nullptr : at(lse->data(), lq, q0 * lse->rows() + h);
    const sequence_keys_values<Input> kv = keys_values_of<Input>(p, b);
    located_head_problem<Scalar, Input> r{};
    r.f = head_problem<Scalar>{nullptr,
                               nullptr,
                               nullptr,
                               at(p.out.data(), lq, q0 * p.out.outerStride() + heads.out_row(h)),
                               lse_at,
                               p.q.outerStride(),
                               kv.k_stride,
                               kv.v_stride,
                               p.out.outerStride(),
                               lse == nullptr ? 0 : lse->rows(),
                               heads.dk,
                               heads.dv,
                               lq,
                               lk,
                               static_cast<Scalar>(p.scale),
                               &mask};
    r.f.sequence = b;
    r.f.head = h;
    r.q = at(p.q.data(), lq, q0 * p.q.outerStride() + heads.q_row(h));
    r.k = at(kv.k, lk, heads.k_row(h));
    r.v = at(kv.v, lk, heads.v_row(h));
    return r;
}

/// Head h's score terms from `terms` (null: none) into hp.
template <class Scalar>
void set_score_terms(head_problem<Scalar>& hp, const attention_options* terms, Index h) {
    if (terms == nullptr) return;
    const attention_options& o = *terms;
    const auto hi = static_cast<std::size_t>(h);
    if (o.softcap) hp.softcap = static_cast<Scalar>(*o.softcap);
    hp.alibi = !o.alibi_slopes.empty();
    if (hp.alibi) hp.alibi_slope = static_cast<Scalar>(o.alibi_slopes[hi]);
    hp.has_sink = !o.sinks.empty();
    if (hp.has_sink) hp.sink = static_cast<Scalar>(o.sinks[hi]);
}

/// The problem of sequence b, head h. `lse`, when given, is the H × Nq log-sum-exp matrix.
template <class Scalar>
head_problem<Scalar> make_head_problem(const attention_problem<Scalar>& p, Index b, Index h,
                                       const mask_view<Scalar>& mask, matrix<Scalar>* lse) {
    const auto located = locate_head_problem<Scalar, Scalar>(p, b, h, mask, lse);
    head_problem<Scalar> hp = located.f;
    hp.q = located.q;
    hp.k = located.k;
    hp.v = located.v;
    set_score_terms(hp, p.terms, h);
    return hp;
}

/// Whether the problems of `p` (any problem type with `terms`) change their scores by head
/// (ALiBi, sinks): then query heads cannot be stacked into one problem.
template <class Problem>
bool has_per_head_terms(const Problem& p) {
    return p.terms != nullptr && (!p.terms->alibi_slopes.empty() || !p.terms->sinks.empty());
}

/// Whether `p` (any problem type with `terms`) has a score term at all.
template <class Problem>
bool has_score_terms(const Problem& p) {
    return p.terms != nullptr &&
           (p.terms->softcap || !p.terms->alibi_slopes.empty() || !p.terms->sinks.empty());
}

/// Sequence b's single query seen by the `group` query heads of key/value head g, stacked as the
/// `group` queries of one problem: their query vectors lie d_k apart in the query's column, their
/// outputs d_v apart, their log-sum-exps 1 apart, and they share K and V. One problem instead of
/// `group` lets a decode step read each cached key once for the whole group, as a small matrix
/// product instead of `group` vector products. `mask` must be a stacked() view of the heads'
/// (equal) masks.
template <class Scalar>
head_problem<Scalar> make_stacked_problem(const attention_problem<Scalar>& p, Index b, Index g,
                                          Index group, const mask_view<Scalar>& mask,
                                          matrix<Scalar>* lse) {
    head_problem<Scalar> hp = make_head_problem(p, b, g * group, mask, lse);
    stack_query_heads(hp, p.heads.dk, p.heads.dv, group);
    return hp;
}

}  // namespace detail
}  // namespace mha
