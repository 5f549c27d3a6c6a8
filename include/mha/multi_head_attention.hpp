// SPDX-License-Identifier: MIT
// The multi-head attention layer, for one sequence or a packed batch, self- or cross-attention.
// A call runs named stages: validate (every check, once) -> project_inputs (Q, K, V of every
// token) -> attend (every head, written into its rows of the concatenated heads) ->
// project_output.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <mha/attention.hpp>
#include <mha/attention_config.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>
#include <mha/projection.hpp>

namespace mha {

/// Output of `forward_with_weights`.
template <class Scalar>
struct attention_result {
    matrix<Scalar> output;                ///< E × Nq
    std::vector<matrix<Scalar>> weights;  ///< see `weights_mode`; each Lk × Lq
};

/// Every buffer a forward call needs: the projected Q/K/V, the concatenated heads, and the
/// attention kernel's and the GEMMs' scratch. Pass the same workspace to repeated `forward_into`
/// calls and, once a call has run with given shapes, later calls with those shapes allocate
/// nothing (see `forward_into`). One workspace per thread.
template <class Scalar>
struct forward_workspace {
    matrix<Scalar> qkv;    ///< self-attention: stacked Q, K, V, (2·H·d_k + H·d_v) × N
    matrix<Scalar> q;      ///< cross-attention: H·d_k × Nq
    matrix<Scalar> k;      ///< cross-attention: H·d_k × Nk
    matrix<Scalar> v;      ///< cross-attention: H·d_v × Nk
    matrix<Scalar> heads;  ///< concatenated head outputs, H·d_v × Nq
    /// The attention core's buffers (tiled kernel, materialised scores) and the GEMM packing
    /// buffers of every product of the call, projections included. Internal; grows only.
    detail::attention_workspace<Scalar> internal;
};

/// Multi-head attention layer. `const` member functions may be called from several threads.
template <class Scalar>
class multi_head_attention {
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");

public:
    using input = Eigen::Ref<const matrix<Scalar>>;

    /// Deterministic initialisation from `seed`, with PyTorch's distributions: Xavier-uniform
    /// input projections (over the stacked [W_q; W_k; W_v] when all inputs have width E, as
    /// PyTorch's `in_proj_weight`), U(±1/√(H·d_v)) for W_o, zero biases.
    explicit multi_head_attention(const attention_config& config, std::uint64_t seed = 0)
        : config_(config.resolved()) {
        detail::check_scale<Scalar>("mha::multi_head_attention", "config.attention.scale",
                                    config_.attention.scale);
        std::mt19937_64 engine(seed);
        // The standard fixes mt19937_64's output but not uniform_real_distribution's, so map
        // the bits to [−bound, bound) here to get the same numbers on every platform.
        auto uniform = [&engine](matrix<Scalar>& w, double bound) {
            for (Index c = 0; c < w.cols(); ++c)
                for (Index r = 0; r < w.rows(); ++r) {
                    const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;
                    w(r, c) = static_cast<Scalar>((2.0 * unit - 1.0) * bound);
                }
        };
        auto xavier = [](Index fan_out, Index fan_in) {
            return std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
        };
        const Index qk = qk_width();
        const Index vw = v_width();
        fused_ = config_.key_input_dim == config_.embed_dim &&
                 config_.value_input_dim == config_.embed_dim;
        if (fused_) {
            w_in_.resize(2 * qk + vw, config_.embed_dim);
            uniform(w_in_, xavier(w_in_.rows(), w_in_.cols()));
        } else {
            w_in_.resize(qk, config_.embed_dim);
            w_k_.resize(qk, config_.key_input_dim);
            w_v_.resize(vw, config_.value_input_dim);
            uniform(w_in_, xavier(w_in_.rows(), w_in_.cols()));
            uniform(w_k_, xavier(w_k_.rows(), w_k_.cols()));
            uniform(w_v_, xavier(w_v_.rows(), w_v_.cols()));
        }
        w_o_.resize(config_.embed_dim, vw);
        uniform(w_o_, 1.0 / std::sqrt(static_cast<double>(vw)));
        if (config_.bias) {
            b_in_ = vector<Scalar>::Zero(2 * qk + vw);
            b_o_ = vector<Scalar>::Zero(config_.embed_dim);
        }
    }

