// SPDX-License-Identifier: MIT
// The tiled backward pass of softmax attention (the FlashAttention-2 scheme): the scores and
// weights of each (key block, query block) are recomputed from Q, K and the forward's per-query
// log-sum-exp, so no Lk × Lq matrix exists and the memory beyond inputs, outputs and gradients
// is D (one scalar per query and head), G − 1 dQ accumulators (below) and a few blocks per
// thread.
//
// Per head, with the library's layout (one column per token; Q: d_k × Lq, K: d_k × Lk,
// V: d_v × Lk, O and dO: d_v × Lq) and S the masked scaled scores (Lk × Lq, one column per
// query):
//   D_i  = dO_i · O_i                        (per query: Σ_j P_ji·dP_ji, the softmax's dot term)
//   P    = exp(S − lse_i) per column i       (the forward's weights; 0 for an excluded key)
//   dV  += dO · Pᵀ                           (d_v × Lk)
//   dP   = Vᵀ · dO                           (Lk × Lq)
//   dS   = P ∘ (dP − D)                      (0 wherever P is excluded, by selection)
//   dQ  += scale · K · dS                    (d_k × Lq)
//   dK  += scale · Q · dSᵀ                   (d_k × Lk)
//
// Determinism. One pass over the (query block, key block) pairs with 5 block products each
// (S, dP, dV, dK, dQ), no atomics, and a summation order fixed by the shapes alone:
//   one task per (sequence, key/value head, residue r < G): the task takes the key blocks j with
//   j mod G = r in runs of 8 (in increasing j); per run, the query heads of its group in
//   increasing order, within a head the query blocks in increasing order, and for each the run's
//   key blocks in increasing j. It owns the dK and dV columns of its key blocks, so each receives
//   its terms in (head, query block) order. Its dQ terms go into accumulator r (accumulator 0 is
//   the caller's dQ, the others are (H·d_k) × Nq buffers): no other task writes the rows of its
//   head group and the columns of its sequence there, so each dQ column of r receives the key
//   blocks r, r + G, … in increasing order;
//   then one task per (sequence, query head, query block) adds accumulators 1 … G − 1 into dQ in
//   increasing order (and repairs non-finite columns, below).
// Every product runs on one thread in a fixed order: S and dP with the forward's register-tiled
// score kernel, dQ with its value kernel, dV and dK with the same register tiles reading Pᵀ and
// dSᵀ in place (accumulate_product; all in detail/tiled/block_kernels.hpp). So the bits depend
// neither on the thread count nor on which thread runs a task. The block sizes and G are fixed
// settings, never derived from the thread count. The blocks are held transposed (Sᵀ, Pᵀ, dSᵀ: query
// block × key block, one column per key), the layout of the forward's kernels, and the scale is
// folded into dS.
//
// Why accumulators by residue. A task per key block with dQ shared would need atomics (the order
// of additions then depends on the timing) or a buffer per key block (quadratic in L); a task
// per query block (a second pass for dQ alone) recomputes S and dP: 7 products instead of 5,
// which took 1.2–1.3× the CPU time at L = 2048 (separate runs). G accumulators cost
// (G − 1)·H·d_k·Nq scalars, linear in L, and give B·H_kv·G tasks. Residues rather than contiguous
// chunks of key blocks keep the tasks' work equal under a causal mask (the early key blocks see
// the most queries). G = 2 by default: one extra dQ-sized buffer (64 MiB at L = 32768 with
// 8 heads × 64 in float), and 16 tasks for 8 heads on one sequence where G = 1 would leave a
// single task per sequence with grouped heads sharing one key/value head.
//
// Masks. Each query's positional interval (mask_view::key_range) bounds the keys a block
// visits: a (query block, key block) pair outside every interval is skipped, and inside it only
// the union of the block's intervals is read, so keys past a key length are never read. The
// mask is then applied to the block's scores by selection (mask_view::apply), as the forward
// does. A query with no allowed key has lse = −∞: its P column is set to 0 without computing
// exp(S − lse) (which would be exp(−∞ + ∞) = NaN), so its dQ is exactly 0 and it adds nothing
// to dK and dV.
//
// Poisoned values. dS is 0 by selection at excluded keys, so a NaN or Inf in an excluded value
// (through dP) never reaches dS. K·dS multiplies an excluded key column by 0, and 0·NaN = NaN:
// as in the forward and the materialised backward, a dQ column that ends non-finite is
// recomputed from its allowed keys alone. dK and dV of a key read only Q, dO and the dS and P
// entries of that key, so they need no repair.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/tiled/block_softmax.hpp>
#include <mha/detail/tiled/online_softmax.hpp>

