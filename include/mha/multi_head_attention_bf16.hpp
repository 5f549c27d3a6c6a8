// SPDX-License-Identifier: MIT
/// @file
/// The multi-head attention layer on bfloat16 storage: weights and activations in
/// Eigen::bfloat16, every sum in fp32, the output in float. A call runs the stages of the fp32
/// layer (mha/multi_head_attention.hpp) with their bf16 counterparts: the input projection
/// (mha::linear on bf16; with rotary positions Q and K turned in fp32 first; Q, K and V rounded
/// once to bf16) -> the bf16 core (fp32 softmax, the heads rounded once to bf16) -> the output
/// projection (fp32 result).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <mha/attention_bf16.hpp>
#include <mha/attention_config.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/decode_step.hpp>
#include <mha/detail/layer_parameters.hpp>
#include <mha/detail/rotary_positions.hpp>
#include <mha/kv_cache.hpp>
#include <mha/mask.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/projection_bf16.hpp>
#include <mha/rotary.hpp>

namespace mha {

/// Every buffer a bf16 forward call needs. Pass the same workspace to repeated `forward_into`
/// calls: once a call has run with given shapes, later calls with those shapes allocate nothing.
/// One workspace per thread.
struct bf16_forward_workspace {
    /// A column-major bfloat16 matrix.
    using bf16_matrix = Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>;
    bf16_matrix qkv;        ///< self-attention: stacked Q, K, V, (H·d_k + H_kv·(d_k + d_v)) × N
    bf16_matrix q;          ///< cross-attention: H·d_k × Nq
    bf16_matrix k;          ///< cross-attention: H_kv·d_k × Nk
    bf16_matrix v;          ///< cross-attention: H_kv·d_v × Nk
    matrix<float> heads32;  ///< the core's fp32 result, H·d_v × Nq
    matrix<float> q32;      ///< rotary positions only: Q before rounding, H·d_k × Nq
    matrix<float> k32;      ///< rotary positions only: K before rounding, H_kv·d_k × Nk
    bf16_matrix heads;      ///< heads32 rounded once, the output projection's input, H·d_v × Nq
    bf16_linear_workspace linear;  ///< the projections' packing buffers; internal
    detail::bf16_workspace core;   ///< the attention kernel's buffers; internal
    detail::decode_buffers<Eigen::bfloat16, float> decoding;  ///< decode_into's; internal
};

/// Multi-head attention layer on bfloat16 storage. The weights are stored once as bf16 (rounded
/// to nearest-even from the fp32 parameters; the fused [W_q; W_k; W_v] when key_input_dim =
/// value_input_dim = E), the biases stay fp32. The weights are also kept packed in the panels of
/// the GEMM the build runs (vdpbf16ps pair panels, or the portable path's bf16 row panels), so
/// that no call packs them again (twice the weights' bf16 memory: 4 MiB for E = 512, 8 heads).
/// Inputs are Eigen::bfloat16 (convert an fp32 activation once with `.cast<Eigen::bfloat16>()`),
/// the output is float. Supports what the bf16 core supports: softmax, masks, packed batches,
/// grouped heads, d_k ≠ d_v, soft-capping, ALiBi, sinks, and rotary positions as the fp32 layer
/// places them (Q and K projected in fp32, turned in fp32, then rounded once); the constructor
/// refuses the rest
/// (value_error naming the config field). `const` member functions may be called from several
/// threads, each with its own workspace.
class multi_head_attention_bf16 {
public:
    /// A column-major bfloat16 matrix (the weights, the inputs).
    using bf16_matrix = Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>;
    /// What the forward calls take: any column-major bf16 matrix expression with inner stride 1,
    /// viewed without a copy.
    using input = Eigen::Ref<const bf16_matrix>;

