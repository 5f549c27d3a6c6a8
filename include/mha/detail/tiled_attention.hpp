// SPDX-License-Identifier: MIT
// The tiled (online-softmax, "flash") attention kernel: the fast path for softmax attention.
//
// Design
// ------
// Work units. Tasks are (sequence b, head h, query block of `query_block` columns). A task owns
// its output columns, so tasks never write the same memory and need no reduction: the result of
// a task does not depend on which thread runs it or when. Tasks are handed out dynamically
// (OpenMP `schedule(dynamic)`), the most expensive first (causal and sliding-window blocks differ).
//
// Loop of one task. The query block is packed once, transposed and pre-scaled:
// Qtᵀ = scale·Q_blkᵀ (nq × d_k, padded to a packet multiple). Then over key blocks of `key_block`:
//   Sᵀ = Qtᵀ·K_blk                    (nq × key_block; register tiles reading K in place)
//   mask Sᵀ by selection              (−∞, whatever K held: poisoned keys never leak)
//   m' = max(m, rowmax Sᵀ)            per query (NaN wins, so NaN in allowed inputs propagates)
//   Pᵀ = exp(Sᵀ − m'), −∞ → exactly 0 (Eigen's pexp, with the −∞ lanes cleared)
//   l  = exp(m − m')·l + rowsum Pᵀ;  O = exp(m − m')·O + V_blk·P   (register tiles)
// At the end O /= l; a query that saw no allowed key (m = −∞) gets exactly 0. The scores are
// kept transposed, one key per column, so that the max, the exp and the sum run across packets
// of queries: no horizontal reduction, no per-query loop in the hot path. The kernels live in
// detail/attention_block_kernels.hpp; a block with fewer queries than a packet (a decode step)
// computes its scores with Eigen's GEMV instead, as padding would waste most of the tile.
//
// Tile sizes. query_block = 128, key_block = 512: Sᵀ is 128×512 floats = 256 KB and stays in
// the 1 MB L2 of the target (Zen 5) together with the O accumulator (d_v×128), the packed
// queries (128×d_k) and the V block (d_v×512). 128 keeps enough tasks for 2 threads at
// L = 512 with 8 heads (32 tasks); larger key blocks amortise the per-block bookkeeping.
// An earlier design called Eigen's GEMM for both products of a block; it reached 0.75 of
// BM_gemm_roofline at L = 2048, the register tiles about 1.0 (bench/bench_attention.cpp).

// Masks. Positional masks (causal, sliding windows, key_lengths) give each query an allowed key
// interval [first_i, last_i) (attention_mask::slice::key_range). A task only visits keys in the
// union of its queries' intervals, so blocks above the causal diagonal, outside a window or past
// a key length are never computed. Key blocks inside every query's interval are "interior" and
// pay nothing for masking; only boundary blocks set the out-of-interval entries to −∞ query by
// query. keep_mask and additive_bias are applied element-wise to each visited block (a −∞ bias
// is a selection, like keep_mask, so NaN + (−∞) cannot resurrect an excluded key).
//
// Poisoned values. P·V by GEMM multiplies excluded value columns by 0, and 0·NaN = NaN (0·Inf as
// well). As in the materialised path, such an output column is the only non-finite one that can
// be wrong, so after the last block every non-finite output column is recomputed from its
// allowed keys alone with the final (m, l), skipping excluded keys. NaN from allowed inputs comes
// out again from that recomputation, so it still propagates.
//
// Weights. When asked for, they come from the same kernel: after (m, l) are final, the block
// scores are recomputed (one more score GEMM per block) and exp(S − m)/l is written straight into
// the caller's Lk×Lq matrix. Only that requested output grows with L².
//
// Decode (few queries, many keys). A single (b, h, query block) task would leave the other core
// idle, so when a sequence has at most one query block and at least 2·split_chunk keys, its keys
// are split into chunks of `split_chunk`; each chunk yields a partial (m, l, O) and the partials
// are merged in chunk order by log-sum-exp. The decision depends only on the shapes, never on the
// thread count, so results are identical for every thread count.
//
// Memory. Per thread: Sᵀ (query_block × key_block), the packed queries, the V block,
// O (d_v × query_block), m, l and the query intervals: independent of L. Split partials are d_v × Lq per chunk: linear in Lk. No L×L
// buffer exists unless weights are requested.
//
// Threads. OpenMP when the compiler has it enabled (CMake option MHA_OPENMP), otherwise serial.
// The block GEMMs call Eigen's GEMM kernel directly with no parallel info, i.e. always
// single-threaded: Eigen's own OpenMP GEMM never nests inside our parallel region, and a 1-thread
// call is really 1 thread.
//
// Normalisations other than softmax (relu, sigmoid) have no online form worth having here; the
// dispatcher in attention.hpp sends them to the materialised path.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP) && !defined(MHA_NO_OPENMP)
#include <omp.h>
#define MHA_TILED_USE_OPENMP 1
#endif