    /// A layer with the given parameters; their shapes are checked against `config`.
    multi_head_attention(const attention_config& config, const attention_parameters<Scalar>& p)
        : config_(config.resolved()) {
        constexpr const char* where = "mha::multi_head_attention";
        detail::check_scale<Scalar>(where, "config.attention.scale", config_.attention.scale);
        const Index qk = qk_width();
        const Index vw = v_width();
        const Index e = config_.embed_dim;
        check_matrix(where, "parameters.w_q", p.w_q, qk, e);
        check_matrix(where, "parameters.w_k", p.w_k, qk, config_.key_input_dim);
        check_matrix(where, "parameters.w_v", p.w_v, vw, config_.value_input_dim);
        check_matrix(where, "parameters.w_o", p.w_o, e, vw);
        const bool bias = config_.bias;
        check_bias(where, "parameters.b_q", p.b_q, bias ? qk : 0);
        check_bias(where, "parameters.b_k", p.b_k, bias ? qk : 0);
        check_bias(where, "parameters.b_v", p.b_v, bias ? vw : 0);
        check_bias(where, "parameters.b_o", p.b_o, bias ? e : 0);
        fused_ = config_.key_input_dim == e && config_.value_input_dim == e;
        if (fused_) {
            w_in_.resize(2 * qk + vw, e);
            w_in_ << p.w_q, p.w_k, p.w_v;
        } else {
            w_in_ = p.w_q;
            w_k_ = p.w_k;
            w_v_ = p.w_v;
        }
        w_o_ = p.w_o;
        if (bias) {
            b_in_.resize(2 * qk + vw);
            b_in_ << p.b_q, p.b_k, p.b_v;
            b_o_ = p.b_o;
        }
    }

    /// From PyTorch's packed parameters: `in_proj_weight` (3E × E, rows q, k, v),
    /// `in_proj_bias` (3E, or size 0 without bias), `out_proj.weight` (E × E) and
    /// `out_proj.bias` (E, or size 0). Needs head_dim = value_head_dim = E / H and
    /// kdim = vdim = E, which is when PyTorch packs them.
    static multi_head_attention from_packed(const attention_config& config,
                                            const Eigen::Ref<const matrix<Scalar>>& in_proj_weight,
                                            const Eigen::Ref<const vector<Scalar>>& in_proj_bias,
                                            const Eigen::Ref<const matrix<Scalar>>& out_weight,
                                            const Eigen::Ref<const vector<Scalar>>& out_bias) {
        constexpr const char* where = "mha::multi_head_attention::from_packed";
        const attention_config c = config.resolved();
        const Index e = c.embed_dim;
        const Index qk = c.num_heads * c.head_dim;
        const Index vw = c.num_heads * c.value_head_dim;
        // PyTorch packs q, k and v only when they all project from width E; a layer with other
        // key or value widths has separate weights (use the constructor taking them).
        if (c.key_input_dim != e)
            detail::fail<value_error>(where, "config.key_input_dim",
                                      "embed_dim = " + std::to_string(e) + " for packed weights",
                                      c.key_input_dim);
        if (c.value_input_dim != e)
            detail::fail<value_error>(where, "config.value_input_dim",
                                      "embed_dim = " + std::to_string(e) + " for packed weights",
                                      c.value_input_dim);
        check_matrix(where, "in_proj_weight", in_proj_weight, 2 * qk + vw, e);
        // Checked here under PyTorch's names; the constructor would name parameters.w_o/b_o.
        check_matrix(where, "out_proj.weight", out_weight, e, vw);
        attention_parameters<Scalar> p;
        p.w_q = in_proj_weight.topRows(qk);
        p.w_k = in_proj_weight.middleRows(qk, qk);
        p.w_v = in_proj_weight.bottomRows(vw);
        p.w_o = out_weight;
        if (c.bias) {
            check_bias(where, "in_proj_bias", in_proj_bias, 2 * qk + vw);
            check_bias(where, "out_proj.bias", out_bias, e);
            p.b_q = in_proj_bias.head(qk);
            p.b_k = in_proj_bias.segment(qk, qk);
            p.b_v = in_proj_bias.tail(vw);
            p.b_o = out_bias;
        } else {
            check_bias(where, "in_proj_bias", in_proj_bias, 0);
            check_bias(where, "out_proj.bias", out_bias, 0);
        }
        return multi_head_attention(c, p);
    }