    /// A layer with the given fp32 parameters (shapes checked against `config`), rounded once
    /// to bf16.
    multi_head_attention_bf16(const attention_config& config, const attention_parameters<float>& p)
        : config_(config.resolved()) {
        constexpr const char* where = "mha::multi_head_attention_bf16";
        check_supported(where);
        if (config_.rotary) rotary_.emplace(*config_.rotary, config_.head_dim);
        detail::check_parameters(where, config_, p);
        const Index e = config_.embed_dim;
        fused_ = config_.key_input_dim == e && config_.value_input_dim == e;
        if (fused_) {
            w_in_.resize(qk_width() + key_width() + value_width(), e);
            w_in_ << p.w_q.cast<Eigen::bfloat16>(), p.w_k.cast<Eigen::bfloat16>(),
                p.w_v.cast<Eigen::bfloat16>();
        } else {
            w_in_ = p.w_q.cast<Eigen::bfloat16>();
            w_k_ = p.w_k.cast<Eigen::bfloat16>();
            w_v_ = p.w_v.cast<Eigen::bfloat16>();
        }
        w_o_ = p.w_o.cast<Eigen::bfloat16>();
        packed_in_ = packed(w_in_);
        packed_k_ = packed(w_k_);
        packed_v_ = packed(w_v_);
        packed_o_ = packed(w_o_);
        if (config_.bias) {
            b_in_.resize(qk_width() + key_width() + value_width());
            b_in_ << p.b_q, p.b_k, p.b_v;
            b_o_ = p.b_o;
        }
    }

    /// The fp32 layer's configuration and parameters, its weights rounded once to bf16.
    explicit multi_head_attention_bf16(const multi_head_attention<float>& layer)
        : multi_head_attention_bf16(layer.config(), layer.parameters()) {}

    /// Self-attention over one sequence: x is E × L (bf16), returns E × L (float).
    matrix<float> forward(const input& x, const attention_mask<float>& mask = {}) const {
        return forward(x, packed_batch::single(x.cols(), x.cols()), mask);
    }

    /// Self-attention over a packed batch: x is E × (Σ lengths).
    matrix<float> forward(const input& x, const packed_batch& batch,
                          const attention_mask<float>& mask = {}) const {
        matrix<float> out(config_.embed_dim, x.cols());
        bf16_forward_workspace workspace;
        forward_into(x, batch, mask, out, workspace);
        return out;
    }

    /// Cross-attention over a packed batch: query E × Nq, key kdim × Nk, value vdim × Nk.
    matrix<float> forward(const input& query, const input& key, const input& value,
                          const packed_batch& batch, const attention_mask<float>& mask = {}) const {
        matrix<float> out(config_.embed_dim, query.cols());
        bf16_forward_workspace workspace;
        forward_into(query, key, value, batch, mask, out, workspace);
        return out;
    }

    /// Self-attention over a packed batch into `out` (E × N, float, not resized; must not
    /// overlap x), reusing the buffers of `workspace`: once a call has run with given shapes,
    /// later calls with those shapes allocate nothing (x must be a bf16 matrix, map or block with
    /// inner stride 1, else Ref copies it). Runs on OpenMP's default thread count; the result is
    /// the same bits for any thread count.
    void forward_into(const input& x, const packed_batch& batch, const attention_mask<float>& mask,
                      Eigen::Ref<matrix<float>> out, bf16_forward_workspace& ws) const {
        validate(x, x, x, batch, mask, out);
        if (fused_ && !rotary_) {
            const Index qk = qk_width(), kw = key_width(), vw = value_width();
            ws.qkv.resize(qk + kw + vw, x.cols());
            project(w_in_, b_in_, x, ws.qkv, ws, packed_in_.all());
            attend_and_project(ws.qkv.topRows(qk), ws.qkv.middleRows(qk, kw), ws.qkv.bottomRows(vw),
                               batch, mask, out, ws);
        } else {
            project_separately(x, x, x, batch, ws);
            attend_and_project(ws.q, ws.k, ws.v, batch, mask, out, ws);
        }
    }

    /// Cross-attention over a packed batch into `out` (E × Nq), as the self-attention overload.
    void forward_into(const input& query, const input& key, const input& value,
                      const packed_batch& batch, const attention_mask<float>& mask,
                      Eigen::Ref<matrix<float>> out, bf16_forward_workspace& ws) const {
        validate(query, key, value, batch, mask, out);
        project_separately(query, key, value, batch, ws);
        attend_and_project(ws.q, ws.k, ws.v, batch, mask, out, ws);
    }

    /// An empty bf16 cache for this layer's keys and values (key_width() × tokens and
    /// value_width() × tokens): half the bytes of the fp32 layer's cache.
    kv_cache<Eigen::bfloat16> make_cache(const kv_cache_options& options = {}) const {
        return kv_cache<Eigen::bfloat16>(key_width(), value_width(), options);
    }