#include <mha/batch.hpp>
#include <mha/config.hpp>
#include <mha/detail/attention_block_kernels.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/mask.hpp>
#include <mha/softmax.hpp>

namespace mha {
namespace detail {

/// Queries per task (columns of a score tile). See the design comment for the choice.
inline constexpr Index tiled_query_block = 128;
/// Keys per block (rows of a score tile).
inline constexpr Index tiled_key_block = 512;
/// Keys per split-KV chunk for decode-like shapes (a multiple of tiled_key_block).
inline constexpr Index tiled_split_chunk = 1024;

/// Tunables of the tiled kernel; the defaults are the constants above. Tests shrink the blocks to
/// reach many tile boundaries with small inputs.
struct tiled_settings {
    Index query_block = tiled_query_block;
    Index key_block = tiled_key_block;
    Index split_chunk = tiled_split_chunk;
    int threads = 0;  ///< 0: OpenMP's default (omp_get_max_threads()); ignored without OpenMP
};

/// Which weights the tiled driver writes (mirrors mha::weights_mode, which lives in attention.hpp).
enum class tiled_weights { none, per_head, averaged };

template <class Scalar>
using const_matrix_ref = Eigen::Ref<const matrix<Scalar>, 0, Eigen::OuterStride<>>;
template <class Scalar>
using matrix_ref = Eigen::Ref<matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// C (m×n, column-major, ldc) += alpha · A·B with A m×k (column-major, or row-major when
/// AOrder = RowMajor, i.e. the transpose of a column-major k×m) and B k×n column-major.
/// Always single-threaded: Eigen's GEMM kernel is called without parallel info. The GEMM packs
/// into `buffers` when given (see detail/gemm.hpp), else where Eigen puts it.
template <class Scalar, int AOrder>
void serial_gemm_add(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b,
                     Index ldb, Scalar* c, Index ldc, Scalar alpha,
                     gemm_buffers<Scalar>* buffers) {
    if (m == 0 || n == 0 || k == 0) return;
    using a_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, AOrder>;
    if (n == 1 || m + n + k < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {
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

/// One (sequence, head): strided views of its Q, K, V and output, and its mask.
template <class Scalar>
struct head_problem {
    const Scalar* q;  // column i at q + i·q_stride, dk entries
    const Scalar* k;
    const Scalar* v;
    Scalar* out;
    Index q_stride, k_stride, v_stride, out_stride;
    Index dk, dv, lq, lk;
    Scalar scale;
    const typename attention_mask<Scalar>::slice* mask;
};

/// Per-thread scratch, sized once per thread, independent of L. "nqp" is the query block padded
/// to the score kernel's packet multiple (padded_queries).
template <class Scalar>
struct tile_scratch {
    matrix<Scalar> qt;   // nqp × dk: the block's queries, transposed and scaled
    matrix<Scalar> s;    // nqp × key_block: transposed scores, then probabilities
    matrix<Scalar> acc;  // dv × query_block unnormalised output
    matrix<Scalar> v;    // dv × key_block: the block's values, contiguous
    vector<Scalar> m, l;               // query_block: running max and sum
    vector<Scalar> block_max, shift, block_sum;  // nqp: per-block softmax bookkeeping
    std::vector<Index> first, last;  // allowed key interval of each query of the block
};

/// The allowed key intervals of queries [i0, i0 + nq), clipped to [k_lo, k_hi); returns the
/// union [lo, hi) and the intersection bounds (max first, min last) of the non-empty ones.
struct interval_summary {
    Index lo, hi;  // union of the intervals (lo >= hi: nothing to visit)
    Index max_first, min_last;
};

template <class Scalar>
interval_summary key_intervals(const head_problem<Scalar>& p, Index i0, Index nq, Index k_lo,
                               Index k_hi, tile_scratch<Scalar>& t) {
    t.first.resize(static_cast<std::size_t>(nq));
    t.last.resize(static_cast<std::size_t>(nq));
    interval_summary r{k_hi, k_lo, k_lo, k_hi};
    for (Index c = 0; c < nq; ++c) {
        auto range = p.mask->key_range(i0 + c);
        const Index f = std::max(range.first, k_lo);
        const Index e = std::max(f, std::min(range.second, k_hi));
        t.first[static_cast<std::size_t>(c)] = f;
        t.last[static_cast<std::size_t>(c)] = e;
        r.max_first = std::max(r.max_first, f);
        r.min_last = std::min(r.min_last, e);
        if (f < e) {
            r.lo = std::min(r.lo, f);
            r.hi = std::max(r.hi, e);
        }
    }
    return r;
}

/// The allowed key intervals of the block's queries (from key_intervals) for the block kernels.
template <class Scalar>
query_key_ranges block_ranges(const tile_scratch<Scalar>& t, Index nq, Index j0) {
    return {t.first.data(), t.last.data(), nq, j0};
}

/// Sᵀ(0:nqp, 0:nk) = qt · K[:, j0:j0+nk] into t.s (ld nqp), i.e. the scaled scores of queries
/// [i0, i0+nq) (qt packed by pack_scaled_queries) against keys [j0, j0+nk), then masked by
/// selection. Rows nq..nqp are padding and hold finite values.
template <class Scalar>
void masked_scores(const head_problem<Scalar>& p, Index i0, Index nq, Index nqp, Index j0,
                   Index nk, const interval_summary& iv, tile_scratch<Scalar>& t) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    Scalar* s = t.s.data();
    const Index lds = nqp;
    const Scalar* k = p.k + j0 * p.k_stride;
    const bool interior = iv.max_first <= j0 && j0 + nk <= iv.min_last;
    if (nq >= block_kernel_traits<Scalar>::width) {
        // A boundary block's tiles compute only the keys their queries may see; masking below
        // sets everything outside each query's interval to −∞, skipped entries included.
        transposed_scores(t.qt.data(), nqp, p.dk, k, p.k_stride, nk, s, lds,
                          interior ? query_key_ranges{} : block_ranges(t, nq, j0));
    } else {
        // Fewer queries than a packet (decode steps, short tails): the register tiles would be
        // mostly padding, so let Eigen's GEMV/GEMM compute the nq live rows.
        std::fill(s, s + nk * lds, Scalar(0));
        serial_gemm_add<Scalar, Eigen::ColMajor>(nq, nk, p.dk, t.qt.data(), nqp, k, p.k_stride, s,
                                                 lds, Scalar(1));
    }
    const auto& mask = *p.mask;
    const bool elementwise = mask.has_bias() || mask.has_keep();
    if (interior && !elementwise) return;
    if (!interior)  // the padding rows' skipped entries were not written: keep them finite
        for (Index r = 0; r < nk; ++r) std::fill(s + r * lds + nq, s + (r + 1) * lds, Scalar(0));
    for (Index c = 0; c < nq; ++c) {
        Scalar* row = s + c;  // key r of query c at row[r·lds]
        const Index f = std::clamp(t.first[static_cast<std::size_t>(c)] - j0, Index(0), nk);
        const Index e = std::clamp(t.last[static_cast<std::size_t>(c)] - j0, f, nk);
        for (Index r = 0; r < f; ++r) row[r * lds] = minus_inf;
        for (Index r = e; r < nk; ++r) row[r * lds] = minus_inf;
        if (!elementwise) continue;
        const Index i = i0 + c;
        for (Index r = f; r < e; ++r) {
            const Index j = j0 + r;
            Scalar& x = row[r * lds];
            if (mask.has_bias()) {
                const Scalar b = mask.bias(j, i);
                x = b == minus_inf ? minus_inf : x + b;
            }
            if (mask.has_keep() && !mask.keeps(j, i)) x = minus_inf;
        }
    }
}

/// mx[c] = max over keys j < nk of st[j·ld + c], for c < nqp (a multiple of the packet width);
/// NaN when any of them is NaN, −∞ when nk = 0.
template <class Scalar>
void max_per_query(const Scalar* st, Index ld, Index nqp, Index nk, Scalar* mx) {
    using namespace Eigen::internal;
    using traits = block_kernel_traits<Scalar>;
    using packet = typename traits::packet;
    constexpr Index w = traits::width;
    std::fill(mx, mx + nqp, -std::numeric_limits<Scalar>::infinity());
    for (Index j = 0; j < nk; ++j) {
        const Scalar* col = st + j * ld;
        if constexpr (w > 1) {
            for (Index c = 0; c < nqp; c += w)
                pstoreu(mx + c,
                        pmax<Eigen::PropagateNaN>(ploadu<packet>(mx + c), ploadu<packet>(col + c)));
        } else {
            for (Index c = 0; c < nqp; ++c) mx[c] = nan_propagating_max(mx[c], col[c]);
        }
    }
}

/// st[j·ld + c] = exp(st[j·ld + c] − shift[c]) for j < nk, c < nqp, with −∞ giving exactly 0
/// (a vectorised exp(−∞) may return a denormal instead) and NaN staying NaN; sum[c] receives
/// the sum over j.
template <class Scalar>
void exp_shifted_per_query(Scalar* st, Index ld, Index nqp, Index nk, const Scalar* shift,
                           Scalar* sum) {
    using namespace Eigen::internal;
    using traits = block_kernel_traits<Scalar>;
    using packet = typename traits::packet;
    constexpr Index w = traits::width;
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    std::fill(sum, sum + nqp, Scalar(0));
    if constexpr (w > 1 && packet_traits<Scalar>::HasExp) {
        const packet pinf = pset1<packet>(minus_inf);
        for (Index j = 0; j < nk; ++j) {
            Scalar* col = st + j * ld;
            for (Index c = 0; c < nqp; c += w) {
                const packet x = ploadu<packet>(col + c);
                const packet e = pandnot(pexp(psub(x, ploadu<packet>(shift + c))), pcmp_eq(x, pinf));
                pstoreu(col + c, e);
                pstoreu(sum + c, padd(ploadu<packet>(sum + c), e));
            }
        }
    } else {
        for (Index j = 0; j < nk; ++j) {
            Scalar* col = st + j * ld;
            for (Index c = 0; c < nqp; ++c) {
                const Scalar e = col[c] == minus_inf ? Scalar(0) : std::exp(col[c] - shift[c]);
                col[c] = e;
                sum[c] += e;
            }
        }
    }
}

/// The online pass of queries [i0, i0+nq) over keys [k_lo, k_hi): leaves the unnormalised output
/// in t.acc (dv × nq) and the running max and sum in t.m, t.l.
template <class Scalar>
void online_pass(const head_problem<Scalar>& p, Index i0, Index nq, Index k_lo, Index k_hi,
                 const tiled_settings& cfg, tile_scratch<Scalar>& t) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    t.acc.topLeftCorner(p.dv, nq).setZero();
    t.m.head(nq).setConstant(minus_inf);
    t.l.head(nq).setZero();
    const interval_summary iv = key_intervals(p, i0, nq, k_lo, k_hi, t);
    if (iv.lo >= iv.hi) return;
    const Index nqp = padded_queries<Scalar>(nq);
    pack_scaled_queries(p.q + i0 * p.q_stride, p.q_stride, p.dk, nq, nqp, p.scale, t.qt.data());
    Scalar* st = t.s.data();
    for (Index j0 = iv.lo; j0 < iv.hi; j0 += cfg.key_block) {
        const Index nk = std::min(cfg.key_block, iv.hi - j0);
        masked_scores(p, i0, nq, nqp, j0, nk, iv, t);
        max_per_query(st, nqp, nqp, nk, t.block_max.data());
        for (Index c = 0; c < nqp; ++c) {
            // The new running max; a query with nothing allowed yet (−∞) shifts by 0, so its
            // −∞ scores still give exactly 0 and no −∞ − (−∞) = NaN appears.
            const Scalar m_new = c < nq ? nan_propagating_max(t.m(c), t.block_max(c)) : Scalar(0);
            t.block_max(c) = m_new;
            t.shift(c) = m_new == minus_inf ? Scalar(0) : m_new;
        }
        exp_shifted_per_query(st, nqp, nqp, nk, t.shift.data(), t.block_sum.data());
        for (Index c = 0; c < nq; ++c) {
            const Scalar m_old = t.m(c);
            const Scalar m_new = t.block_max(c);
            if (m_new == minus_inf) continue;  // nothing allowed yet: contributes nothing
            if (m_old == minus_inf) {
                // First allowed keys: start from a clean accumulator (earlier blocks may have
                // added 0·NaN from poisoned excluded values).
                t.acc.col(c).head(p.dv).setZero();
                t.l(c) = t.block_sum(c);
            } else if (m_new != m_old) {
                const Scalar alpha = std::exp(m_old - m_new);
                t.acc.col(c).head(p.dv) *= alpha;
                t.l(c) = alpha * t.l(c) + t.block_sum(c);
            } else {
                t.l(c) += t.block_sum(c);
            }
            t.m(c) = m_new;
        }
        // V's columns lie a whole QKV row apart (3·E floats, 6 KB for E = 512). Copied
        // contiguous, the chunk the value kernel re-reads for every query tile stays in L1;
        // measured a few per cent faster at L = 2048 (copying K as well was slower).
        Scalar* vb = t.v.data();
        for (Index r = 0; r < nk; ++r)
            std::copy_n(p.v + (j0 + r) * p.v_stride, p.dv, vb + r * p.dv);
        const bool interior = iv.max_first <= j0 && j0 + nk <= iv.min_last;
        accumulate_values(vb, p.dv, p.dv, nk, st, nqp, nq, t.acc.data(), t.acc.rows(),
                          interior ? query_key_ranges{} : block_ranges(t, nq, j0));
    }
}

/// Recomputes output column i from its allowed keys alone (see "Poisoned values" above).
template <class Scalar>
void repair_column(const head_problem<Scalar>& p, Index i, Scalar m, Scalar inv_l) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    using cvec = Eigen::Map<const vector<Scalar>>;
    Eigen::Map<vector<Scalar>> out(p.out + i * p.out_stride, p.dv);
    out.setZero();
    const cvec qi(p.q + i * p.q_stride, p.dk);
    const auto& mask = *p.mask;
    const auto range = mask.key_range(i);
    for (Index j = range.first; j < range.second; ++j) {
        if (mask.has_keep() && !mask.keeps(j, i)) continue;
        Scalar s = p.scale * cvec(p.k + j * p.k_stride, p.dk).dot(qi);
        if (mask.has_bias()) {
            const Scalar b = mask.bias(j, i);
            if (b == minus_inf) continue;
            s += b;
        }
        out += (std::exp(s - m) * inv_l) * cvec(p.v + j * p.v_stride, p.dv);
    }
}

/// Writes out = acc / l for queries [i0, i0+nq) (0 for a query with no allowed key) and repairs
/// non-finite columns.
template <class Scalar>
void finalize_block(const head_problem<Scalar>& p, Index i0, Index nq, tile_scratch<Scalar>& t) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index c = 0; c < nq; ++c) {
        Eigen::Map<vector<Scalar>> out(p.out + (i0 + c) * p.out_stride, p.dv);
        if (t.m(c) == minus_inf) {
            out.setZero();
            continue;
        }
        const Scalar inv_l = Scalar(1) / t.l(c);
        out = t.acc.col(c).head(p.dv) * inv_l;
        if (!out.allFinite()) repair_column(p, i0 + c, t.m(c), inv_l);
    }
}