namespace mha {
namespace detail {

/// Block sizes and threads of the tiled backward. Tests shrink the blocks to reach many tile
/// boundaries with small inputs. The defaults keep one block's Pᵀ and dSᵀ (64 × 128 each, 32 KB
/// each in float) near L1 while the five products read them. With the register-tiled products,
/// query blocks of 64 took 0.85–0.95 of the CPU time of 128 at L = 512 and 2048 (8 heads × 64,
/// key blocks of 128; 32 and key blocks of 256 measured like 64, and 256 × 64 was slower); at
/// L = 8192 the two were within the run-to-run spread (docs/backward.md).
struct tiled_backward_settings {
    Index query_block = 64;
    Index key_block = 128;
    /// G: the dQ accumulators, key block j adding into number j mod G (see the top of this
    /// file); G − 1 of them are (H·d_k) × Nq buffers beyond the gradients. A fixed setting, never
    /// derived from the thread count, as the bits depend on it.
    Index dq_partials = 2;
    int threads = 0;  ///< 0: OpenMP's default (omp_get_max_threads()); ignored without OpenMP
};

/// What the tiled backward reads besides the problem's Q, K, V and mask: the forward's output
/// and per-query log-sum-exp, and the output's gradient; and the gradients it adds into (sized
/// and zeroed by the caller).
template <class Scalar>
struct tiled_backward_io {
    const_matrix_ref<Scalar> out;          // (H·d_v) × Nq: the forward's output
    const_matrix_ref<Scalar> log_sum_exp;  // H × Nq: the forward's log-sum-exp
    const_matrix_ref<Scalar> d_out;        // (H·d_v) × Nq
    matrix<Scalar>& dq;                    // (H·d_k) × Nq
    matrix<Scalar>& dk;                    // (H_kv·d_k) × Nk
    matrix<Scalar>& dv;                    // (H_kv·d_v) × Nk
};

/// One thread's scratch: two score-sized blocks and the packed query block.
template <class Scalar>
struct tiled_backward_thread_state {
    matrix<Scalar> p;           // nq_padded × key_block: Sᵀ, then Pᵀ (one column per key)
    matrix<Scalar> ds;          // nq_padded × key_block: dPᵀ, then scale·dSᵀ
    matrix<Scalar> qt;          // nq_padded × d_k: scale·Q of the query block, transposed
    matrix<Scalar> dot;         // nq_padded × d_v: dO of the query block, transposed
    vector<Scalar> lse, delta;  // nq_padded: the block's log-sum-exp and D
};

/// The views of one (sequence, query head) of a backward call.
template <class Scalar>
struct backward_head {
    const Scalar *q, *k, *v, *out, *d_out, *lse, *delta;
    Scalar *dq, *dk, *dv;
    Index q_stride, k_stride, v_stride, out_stride, d_out_stride, lse_stride;
    Index dq_stride, dk_stride, dv_stride;
    Index dk_width, dv_width, lq, lk;
    Scalar scale;
    const mask_view<Scalar>* mask;
};

/// The tiled backward of one call. See the top of this file.
template <class Scalar>
class tiled_backward_pass {
public:
    tiled_backward_pass(const attention_problem<Scalar>& p, const tiled_backward_io<Scalar>& io,
                        const tiled_backward_settings& cfg)
        : p_(p), io_(io), cfg_(cfg) {
        masks_.build(p.mask, p.heads.num_heads, p.batch);
    }