    /// One decoding step of one sequence, as multi_head_attention::decode: x (E × n, bf16) holds
    /// its n new tokens; their keys and values (rounded to bf16 by the projection) are appended
    /// to `cache`, and new token i attends to every cached token and the new tokens up to itself
    /// (within the cache's window, if it has one). With rotary positions the new tokens continue
    /// the cache's positions (`cache.position()`), as in the fp32 layer. Returns E × n (float):
    /// the step is the composition of the public bf16 pieces, as for forward, with the cache's
    /// columns as the keys and values.
    matrix<float> decode(const input& x, kv_cache<Eigen::bfloat16>& cache) const {
        matrix<float> out(config_.embed_dim, x.cols());
        bf16_forward_workspace workspace;
        decode_into(x, cache, out, workspace);
        return out;
    }

    /// `decode` into `out` (E × n), reusing `workspace`. With the cache's room reserved
    /// (`cache.fits(n)`) and a workspace that has served a step of the same shapes, a step
    /// allocates nothing.
    void decode_into(const input& x, kv_cache<Eigen::bfloat16>& cache,
                     Eigen::Ref<matrix<float>> out, bf16_forward_workspace& workspace) const {
        auto& d = workspace.decoding;
        d.one_length.assign(1, x.cols());
        d.one_cache.assign(1, &cache);
        decode_into(x, d.one_length, d.one_cache, out, workspace);
    }

    /// One decoding step for a batch of sequences (continuous batching), as
    /// multi_head_attention::decode: sequence b adds new_tokens[b] ≥ 0 tokens, consecutive
    /// columns of x (E × Σ new_tokens), to its own cache *caches[b].
    matrix<float> decode(const input& x, const std::vector<Index>& new_tokens,
                         const std::vector<kv_cache<Eigen::bfloat16>*>& caches) const {
        matrix<float> out(config_.embed_dim, x.cols());
        bf16_forward_workspace workspace;
        decode_into(x, new_tokens, caches, out, workspace);
        return out;
    }

    /// The batched step into `out` (E × Σ new_tokens), reusing `workspace`. Every argument and
    /// every cache's room are checked before any cache changes.
    void decode_into(const input& x, const std::vector<Index>& new_tokens,
                     const std::vector<kv_cache<Eigen::bfloat16>*>& caches,
                     Eigen::Ref<matrix<float>> out, bf16_forward_workspace& ws) const {
        constexpr const char* where = "mha::multi_head_attention_bf16::decode";
        detail::check_decode_step(where, config_, fused_, x.rows(), x.cols(), new_tokens, caches,
                                  out.rows(), out.cols());
        const Index qk = qk_width(), kw = key_width(), vw = value_width();
        ws.qkv.resize(qk + kw + vw, x.cols());  // the new tokens' Q, K and V only
        if (rotary_) {
            project_unrounded_qk(x, x, ws);
            project(w_in_.bottomRows(vw), bias_segment(qk + kw, vw), x, ws.qkv.bottomRows(vw), ws,
                    packed_in_.rows(qk + kw, vw));
        } else {
            project(w_in_, b_in_, x, ws.qkv, ws, packed_in_.all());
        }
        auto& d = ws.decoding;
        detail::append_decode_step(
            d, new_tokens, caches, ws.qkv.middleRows(qk, kw), ws.qkv.bottomRows(vw),
            [&](std::size_t, Index column, Index n, const kv_cache<Eigen::bfloat16>& cache) {
                if (!rotary_) return;
                // The new tokens' positions continue the cache's; rounded before the append
                // copies their keys.
                auto q = ws.q32.middleCols(column, n);
                auto k = ws.k32.middleCols(column, n);
                rotary_->apply(q, config_.num_heads, cache.position());
                rotary_->apply(k, config_.num_kv_heads, cache.position());
                ws.qkv.topRows(qk).middleCols(column, n) = q.cast<Eigen::bfloat16>();
                ws.qkv.middleRows(qk, kw).middleCols(column, n) = k.cast<Eigen::bfloat16>();
            });
        ws.heads32.resize(v_width(), x.cols());
        const detail::bf16_attention_problem problem{
            ws.qkv.topRows(qk),
            ws.qkv.middleRows(qk, kw),
            ws.qkv.bottomRows(vw),
            ws.heads32,
            heads(),
            d.batch,
            d.mask,
            detail::resolve_scale<float>(where, config_.attention, config_.head_dim),
            false,
            d.caches.data(),
            &config_.attention};
        detail::tiled_attention_bf16<detail::default_bf16_kernel>(problem, nullptr, {}, &ws.core);
        project_output(out, ws);
    }