/// Weights of queries [i0, i0+nq): w = exp(S − m)/l over every visited block, written
/// (divisor 0) or added divided by `divisor` (the head count, averaged mode) into `w`, an
/// lk × lq matrix that is zero outside the visited blocks.
template <class Scalar>
void weights_pass(const head_problem<Scalar>& p, Index i0, Index nq, const tiled_settings& cfg,
                  tile_scratch<Scalar>& t, matrix<Scalar>& w, Scalar divisor) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const interval_summary iv = key_intervals(p, i0, nq, 0, p.lk, t);
    if (iv.lo >= iv.hi) return;
    const Index nqp = padded_queries<Scalar>(nq);
    pack_scaled_queries(p.q + i0 * p.q_stride, p.q_stride, p.dk, nq, nqp, p.scale, t.qt.data());
    for (Index j0 = iv.lo; j0 < iv.hi; j0 += cfg.key_block) {
        const Index nk = std::min(cfg.key_block, iv.hi - j0);
        masked_scores(p, i0, nq, nqp, j0, nk, iv, t);
        for (Index c = 0; c < nq; ++c) {
            if (t.m(c) == minus_inf) continue;  // no allowed key: weights stay 0
            const Scalar* row = t.s.data() + c;  // key r at row[r·nqp]
            const Scalar m = t.m(c), l = t.l(c);
            Scalar* dst = w.data() + (i0 + c) * w.rows() + j0;
            // Scalar std::exp and a true division, not the packet exp of the online pass:
            // returned weights are compared element by element with other paths (the
            // materialised softmax evaluates std::exp too), and 1-ulp packet exp errors showed
            // up there. This pass is O(Lk·Lq) like the weights themselves.
            for (Index r = 0; r < nk; ++r) {
                const Scalar sr = row[r * nqp];
                const Scalar x = sr == minus_inf ? Scalar(0) : std::exp(sr - m) / l;
                if (divisor != Scalar(0))
                    dst[r] += x / divisor;
                else
                    dst[r] = x;
            }
        }
    }
}