    void run() {
        compute_delta();
        const packed_batch& batch = p_.batch;
        const Index kv_heads = p_.heads.num_kv_heads, num_heads = p_.heads.num_heads;
        // The accumulators 1 … G − 1 of dQ (number 0 is io.dq itself): only as many as the
        // longest sequence has key blocks.
        Index max_blocks = 0;
        for (Index b = 0; b < batch.size(); ++b)
            max_blocks = std::max(max_blocks, key_blocks(batch.key_length(b)));
        const Index partials = std::min(std::max(cfg_.dq_partials, Index(1)), max_blocks);
        // Zeroed in place: assign() from one zero matrix would hold a copy more at the peak.
        dq_partials_.resize(static_cast<std::size_t>(std::max(partials - 1, Index(0))));
        for (matrix<Scalar>& m : dq_partials_)
            m.setZero(io_.dq.rows(), io_.dq.cols());
        // One task per (sequence, key/value head, residue r < G of the key block's index).
        struct task {
            Index b, h, r;
        };
        std::vector<task> tasks;
        for (Index b = 0; b < batch.size(); ++b) {
            if (batch.query_length(b) == 0) continue;
            const Index residues = std::min(partials, key_blocks(batch.key_length(b)));
            for (Index g = 0; g < kv_heads; ++g)
                for (Index r = 0; r < residues; ++r)
                    tasks.push_back({b, g, r});
        }
        std::vector<tiled_backward_thread_state<Scalar>> states;
        auto enter = [this](tiled_backward_thread_state<Scalar>& s) {
            const Index nqp = padded_queries<Scalar>(cfg_.query_block);
            s.p.resize(nqp, cfg_.key_block);
            s.ds.resize(nqp, cfg_.key_block);
            s.qt.resize(nqp, p_.heads.dk);
            s.dot.resize(nqp, p_.heads.dv);
            s.lse.resize(nqp);
            s.delta.resize(nqp);
            return nothing_held{};
        };
        parallel_tasks(static_cast<Index>(tasks.size()), cfg_.threads, states, enter,
                       [&](Index t, tiled_backward_thread_state<Scalar>& s) {
                           const task& k = tasks[static_cast<std::size_t>(t)];
                           key_residue_task(k.b, k.h, k.r, partials, s);
                       });
        // dQ = Σ_r partial_r in increasing r, then the repair of non-finite columns: one task per
        // (sequence, query head, query block).
        if (partials <= 1 && masks_all_unmasked()) return;
        tasks.clear();
        for (Index b = 0; b < batch.size(); ++b) {
            if (batch.key_length(b) == 0) continue;
            for (Index h = 0; h < num_heads; ++h)
                for (Index i0 = 0; i0 < batch.query_length(b); i0 += cfg_.query_block)
                    tasks.push_back({b, h, i0});
        }
        parallel_tasks(static_cast<Index>(tasks.size()), cfg_.threads, states, enter,
                       [&](Index t, tiled_backward_thread_state<Scalar>&) {
                           const task& k = tasks[static_cast<std::size_t>(t)];
                           finish_dq(k.b, k.h, k.r);
                       });
    }

private:
    // D = rowsum(dO ∘ O) per (head, query column), in a fixed order.
    void compute_delta() {
        const Index num_heads = p_.heads.num_heads, dv = p_.heads.dv, n = p_.q.cols();
        delta_.resize(num_heads, n);
        for (Index i = 0; i < n; ++i)
            for (Index h = 0; h < num_heads; ++h) {
                const Scalar* o = io_.out.data() + i * io_.out.outerStride() + h * dv;
                const Scalar* g = io_.d_out.data() + i * io_.d_out.outerStride() + h * dv;
                Scalar sum(0);
                for (Index e = 0; e < dv; ++e)
                    sum += g[e] * o[e];
                delta_(h, i) = sum;
            }
    }