    /// The layer's shape and settings, resolved (see multi_head_attention::config).
    const attention_config& config() const { return config_; }
    /// Rows of the projected queries, H·d_k.
    Index qk_width() const { return config_.num_heads * config_.head_dim; }
    /// Rows of the concatenated head outputs, H·d_v.
    Index v_width() const { return config_.num_heads * config_.value_head_dim; }
    /// Rows of the projected keys, H_kv·d_k.
    Index key_width() const { return config_.num_kv_heads * config_.head_dim; }
    /// Rows of the projected values, H_kv·d_v.
    Index value_width() const { return config_.num_kv_heads * config_.value_head_dim; }

    /// The stored bf16 weights and fp32 biases in the separate-matrix form (the bf16 weights
    /// widened exactly to float).
    attention_parameters<float> parameters() const {
        attention_parameters<float> p;
        detail::split_stacked_projection(w_in_, b_in_, qk_width(), key_width(), value_width(),
                                         fused_, config_.bias, p);
        if (!fused_) {
            p.w_k = w_k_.cast<float>();
            p.w_v = w_v_.cast<float>();
        }
        p.w_o = w_o_.cast<float>();
        if (config_.bias) p.b_o = b_o_;
        return p;
    }

private:
    // What the bf16 core does not run, refused once here rather than on every call.
    void check_supported(const char* where) const {
        const attention_options& a = config_.attention;
        if (a.normalize != normalization::softmax)
            detail::fail<value_error>(where, "config.attention.normalize",
                                      "softmax (the only bf16 kernel)", to_string(a.normalize));
        if (a.algorithm == attention_algorithm::materialized)
            detail::fail<value_error>(where, "config.attention.algorithm",
                                      "automatic or tiled (bf16 has no materialised kernel)",
                                      "materialized");
        detail::check_scale<float>(where, "config.attention.scale", a.scale);
    }

    // Every check of a call, before any work.
    void validate(const input& query, const input& key, const input& value,
                  const packed_batch& batch, const attention_mask<float>& mask,
                  const Eigen::Ref<matrix<float>>& out) const {
        constexpr const char* where = "mha::multi_head_attention_bf16::forward";
        detail::check_token_rows(where, "query.rows()", config_.embed_dim, query.rows(),
                                 "embed_dim", batch.total_queries(), query.cols());
        detail::check_token_rows(where, "key.rows()", config_.key_input_dim, key.rows(),
                                 "key_input_dim", batch.total_keys(), key.cols());
        detail::check_token_rows(where, "value.rows()", config_.value_input_dim, value.rows(),
                                 "value_input_dim", batch.total_keys(), value.cols());
        detail::check_size(where, "value.cols()", key.cols(), value.cols(), "key.cols()");
        detail::check_size(where, "query.cols()", batch.total_queries(), query.cols(),
                           "the batch's total query count");
        detail::check_size(where, "key.cols()", batch.total_keys(), key.cols(),
                           "the batch's total key count");
        detail::check_size(where, "out.rows()", config_.embed_dim, out.rows(), "embed_dim");
        detail::check_size(where, "out.cols()", query.cols(), out.cols(), "query.cols()");
        mask.validate(where, config_.num_heads, batch.query_lengths(), batch.key_lengths());
    }

    // Biases of the stacked input projection, as segments (size 0 without bias).
    Eigen::VectorBlock<const vector<float>> bias_segment(Index start, Index size) const {
        return b_in_.segment(config_.bias ? start : 0, config_.bias ? size : 0);
    }

    // Q, K and V by three products, into ws.q, ws.k, ws.v (cross-attention, self-attention
    // without the fused weights, or with rotary positions: Q and K turned before rounding).
    void project_separately(const input& query, const input& key, const input& value,
                            const packed_batch& batch, bf16_forward_workspace& ws) const {
        const Index qk = qk_width(), kw = key_width(), vw = value_width();
        ws.q.resize(qk, query.cols());
        ws.k.resize(kw, key.cols());
        ws.v.resize(vw, key.cols());
        if (rotary_) {
            project_unrounded_qk(query, key, ws);
            detail::rotate_packed(*rotary_, ws.q32, ws.k32, batch, config_.num_heads,
                                  config_.num_kv_heads);
            ws.q = ws.q32.cast<Eigen::bfloat16>();
            ws.k = ws.k32.cast<Eigen::bfloat16>();
        } else {
            project_qk(query, key, ws.q, ws.k, ws);
        }
        if (fused_)
            project(w_in_.bottomRows(vw), bias_segment(qk + kw, vw), value, ws.v, ws,
                    packed_in_.rows(qk + kw, vw));
        else
            project(w_v_, bias_segment(qk + kw, vw), value, ws.v, ws, packed_v_.all());
    }