/// Runs fn(task, state) for task in [0, count), in parallel when OpenMP is on. `states` holds
/// one state per thread, index omp_get_thread_num() (grown here to the thread count; a state
/// outlives the call, so what it holds is reused by the next one). Each thread calls
/// enter(state) once before its first task and keeps what it returns (a guard, or anything)
/// until its last task is done.
///
/// Tasks are handed out one at a time, most expensive first, by an atomic counter rather than
/// `omp for schedule(dynamic)`: LLVM's OpenMP runtime allocates for every chunk a worksharing
/// loop hands out (about 3 mallocs per chunk with libomp 14), while a plain parallel region
/// allocates nothing once its team exists, in libgomp and libomp alike.
template <class State, class Enter, class Fn>
void parallel_tasks(Index count, int threads, std::vector<State>& states, Enter enter, Fn fn) {
#if defined(MHA_TILED_USE_OPENMP)
    const int nt = threads > 0 ? threads : omp_get_max_threads();
    if (nt > 1 && count > 1) {
        if (states.size() < static_cast<std::size_t>(nt))
            states.resize(static_cast<std::size_t>(nt));
        std::atomic<Index> next{0};
#pragma omp parallel num_threads(nt)
        {
            State& state = states[static_cast<std::size_t>(omp_get_thread_num())];
            const auto session = enter(state);
            for (Index task; (task = next.fetch_add(1, std::memory_order_relaxed)) < count;)
                fn(task, state);
        }
        return;
    }
#else
    (void)threads;
#endif
    if (states.empty()) states.resize(1);
    const auto session = enter(states.front());
    for (Index task = 0; task < count; ++task)
        fn(task, states.front());
}