    // The views of sequence b, query head h, with dQ in accumulator r (0: io.dq).
    backward_head<Scalar> head(Index b, Index h, Index r) const {
        const head_layout& heads = p_.heads;
        const Index q0 = p_.batch.query_offset(b), k0 = p_.batch.key_offset(b);
        const Index lq = p_.batch.query_length(b), lk = p_.batch.key_length(b);
        // Empty sequences are never visited; their offsets are not taken (see make_head_problem).
        matrix<Scalar>& dq = r == 0 ? io_.dq : dq_partials_[static_cast<std::size_t>(r - 1)];
        backward_head<Scalar> v;
        v.q = p_.q.data() + q0 * p_.q.outerStride() + heads.q_row(h);
        v.k = p_.k.data() + k0 * p_.k.outerStride() + heads.k_row(h);
        v.v = p_.v.data() + k0 * p_.v.outerStride() + heads.v_row(h);
        v.out = io_.out.data() + q0 * io_.out.outerStride() + heads.out_row(h);
        v.d_out = io_.d_out.data() + q0 * io_.d_out.outerStride() + heads.out_row(h);
        v.lse = io_.log_sum_exp.data() + q0 * io_.log_sum_exp.outerStride() + h;
        v.delta = delta_.data() + q0 * delta_.rows() + h;
        v.dq = dq.data() + q0 * dq.outerStride() + heads.q_row(h);
        v.dk = io_.dk.data() + k0 * io_.dk.outerStride() + heads.k_row(h);
        v.dv = io_.dv.data() + k0 * io_.dv.outerStride() + heads.v_row(h);
        v.q_stride = p_.q.outerStride();
        v.k_stride = p_.k.outerStride();
        v.v_stride = p_.v.outerStride();
        v.out_stride = io_.out.outerStride();
        v.d_out_stride = io_.d_out.outerStride();
        v.lse_stride = io_.log_sum_exp.outerStride();
        v.dq_stride = dq.outerStride();
        v.dk_stride = io_.dk.outerStride();
        v.dv_stride = io_.dv.outerStride();
        v.dk_width = heads.dk;
        v.dv_width = heads.dv;
        v.lq = lq;
        v.lk = lk;
        v.scale = p_.scale;
        v.mask = &masks_(b, h);
        return v;
    }

    // The union [lo, hi) of the allowed key intervals of queries [i0, i0 + nq), clipped to
    // [k_lo, k_hi), and whether every one of those queries allows all of it (no mask to apply).
    struct key_span {
        Index lo, hi;
        bool interior;
    };
    static key_span span(const backward_head<Scalar>& hd, Index i0, Index nq, Index k_lo,
                         Index k_hi) {
        Index lo = k_hi, hi = k_lo, max_first = k_lo, min_last = k_hi;
        for (Index c = 0; c < nq; ++c) {
            const auto r = hd.mask->key_range(i0 + c);
            const Index f = std::max(r.first, k_lo), e = std::min(r.second, k_hi);
            max_first = std::max(max_first, f);
            min_last = std::min(min_last, std::max(f, e));
            if (f < e) {
                lo = std::min(lo, f);
                hi = std::max(hi, e);
            }
        }
        if (lo >= hi) return {0, 0, true};
        const bool interior = max_first <= lo && hi <= min_last && !hd.mask->has_elementwise();
        return {lo, hi, interior};
    }

    // What block_gradients reads of queries [i0, i0 + nq), packed once per query block and kept
    // while the task's key blocks pass: scale·Qᵀ and dOᵀ (nq_padded rows), lse and D.
    void pack_queries(const backward_head<Scalar>& hd, Index i0, Index nq,
                      tiled_backward_thread_state<Scalar>& s) const {
        const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
        const Index nqp = padded_queries<Scalar>(nq);
        pack_scaled_queries(hd.q + i0 * hd.q_stride, hd.q_stride, hd.dk_width, nq, nqp, hd.scale,
                            s.qt.data(), nqp);
        pack_scaled_queries(hd.d_out + i0 * hd.d_out_stride, hd.d_out_stride, hd.dv_width, nq, nqp,
                            Scalar(1), s.dot.data(), nqp);
        for (Index c = 0; c < nqp; ++c) {
            const Index i = i0 + std::min(c, nq - 1);
            // A query with no allowed key (lse = −∞) has every score of the block excluded (−∞),
            // so P and dS are 0 by selection below; +∞ keeps exp(S − lse) from meeting −∞ + ∞.
            const Scalar l = hd.lse[i * hd.lse_stride];
            s.lse[c] = l == minus_inf ? -minus_inf : l;
            s.delta[c] = hd.delta[i * delta_.rows()];
        }
    }