    /// Self-attention over one sequence: x is E × L, returns E × L.
    matrix<Scalar> forward(const input& x, const attention_mask<Scalar>& mask = {}) const {
        return forward(x, packed_batch::single(x.cols(), x.cols()), mask);
    }

    /// Self-attention over a packed batch: x is E × (Σ lengths).
    matrix<Scalar> forward(const input& x, const packed_batch& batch,
                           const attention_mask<Scalar>& mask = {}) const {
        return run_allocating(self_inputs(x), batch, mask, {}).output;
    }

    /// Cross-attention over one sequence: query E × Lq, key kdim × Lk, value vdim × Lk.
    matrix<Scalar> forward(const input& query, const input& key, const input& value,
                           const attention_mask<Scalar>& mask = {}) const {
        return forward(query, key, value, packed_batch::single(query.cols(), key.cols()), mask);
    }

    /// Cross-attention over a packed batch.
    matrix<Scalar> forward(const input& query, const input& key, const input& value,
                           const packed_batch& batch,
                           const attention_mask<Scalar>& mask = {}) const {
        return run_allocating({query, key, value, false}, batch, mask, {}).output;
    }

    /// Self-attention over one sequence, also returning the attention weights.
    attention_result<Scalar> forward_with_weights(const input& x, weights_mode mode,
                                                  const attention_mask<Scalar>& mask = {}) const {
        return forward_with_weights(x, packed_batch::single(x.cols(), x.cols()), mode, mask);
    }

    /// Self-attention over a packed batch, also returning the attention weights (x projected by
    /// one GEMM, as in `forward`).
    attention_result<Scalar> forward_with_weights(const input& x, const packed_batch& batch,
                                                  weights_mode mode,
                                                  const attention_mask<Scalar>& mask = {}) const {
        return run_allocating(self_inputs(x), batch, mask, attention_request{mode, false});
    }

    /// The general form: cross- or self-attention over a packed batch, returning the output
    /// (E × Nq) and, unless `mode` is none, the weights.
    attention_result<Scalar> forward_with_weights(const input& query, const input& key,
                                                  const input& value, const packed_batch& batch,
                                                  weights_mode mode,
                                                  const attention_mask<Scalar>& mask = {}) const {
        return run_allocating({query, key, value, false}, batch, mask,
                              attention_request{mode, false});
    }

    /// Self-attention over a packed batch into `out` (E × N, not resized), reusing the buffers
    /// of `workspace` across calls. `out` may be `x` itself (or overlap it): the inputs are
    /// projected into the workspace before `out` is written.
    ///
    /// No heap allocation. Once a call has run on `workspace` with the same shapes (token
    /// counts, number of sequences and their lengths) and the same OpenMP thread count, a call
    /// allocates nothing: not through Eigen, not through operator new, not through malloc
    /// (tests/test_allocation_free.cpp counts all three, for every mask kind and their
    /// composition, packed batches, decode over long caches, the materialised algorithm, relu
    /// and sigmoid, float and double, 1 and 2 threads). What still allocates:
    /// - a call whose shapes differ from the previous call's: the Q/K/V and head matrices take
    ///   the new token counts; the kernels' buffers grow to the largest shapes and thread
    ///   count seen and never shrink;
    /// - inputs that `Eigen::Ref<const matrix>` cannot view in place (row-major storage, an inner
    ///   stride, an expression): Eigen copies them into a temporary. Matrices, column blocks and
    ///   column-major Maps with inner stride 1 are viewed;
    /// - building the `packed_batch` and the `attention_mask` (they own vectors): build them once
    ///   and pass the same objects again (a default `{}` mask allocates nothing);
    /// - an exception on bad input (its message).
    /// Every product runs on this call's OpenMP threads (OMP_NUM_THREADS, omp_set_num_threads),
    /// never through Eigen's own parallel GEMM, and the result is the same for every count.
    void forward_into(const input& x, const packed_batch& batch, const attention_mask<Scalar>& mask,
                      Eigen::Ref<matrix<Scalar>> out, forward_workspace<Scalar>& workspace) const {
        run(self_inputs(x), batch, mask, out, {}, workspace);
    }