/// A task of the tiled driver: queries [i0, i0 + nq) of sequence b, head h (-1: every head in
/// order), over all keys or, for chunk >= 0, over split-KV chunk `chunk` only.
struct tiled_task {
    Index b, h, i0, nq, chunk;
    double cost;
    Index order;  // creation index: breaks cost ties, so the order does not depend on the sort
};

/// What a tile_scratch was made for: make_scratch's inputs. A thread's scratch is made again
/// when they change.
struct tile_scratch_key {
    Index dk = -1, dv = -1, query_block = -1, key_block = -1, split_chunk = -1;
    bool operator==(const tile_scratch_key& o) const {
        return dk == o.dk && dv == o.dv && query_block == o.query_block &&
               key_block == o.key_block && split_chunk == o.split_chunk;
    }
};

/// One thread's state in the tiled driver.
template <class Scalar>
struct tiled_thread_state {
    tile_scratch<Scalar> tile;
    tile_scratch_key made_for;  // default: made for nothing yet
    gemm_buffers<Scalar> gemm;  // packing for the block GEMMs (see serial_gemm_add)
};

/// The buffers of tiled_multi_head_attention, kept between calls: a call with the shapes and
/// settings of an earlier call on the same workspace allocates nothing. Vectors are cleared,
/// never shrunk; the split-KV partials only grow. One workspace per concurrent call.
template <class Scalar>
struct tiled_workspace {
    // Refer to the mask of the current call; stale (never read) between calls.
    std::vector<typename attention_mask<Scalar>::slice> slices;
    std::vector<tiled_task> tasks;
    std::vector<Index> chunks_of;       // split-KV chunks of each sequence, 0 when not split
    std::vector<Index> partial_column;  // first partial column of each sequence
    // Split partials: sequence b, head h, chunk c, query i at column
    // partial_column[b] + (h·chunks_of[b] + c)·lq + i; acc is dv × columns, column-major.
    vector<Scalar> partial_acc, partial_m, partial_l;
    std::vector<std::pair<Index, Index>> merges;  // (b, h) of each split head to merge
    std::vector<tiled_thread_state<Scalar>> threads;
};