    // Pᵀ (in s.p) and scale·dSᵀ (in s.ds) of queries [i0, i0 + nq) (packed by pack_queries) against
    // keys [j0, j0 + nk), both nq_padded × nk with leading dimension s.p.rows(). The scores are
    // formed as the forward forms them (the scale applied to Q, then the forward's register-tiled
    // score kernel), so that P = exp(S − lse) meets the forward's lse with the least rounding
    // apart; dPᵀ = dOᵀ·V goes through the same kernel. Rows past nq hold values never read.
    void block_gradients(const backward_head<Scalar>& hd, Index i0, Index nq, Index j0, Index nk,
                         bool interior, tiled_backward_thread_state<Scalar>& s) const {
        const Index nqp = padded_queries<Scalar>(nq), ld = s.p.rows();
        transposed_scores(s.qt.data(), nqp, nqp, hd.dk_width, hd.k + j0 * hd.k_stride, hd.k_stride,
                          nk, s.p.data(), ld);
        transposed_scores(s.dot.data(), nqp, nqp, hd.dv_width, hd.v + j0 * hd.v_stride, hd.v_stride,
                          nk, s.ds.data(), ld);
        if (!interior)
            for (Index c = 0; c < nq; ++c) {
                const Index i = i0 + c;
                const auto r = hd.mask->key_range(i);
                const Index f = std::clamp(r.first - j0, Index(0), nk);
                const Index e = std::clamp(r.second - j0, f, nk);
                hd.mask->apply(s.p.data() + c, ld, i, j0, nk, f, e);
            }
        for (Index j = 0; j < nk; ++j)
            softmax_gradient_column(s.p.data() + j * ld, s.ds.data() + j * ld, nqp, s.lse.data(),
                                    s.delta.data(), hd.scale);
    }

    // exp(S − lse) by packets. S − lse <= 0 but for rounding (lse >= every allowed score), the
    // range of exp_nonpositive, which takes about half of Eigen's pexp instructions: the exp was
    // the largest cost outside the five products (a seventh of the time under perf at L = 2048).
    // (An overload, not is_same<Packet, __m512>: GCC warns that a vector type's attributes are
    // ignored as a template argument.)
    template <class Packet>
    static MHA_ALWAYS_INLINE Packet exp_of_shifted(const Packet& x) {
        return eigen_compat::packet_ops<Scalar>::exp(x);
    }
#if defined(__AVX512F__)
    static MHA_ALWAYS_INLINE __m512 exp_of_shifted(__m512 x) {
        return exp_nonpositive(x);
    }
#endif

    // One key's column of the block over n queries (a multiple of the packet width, or any n
    // without packets): col (S → P) and dcol (dP → scale·dS), with P = exp(S − lse) and
    // dS = P ∘ (dP − D) per query. Excluded keys (S = −∞) get P = 0 and dS = 0 by selection,
    // whatever dP holds (a poisoned value); P below exp_flush_below is 0, as in the forward, so
    // that no subnormal reaches the products. Packets: Eigen's select() is evaluated one
    // coefficient at a time, and its scalar std::exp took a quarter of the backward's time.
    static void softmax_gradient_column(Scalar* col, Scalar* dcol, Index n, const Scalar* lse,
                                        const Scalar* delta, Scalar scale) {
        using ops = eigen_compat::packet_ops<Scalar>;
        using packet = typename ops::packet;
        constexpr Index w = ops::width;
        const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
        Index c = 0;
        if constexpr (w > 1 && ops::has_exp) {
            const packet pinf = ops::broadcast(minus_inf);
            const packet flush = ops::broadcast(exp_flush_below<Scalar>());
            const packet ps = ops::broadcast(scale);
            for (; c + w <= n; c += w) {
                const packet x = ops::load(col + c);
                const packet shifted = ops::sub(x, ops::load(lse + c));
                const packet excluded = ops::equal(x, pinf);
                // `less` is false for NaN: NaN scores keep their NaN.
                const packet pr = ops::clear_where(
                    exp_of_shifted(shifted), ops::either(excluded, ops::less(shifted, flush)));
                const packet ds =
                    ops::mul(ps, ops::mul(pr, ops::sub(ops::load(dcol + c), ops::load(delta + c))));
                ops::store(col + c, pr);
                ops::store(dcol + c, ops::clear_where(ds, excluded));
            }
        }
        for (; c < n; ++c) {
            const bool excluded = col[c] == minus_inf;
            const Scalar pr = excluded ? Scalar(0) : exp_or_zero(col[c] - lse[c]);
            dcol[c] = excluded ? Scalar(0) : scale * (pr * (dcol[c] - delta[c]));
            col[c] = pr;
        }
    }
    Index key_blocks(Index lk) const {
        return (lk + cfg_.key_block - 1) / cfg_.key_block;
    }