    /// Cross-attention over a packed batch into `out` (E × Nq, not resized), reusing the
    /// buffers of `workspace` across calls. Allocates nothing under the conditions of the
    /// self-attention overload above. `out` may overlap `query`, `key` or `value`, as above.
    void forward_into(const input& query, const input& key, const input& value,
                      const packed_batch& batch, const attention_mask<Scalar>& mask,
                      Eigen::Ref<matrix<Scalar>> out, forward_workspace<Scalar>& workspace) const {
        run({query, key, value, false}, batch, mask, out, {}, workspace);
    }

    const attention_config& config() const { return config_; }
    Index qk_width() const { return config_.num_heads * config_.head_dim; }
    Index v_width() const { return config_.num_heads * config_.value_head_dim; }

    /// A copy of the parameters in the separate-matrix form.
    attention_parameters<Scalar> parameters() const {
        attention_parameters<Scalar> p;
        const Index qk = qk_width();
        const Index vw = v_width();
        p.w_q = w_in_.topRows(qk);
        p.w_k = fused_ ? matrix<Scalar>(w_in_.middleRows(qk, qk)) : w_k_;
        p.w_v = fused_ ? matrix<Scalar>(w_in_.bottomRows(vw)) : w_v_;
        p.w_o = w_o_;
        if (config_.bias) {
            p.b_q = b_in_.head(qk);
            p.b_k = b_in_.segment(qk, qk);
            p.b_v = b_in_.tail(vw);
            p.b_o = b_o_;
        }
        return p;
    }

private:
    template <class M>
    static void check_matrix(const char* where, const char* name, const M& m, Index rows,
                             Index cols) {
        detail::check_size(where, std::string(name) + ".rows()", rows, m.rows());
        detail::check_size(where, std::string(name) + ".cols()", cols, m.cols());
    }
    template <class V>
    static void check_bias(const char* where, const char* name, const V& b, Index size) {
        detail::check_size(where, std::string(name) + ".size()", size, b.size(),
                           size == 0 ? "no bias configured" : nullptr);
    }

    // Biases of the stacked input projection, as segments (size 0 without bias).
    auto bias_segment(Index start, Index size) const {
        return b_in_.segment(config_.bias ? start : 0, config_.bias ? size : 0);
    }

    // The token sources of a call. Self-attention reads one x for all three, which lets
    // project_inputs compute Q, K and V with one GEMM.
    struct layer_inputs {
        const input& query;  // E × Nq
        const input& key;    // key_input_dim × Nk
        const input& value;  // value_input_dim × Nk
        bool self;
    };
    static layer_inputs self_inputs(const input& x) { return {x, x, x, true}; }

    // Projected Q, K and V, viewed in the workspace.
    struct projected {
        detail::const_matrix_ref<Scalar> q;  // (H·d_k) × Nq
        detail::const_matrix_ref<Scalar> k;  // (H·d_k) × Nk
        detail::const_matrix_ref<Scalar> v;  // (H·d_v) × Nk
    };

    // A forward call that allocates its result and its buffers.
    attention_result<Scalar> run_allocating(const layer_inputs& in, const packed_batch& batch,
                                            const attention_mask<Scalar>& mask,
                                            const attention_request& request) const {
        attention_result<Scalar> r;
        r.output.resize(config_.embed_dim, in.query.cols());
        forward_workspace<Scalar> workspace;
        r.weights = run(in, batch, mask, r.output, request, workspace).weights;
        return r;
    }

    attention_outputs<Scalar> run(const layer_inputs& in, const packed_batch& batch,
                                  const attention_mask<Scalar>& mask,
                                  Eigen::Ref<matrix<Scalar>> out, const attention_request& request,
                                  forward_workspace<Scalar>& ws) const {
        validate(in, batch, mask, out);
        const projected qkv = project_inputs(in, ws);
        attention_outputs<Scalar> outputs = attend(qkv, batch, mask, request, ws);
        project_output(ws, out);
        return outputs;
    }