/// The multi-head tiled attention over a packed batch (shapes as multi_head_attention_core; the
/// caller has validated them). `weights`, when mode is not none, holds zero matrices of the right
/// shapes (B·H for per_head, B for averaged). `workspace`, when given, keeps every buffer of the
/// call for the next one (see tiled_workspace); null: a workspace local to the call.
template <class Scalar>
void tiled_multi_head_attention(const const_matrix_ref<Scalar>& q,
                                const const_matrix_ref<Scalar>& k,
                                const const_matrix_ref<Scalar>& v, Index num_heads,
                                const packed_batch& batch, matrix_ref<Scalar> out,
                                const attention_mask<Scalar>& mask, Scalar scale,
                                tiled_weights mode, std::vector<matrix<Scalar>>* weights,
                                const tiled_settings& cfg = {},
                                tiled_workspace<Scalar>* workspace = nullptr) {
    const Index dk = q.rows() / num_heads;
    const Index dv = v.rows() / num_heads;
    const Index nb = batch.size();
    const bool want_weights = mode != tiled_weights::none && weights != nullptr;
    const bool averaged = want_weights && mode == tiled_weights::averaged;
    tiled_workspace<Scalar> local;
    tiled_workspace<Scalar>& ws = workspace != nullptr ? *workspace : local;

    auto& slices = ws.slices;
    slices.clear();
    slices.reserve(static_cast<std::size_t>(nb * num_heads));
    for (Index b = 0; b < nb; ++b)
        for (Index h = 0; h < num_heads; ++h)
            slices.push_back(
                mask.for_head(b, h, nb, num_heads, batch.query_length(b), batch.key_length(b)));
    auto problem = [&](Index b, Index h) {
        const Index q0 = batch.query_offset(b), k0 = batch.key_offset(b);
        const Index lq = batch.query_length(b), lk = batch.key_length(b);
        // An empty sequence's columns do not exist (the matrix may even be empty, with a null
        // data pointer): offsetting into them would be undefined, and they are never read.
        auto at = [](auto* base, Index length, Index offset) {
            return length == 0 ? base : base + offset;
        };
        return head_problem<Scalar>{at(q.data(), lq, q0 * q.outerStride() + h * dk),
                                    at(k.data(), lk, k0 * k.outerStride() + h * dk),
                                    at(v.data(), lk, k0 * v.outerStride() + h * dv),
                                    at(out.data(), lq, q0 * out.outerStride() + h * dv),
                                    q.outerStride(),
                                    k.outerStride(),
                                    v.outerStride(),
                                    out.outerStride(),
                                    dk,
                                    dv,
                                    batch.query_length(b),
                                    batch.key_length(b),
                                    scale,
                                    &slices[static_cast<std::size_t>(b * num_heads + h)]};
    };

    // Tasks. head = -1: every head in order (averaged weights add the heads into one matrix, so
    // one task owns all of them and the sum has the same order as in the materialised path).
    // chunk >= 0: split-KV partial over keys [chunk·split_chunk, (chunk+1)·split_chunk).
    auto& tasks = ws.tasks;
    tasks.clear();
    auto& chunks_of = ws.chunks_of;
    chunks_of.assign(static_cast<std::size_t>(nb), 0);
    auto add_task = [&tasks](Index b, Index h, Index i0, Index nq, Index chunk, double cost) {
        tasks.push_back({b, h, i0, nq, chunk, cost, static_cast<Index>(tasks.size())});
    };
    for (Index b = 0; b < nb; ++b) {
        const Index lq = batch.query_length(b), lk = batch.key_length(b);
        if (lq == 0) continue;
        const bool split = !want_weights && lq <= cfg.query_block && lk >= 2 * cfg.split_chunk;
        const Index nchunks = split ? (lk + cfg.split_chunk - 1) / cfg.split_chunk : 0;
        chunks_of[static_cast<std::size_t>(b)] = nchunks;
        for (Index i0 = 0; i0 < lq; i0 += cfg.query_block) {
            const Index nq = std::min(cfg.query_block, lq - i0);
            // Cost estimate: the keys the block's first and last queries may see (exact
            // enough to hand out the long causal blocks first).
            const auto& sl = slices[static_cast<std::size_t>(b * num_heads)];
            const auto r0 = sl.key_range(i0), r1 = sl.key_range(i0 + nq - 1);
            const double keys =
                static_cast<double>(std::max(r0.second, r1.second) - std::min(r0.first, r1.first));
            const double cost = static_cast<double>(nq) * (keys + 1);
            if (averaged) {
                add_task(b, -1, i0, nq, -1, cost * static_cast<double>(num_heads));
                continue;
            }
            for (Index h = 0; h < num_heads; ++h) {
                if (!split) {
                    add_task(b, h, i0, nq, -1, cost);
                    continue;
                }
                for (Index c = 0; c < nchunks; ++c)
                    add_task(b, h, i0, nq, c,
                             static_cast<double>(nq) * static_cast<double>(cfg.split_chunk));
            }
        }
    }
    // Most expensive first; equal costs head by head (a head's K and V, 4 MB at L = 8192, stay
    // in cache for its next query block, where alternating heads would stream all of them: 10%
    // at L = 8192), then in creation order. std::sort with a total order: no buffer, unlike
    // std::stable_sort, and the same order every time.
    std::sort(tasks.begin(), tasks.end(), [](const tiled_task& a, const tiled_task& b) {
        if (a.cost != b.cost) return a.cost > b.cost;
        if (a.b != b.b) return a.b < b.b;
        if (a.h != b.h) return a.h < b.h;
        return a.order < b.order;
    });

    // Split partials: (acc dv×lq, m lq, l lq) per sequence, head and chunk.
    auto& partial_column = ws.partial_column;
    partial_column.assign(static_cast<std::size_t>(nb), 0);
    Index partial_columns = 0;
    for (Index b = 0; b < nb; ++b) {
        partial_column[static_cast<std::size_t>(b)] = partial_columns;
        partial_columns +=
            num_heads * chunks_of[static_cast<std::size_t>(b)] * batch.query_length(b);
    }
    auto grow = [](vector<Scalar>& buffer, Index size) {
        if (buffer.size() < size) buffer.resize(size);
    };
    grow(ws.partial_acc, dv * partial_columns);
    grow(ws.partial_m, partial_columns);
    grow(ws.partial_l, partial_columns);
    // First column of the partial of (b, h, chunk).
    auto partial_at = [&](Index b, Index h, Index chunk) {
        const auto bi = static_cast<std::size_t>(b);
        return partial_column[bi] + (h * chunks_of[bi] + chunk) * batch.query_length(b);
    };

    auto make_scratch = [&] {
        tile_scratch<Scalar> t;
        const Index nqp = padded_queries<Scalar>(cfg.query_block);
        t.qt.resize(nqp, std::max<Index>(dk, 1));
        t.s.resize(nqp, cfg.key_block);
        t.acc.resize(std::max<Index>(dv, 1), cfg.query_block);
        t.v.resize(std::max<Index>(dv, 1), cfg.key_block);
        t.m.resize(cfg.query_block);
        t.l.resize(cfg.query_block);
        t.block_max.resize(nqp);
        t.shift.resize(nqp);
        t.block_sum.resize(nqp);
        // key_intervals sizes these to the block; reserved so that no later block grows them.
        t.first.reserve(static_cast<std::size_t>(cfg.query_block));
        t.last.reserve(static_cast<std::size_t>(cfg.query_block));
        return t;
    };
    const tile_scratch_key key{dk, dv, cfg.query_block, cfg.key_block, cfg.split_chunk};
    // Each thread readies its state once per call: the scratch is made only when the shapes it
    // depends on changed, and the thread's block GEMMs pack into its own buffers.
    auto enter = [&](tiled_thread_state<Scalar>& state) {
        if (!(state.made_for == key)) {
            state.tile = make_scratch();
            state.made_for = key;
        }
        return scoped_gemm_buffers<Scalar>(&state.gemm);
    };
    auto run = [&](Index index, tiled_thread_state<Scalar>& state) {
        tile_scratch<Scalar>& t = state.tile;
        const tiled_task& tk = tasks[static_cast<std::size_t>(index)];
        const Index h_begin = tk.h < 0 ? 0 : tk.h;
        const Index h_end = tk.h < 0 ? num_heads : tk.h + 1;
        for (Index h = h_begin; h < h_end; ++h) {
            const head_problem<Scalar> p = problem(tk.b, h);
            if (tk.chunk >= 0) {
                const Index lo = tk.chunk * cfg.split_chunk;
                const Index hi = std::min(p.lk, lo + cfg.split_chunk);
                online_pass(p, tk.i0, tk.nq, lo, hi, cfg, t);
                const Index at = partial_at(tk.b, h, tk.chunk) + tk.i0;
                Eigen::Map<matrix<Scalar>>(ws.partial_acc.data() + at * dv, dv, tk.nq) =
                    t.acc.topLeftCorner(dv, tk.nq);
                ws.partial_m.segment(at, tk.nq) = t.m.head(tk.nq);
                ws.partial_l.segment(at, tk.nq) = t.l.head(tk.nq);
                continue;
            }
            online_pass(p, tk.i0, tk.nq, 0, p.lk, cfg, t);
            finalize_block(p, tk.i0, tk.nq, t);
            if (!want_weights) continue;
            if (averaged)
                weights_pass(p, tk.i0, tk.nq, cfg, t, (*weights)[static_cast<std::size_t>(tk.b)],
                             Scalar(num_heads));
            else
                weights_pass(p, tk.i0, tk.nq, cfg, t,
                             (*weights)[static_cast<std::size_t>(tk.b * num_heads + h)], Scalar(0));
        }
    };
    parallel_tasks(static_cast<Index>(tasks.size()), cfg.threads, ws.threads, enter, run);
    equalize_gemm_buffers(ws.threads);

    // Merge the split partials by log-sum-exp, chunk by chunk in order (deterministic).
    auto& merges = ws.merges;
    merges.clear();
    for (Index b = 0; b < nb; ++b)
        if (chunks_of[static_cast<std::size_t>(b)] > 0)
            for (Index h = 0; h < num_heads; ++h)
                merges.emplace_back(b, h);
    if (merges.empty()) return;
    auto merge = [&](Index index, tiled_thread_state<Scalar>& state) {
        tile_scratch<Scalar>& t = state.tile;
        const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
        const auto [b, h] = merges[static_cast<std::size_t>(index)];
        const head_problem<Scalar> p = problem(b, h);
        const Index nchunks = chunks_of[static_cast<std::size_t>(b)];
        const Index first = partial_at(b, h, 0);  // chunk ch of query i: column first + ch·lq + i
        for (Index i0 = 0; i0 < p.lq; i0 += cfg.query_block) {
            const Index nq = std::min(cfg.query_block, p.lq - i0);
            for (Index c = 0; c < nq; ++c) {
                const Index i = i0 + c;
                Scalar m = minus_inf;
                for (Index ch = 0; ch < nchunks; ++ch)
                    m = nan_propagating_max(m, ws.partial_m(first + ch * p.lq + i));
                t.m(c) = m;
                t.l(c) = Scalar(0);
                auto acc = t.acc.col(c).head(dv);
                acc.setZero();
                if (m == minus_inf) continue;
                for (Index ch = 0; ch < nchunks; ++ch) {
                    const Index at = first + ch * p.lq + i;
                    // A chunk in which the query saw nothing is skipped, not multiplied by 0:
                    // its accumulator may hold 0·NaN from poisoned excluded values.
                    if (ws.partial_m(at) == minus_inf) continue;
                    const Scalar alpha = std::exp(ws.partial_m(at) - m);
                    t.l(c) += alpha * ws.partial_l(at);
                    acc += alpha *
                           Eigen::Map<const vector<Scalar>>(ws.partial_acc.data() + at * dv, dv);
                }
            }
            finalize_block(p, i0, nq, t);
        }
    };
    parallel_tasks(static_cast<Index>(merges.size()), cfg.threads, ws.threads, enter, merge);
}

}  // namespace detail
}  // namespace mha