    bool masks_all_unmasked() const {
        for (Index b = 0; b < p_.batch.size(); ++b)
            for (Index h = 0; h < p_.heads.num_heads; ++h)
                if (!masks_(b, h).is_unmasked()) return false;
        return true;
    }

    // dK and dV of the key blocks j ≡ r (mod partials) of sequence b, key/value head g, in
    // increasing j, and their dQ contributions into accumulator r.
    void key_residue_task(Index b, Index g, Index r, Index partials,
                          tiled_backward_thread_state<Scalar>& s) const {
        const Index group = p_.heads.num_heads / p_.heads.num_kv_heads;
        const Index lk = p_.batch.key_length(b);
        const Index step = partials * cfg_.key_block;
        // Runs of key_blocks_per_pack of the task's key blocks: a query block is packed once per
        // run, and the run's K and V blocks (64 KB per block at d = 64 in float) stay in L2
        // while every query block passes. Without runs, L = 8192 streamed K and V from memory.
        for (Index c0 = r * cfg_.key_block; c0 < lk; c0 += key_blocks_per_pack * step) {
            const Index c1 = std::min(lk, c0 + key_blocks_per_pack * step);
            for (Index h = g * group; h < (g + 1) * group; ++h) {
                const backward_head<Scalar> hd = head(b, h, r);
                for (Index i0 = 0; i0 < hd.lq; i0 += cfg_.query_block) {
                    const Index nq = std::min(cfg_.query_block, hd.lq - i0);
                    bool packed = false;
                    for (Index j0 = c0; j0 < c1; j0 += step) {
                        const key_span sp = span(hd, i0, nq, j0, std::min(lk, j0 + cfg_.key_block));
                        if (sp.lo >= sp.hi) continue;
                        if (!packed) pack_queries(hd, i0, nq, s);
                        packed = true;
                        block_pair(hd, i0, nq, sp, s);
                    }
                }
            }
        }
    }

    static constexpr Index key_blocks_per_pack = 8;

    // Queries [i0, i0 + nq) of head hd (packed by pack_queries) against keys [sp.lo, sp.hi):
    // dV += dO·Pᵀ, dK += Q·(scale·dS)ᵀ, and dQ += K·(scale·dS) into hd.dq (the task's
    // accumulator).
    void block_pair(const backward_head<Scalar>& hd, Index i0, Index nq, const key_span& sp,
                    tiled_backward_thread_state<Scalar>& s) const {
        const Index ld = s.p.rows();
        const Index nk = sp.hi - sp.lo;
        block_gradients(hd, i0, nq, sp.lo, nk, sp.interior, s);
        // Pᵀ and dSᵀ (nq × nk, one column per key) are the right operands of dV and dK as
        // they lie; dQ reads dS with the forward's register-tiled value kernel, which takes
        // it in that layout too.
        accumulate_product(hd.d_out + i0 * hd.d_out_stride, hd.d_out_stride, hd.dv_width, nq,
                           s.p.data(), ld, nk, hd.dv + sp.lo * hd.dv_stride, hd.dv_stride);
        accumulate_product(hd.q + i0 * hd.q_stride, hd.q_stride, hd.dk_width, nq, s.ds.data(), ld,
                           nk, hd.dk + sp.lo * hd.dk_stride, hd.dk_stride);
        accumulate_values(hd.k + sp.lo * hd.k_stride, hd.k_stride, hd.dk_width, nk, s.ds.data(), ld,
                          nq, hd.dq + i0 * hd.dq_stride, hd.dq_stride);
    }