    // Every check of a call, before any work: the kernels below trust what passes here.
    void validate(const layer_inputs& in, const packed_batch& batch,
                  const attention_mask<Scalar>& mask, const Eigen::Ref<matrix<Scalar>>& out) const {
        constexpr const char* where = "mha::multi_head_attention::forward";
        detail::check_size(where, "query.rows()", config_.embed_dim, in.query.rows(), "embed_dim");
        detail::check_size(where, "key.rows()", config_.key_input_dim, in.key.rows(),
                           "key_input_dim");
        detail::check_size(where, "value.rows()", config_.value_input_dim, in.value.rows(),
                           "value_input_dim");
        detail::check_size(where, "value.cols()", in.key.cols(), in.value.cols(), "key.cols()");
        detail::check_size(where, "query.cols()", batch.total_queries(), in.query.cols(),
                           "the batch's total query count");
        detail::check_size(where, "key.cols()", batch.total_keys(), in.key.cols(),
                           "the batch's total key count");
        detail::check_size(where, "out.rows()", config_.embed_dim, out.rows(), "embed_dim");
        detail::check_size(where, "out.cols()", in.query.cols(), out.cols(), "query.cols()");
        mask.validate(where, config_.num_heads, batch.query_lengths(), batch.key_lengths());
    }

    // Q, K and V of every token, into the workspace. Every product packs into the workspace's
    // GEMM buffers, on this call's OpenMP threads (never Eigen's own parallel GEMM, which
    // allocates): see detail/gemm.hpp. resize() keeps a buffer whose size is unchanged, so
    // repeated calls reuse the workspace.
    projected project_inputs(const layer_inputs& in, forward_workspace<Scalar>& ws) const {
        const Index qk = qk_width();
        const Index vw = v_width();
        auto* gemm = &ws.internal.gemm;
        if (in.self && fused_) {
            // One GEMM over every token for Q, K and V together.
            ws.qkv.resize(2 * qk + vw, in.query.cols());
            detail::linear_into(w_in_, b_in_, in.query, ws.qkv, gemm);
            auto views = split_qkv(ws.qkv, qk, vw);
            return {views.q, views.k, views.v};
        }
        ws.q.resize(qk, in.query.cols());
        ws.k.resize(qk, in.key.cols());
        ws.v.resize(vw, in.key.cols());
        detail::linear_into(w_in_.topRows(qk), bias_segment(0, qk), in.query, ws.q, gemm);
        if (fused_) {
            detail::linear_into(w_in_.middleRows(qk, qk), bias_segment(qk, qk), in.key, ws.k, gemm);
            detail::linear_into(w_in_.bottomRows(vw), bias_segment(2 * qk, vw), in.value, ws.v,
                                gemm);
        } else {
            detail::linear_into(w_k_, bias_segment(qk, qk), in.key, ws.k, gemm);
            detail::linear_into(w_v_, bias_segment(2 * qk, vw), in.value, ws.v, gemm);
        }
        return {ws.q, ws.k, ws.v};
    }

    // Every head's attention, each written into its rows of ws.heads ((H·d_v) × Nq).
    attention_outputs<Scalar> attend(const projected& qkv, const packed_batch& batch,
                                     const attention_mask<Scalar>& mask,
                                     const attention_request& request,
                                     forward_workspace<Scalar>& ws) const {
        const Index h = config_.num_heads;
        ws.heads.resize(v_width(), qkv.q.cols());
        const detail::attention_problem<Scalar> problem{
            qkv.q,
            qkv.k,
            qkv.v,
            ws.heads,
            {h, h, config_.head_dim, config_.value_head_dim},
            batch,
            mask,
            detail::resolve_scale<Scalar>("mha::multi_head_attention::forward", config_.attention,
                                          config_.head_dim),
            config_.attention.normalize,
            request};
        return detail::attend(problem, config_.attention.algorithm, &ws.internal);
    }

    // out = W_o·heads + b_o.
    void project_output(forward_workspace<Scalar>& ws, Eigen::Ref<matrix<Scalar>> out) const {
        detail::linear_into(w_o_, b_o_, ws.heads, out, &ws.internal.gemm);
    }

    attention_config config_;
    bool fused_ = true;    // key and value inputs have width E: W_q, W_k, W_v stacked in w_in_
    matrix<Scalar> w_in_;  // fused: [W_q; W_k; W_v], (2·H·d_k + H·d_v) × E; else W_q only
    matrix<Scalar> w_k_;   // unfused only: (H·d_k) × key_input_dim
    matrix<Scalar> w_v_;   // unfused only: (H·d_v) × value_input_dim
    vector<Scalar> b_in_;  // [b_q; b_k; b_v], or size 0 without bias
    matrix<Scalar> w_o_;   // E × (H·d_v)
    vector<Scalar> b_o_;   // E, or size 0
};

}  // namespace mha