    // Q and K unrounded, into ws.q32 (H·d_k × Nq) and ws.k32 (H_kv·d_k × Nk): rotary positions
    // turn them in fp32 so that each is rounded to bf16 once, after the turn.
    void project_unrounded_qk(const input& query, const input& key,
                              bf16_forward_workspace& ws) const {
        ws.q32.resize(qk_width(), query.cols());
        ws.k32.resize(key_width(), key.cols());
        project_qk(query, key, ws.q32, ws.k32, ws);
    }

    // out_q = W_q·query + b_q and out_k = W_k·key + b_k, in bf16 or fp32 as out_q and out_k are.
    template <class OutQ, class OutK>
    void project_qk(const input& query, const input& key, OutQ& out_q, OutK& out_k,
                    bf16_forward_workspace& ws) const {
        const Index qk = qk_width(), kw = key_width();
        project(w_in_.topRows(qk), bias_segment(0, qk), query, out_q, ws, packed_in_.rows(0, qk));
        if (fused_)
            project(w_in_.middleRows(qk, kw), bias_segment(qk, kw), key, out_k, ws,
                    packed_in_.rows(qk, kw));
        else
            project(w_k_, bias_segment(qk, kw), key, out_k, ws, packed_k_.all());
    }

    // Every head into ws.heads32 ((H·d_v) × Nq), then the output projection.
    template <class DQ, class DK, class DV>
    void attend_and_project(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                            const Eigen::MatrixBase<DV>& v, const packed_batch& batch,
                            const attention_mask<float>& mask, Eigen::Ref<matrix<float>> out,
                            bf16_forward_workspace& ws) const {
        ws.heads32.resize(v_width(), q.cols());
        detail::multi_head_attention_core_bf16<detail::default_bf16_kernel>(
            q, k, v, config_.num_heads, config_.num_kv_heads, batch, ws.heads32, mask,
            config_.attention, {}, {}, &ws.core);
        project_output(out, ws);
    }

    // ws.heads32 rounded once into ws.heads, then out = W_o·heads + b_o.
    void project_output(Eigen::Ref<matrix<float>> out, bf16_forward_workspace& ws) const {
        ws.heads.resize(v_width(), ws.heads32.cols());
        ws.heads = ws.heads32.cast<Eigen::bfloat16>();
        project(w_o_, b_o_, ws.heads, out, ws, packed_o_.all());
    }

    // out = w·x + b (mha::linear on bf16) with w's panels, kept since construction.
    template <class DW, class DB, class DX, class DO>
    static void project(const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DB>& b,
                        const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DO>& out,
                        bf16_forward_workspace& ws, detail::bf16_prepacked_a packed_w) {
        detail::linear_bf16(w, b, x, out, ws.linear, 0, detail::default_bf16_kernel, packed_w);
    }

    static detail::bf16_packed_matrix packed(const bf16_matrix& w) {
        return {w.rows(), w.cols(), detail::bf16_operand_of(w)};
    }

    detail::head_layout heads() const {
        return {config_.num_heads, config_.num_kv_heads, config_.head_dim, config_.value_head_dim};
    }

    attention_config config_;
    std::optional<rotary_embedding<float>> rotary_;  // config_.rotary for d_k, when set
    bool fused_ = true;   // key and value inputs have width E: W_q, W_k, W_v stacked in w_in_
    bf16_matrix w_in_;    // fused: [W_q; W_k; W_v], (H·d_k + H_kv·d_k + H_kv·d_v) × E; else W_q
    bf16_matrix w_k_;     // unfused only: (H_kv·d_k) × key_input_dim
    bf16_matrix w_v_;     // unfused only: (H_kv·d_v) × value_input_dim
    vector<float> b_in_;  // [b_q; b_k; b_v], or size 0 without bias
    bf16_matrix w_o_;     // E × (H·d_v)
    vector<float> b_o_;   // E, or size 0
    // The weights above in the GEMM's panels, packed once: every projection would otherwise
    // pack them again (a decode step's too, on the portable path).
    detail::bf16_packed_matrix packed_in_, packed_k_, packed_v_, packed_o_;
};

}  // namespace mha