    // dQ of queries [i0, i0 + query_block) of sequence b, query head h: the accumulators added
    // into io.dq in increasing order, then the non-finite columns repaired.
    void finish_dq(Index b, Index h, Index i0) const {
        const backward_head<Scalar> hd = head(b, h, 0);
        const Index nq = std::min(cfg_.query_block, hd.lq - i0);
        for (std::size_t r = 0; r < dq_partials_.size(); ++r) {
            const backward_head<Scalar> part = head(b, h, static_cast<Index>(r) + 1);
            for (Index c = i0; c < i0 + nq; ++c) {
                Scalar* dst = hd.dq + c * hd.dq_stride;
                const Scalar* src = part.dq + c * part.dq_stride;
                for (Index d = 0; d < hd.dk_width; ++d)
                    dst[d] += src[d];
            }
        }
        if (hd.mask->is_unmasked()) return;
        for (Index c = 0; c < nq; ++c) {
            Eigen::Map<vector<Scalar>> dq(hd.dq + (i0 + c) * hd.dq_stride, hd.dk_width);
            if (!all_finite(dq)) repair_dq(hd, i0 + c);
        }
    }

    // dQ of query i from its allowed keys alone (see "Poisoned values" above).
    void repair_dq(const backward_head<Scalar>& hd, Index i) const {
        using cvec = Eigen::Map<const vector<Scalar>>;
        const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
        Eigen::Map<vector<Scalar>> dq(hd.dq + i * hd.dq_stride, hd.dk_width);
        dq.setZero();
        const Scalar lse = hd.lse[i * hd.lse_stride];
        if (lse == minus_inf) return;
        const Scalar d = hd.delta[i * delta_.rows()];
        const cvec qi(hd.q + i * hd.q_stride, hd.dk_width);
        const cvec gi(hd.d_out + i * hd.d_out_stride, hd.dv_width);
        const auto range = hd.mask->key_range(i);
        for (Index j = range.first; j < range.second; ++j) {
            if (hd.mask->excludes(j, i)) continue;
            const cvec kj(hd.k + j * hd.k_stride, hd.dk_width);
            Scalar x = kj.dot(hd.scale * qi);
            if (hd.mask->has_bias()) x += hd.mask->bias(j, i);
            if (x == minus_inf) continue;
            const Scalar pr = std::exp(x - lse);
            const Scalar dsr = pr * (cvec(hd.v + j * hd.v_stride, hd.dv_width).dot(gi) - d);
            dq += (hd.scale * dsr) * kj;
        }
    }

    const attention_problem<Scalar>& p_;
    const tiled_backward_io<Scalar>& io_;
    tiled_backward_settings cfg_;
    mask_views<Scalar> masks_;
    matrix<Scalar> delta_;  // H × Nq
    // G − 1 matrices of (H·d_k) × Nq: the dQ accumulators 1 … G − 1; each task writes the rows
    // of its head group and the columns of its sequence in one of them.
    mutable std::vector<matrix<Scalar>> dq_partials_;
};

/// The tiled backward of softmax attention over a validated problem (its `out` is not read;
/// softcap, ALiBi and sinks must be absent). The gradients in `io` are sized and zeroed by the
/// caller; the result is the same bit for bit on every thread count.
template <class Scalar>
void tiled_backward(const attention_problem<Scalar>& p, const tiled_backward_io<Scalar>& io,
                    const tiled_backward_settings& cfg = {}) {
    tiled_backward_pass<Scalar> pass(p, io, cfg);
    pass.run();
}

}  // namespace detail
}  // namespace mha
