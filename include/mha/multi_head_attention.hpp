// SPDX-License-Identifier: MIT
/// @file
/// The multi-head attention layer, for one sequence or a packed batch, self- or cross-attention.
/// A call runs named stages: validate (every check, once) -> project_inputs (Q, K, V of every
/// token) -> attend (every head, written into its rows of the concatenated heads) ->
/// project_output.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <mha/attention.hpp>
#include <mha/attention_config.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/decode_step.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/layer_parameters.hpp>
#include <mha/detail/rotary_positions.hpp>
#include <mha/kv_cache.hpp>
#include <mha/layer_backward.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>
#include <mha/projection.hpp>
#include <mha/rotary.hpp>

namespace mha {

/// What `forward_with_weights` returns: the layer's output and the attention weights its
/// `weights_mode` asked for.
template <class Scalar>
struct attention_result {
    /// E × Nq: the output of every query of the batch, as `forward` returns it.
    matrix<Scalar> output;
    /// none: empty; per_head: B·H matrices, sequence b and head h at index b·H + h; averaged: B
    /// matrices, the mean over heads. Each is that sequence's Lk × Lq (keys × queries).
    std::vector<matrix<Scalar>> weights;
};

/// Every buffer a forward call needs: the projected Q/K/V, the concatenated heads, and the
/// attention kernel's and the GEMMs' scratch. Pass the same workspace to repeated `forward_into`
/// calls and, once a call has run with given shapes, later calls with those shapes allocate
/// nothing (see `forward_into`). One workspace per thread.
template <class Scalar>
struct forward_workspace {
    matrix<Scalar> qkv;    ///< self-attention: stacked Q, K, V, (H·d_k + H_kv·(d_k + d_v)) × N
    matrix<Scalar> q;      ///< cross-attention: H·d_k × Nq
    matrix<Scalar> k;      ///< cross-attention: H_kv·d_k × Nk
    matrix<Scalar> v;      ///< cross-attention: H_kv·d_v × Nk
    matrix<Scalar> heads;  ///< concatenated head outputs, H·d_v × Nq
    /// The attention core's buffers (tiled kernel, materialised scores) and the GEMM packing
    /// buffers of its products (the projections need none). Internal; grows only.
    detail::attention_workspace<Scalar> internal;
    detail::decode_buffers<Scalar> decoding;  ///< decode_into's; internal
};

/// Multi-head attention layer. `const` member functions may be called from several threads.
template <class Scalar>
class multi_head_attention {
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");

public:
    /// What the forward calls take: any column-major Scalar matrix expression with inner stride
    /// 1, viewed without a copy (others are copied once, see `forward`).
    using input = Eigen::Ref<const matrix<Scalar>>;

    /// Deterministic initialisation from `seed`, with PyTorch's distributions: Xavier-uniform
    /// input projections (over the stacked [W_q; W_k; W_v] when all inputs have width E, as
    /// PyTorch's `in_proj_weight`), U(±1/√(H·d_v)) for W_o, zero biases.
    explicit multi_head_attention(const attention_config& config, std::uint64_t seed = 0)
        : multi_head_attention(config, detail::seeded_parameters<Scalar>(config.resolved(), seed)) {
    }

    /// A layer with the given parameters; their shapes are checked against `config`.
    multi_head_attention(const attention_config& config, const attention_parameters<Scalar>& p)
        : config_(config.resolved()), rotary_(make_rotary(config_)) {
        constexpr const char* where = "mha::multi_head_attention";
        detail::check_scale<Scalar>(where, "config.attention.scale", config_.attention.scale);
        detail::check_parameters(where, config_, p);
        const Index e = config_.embed_dim;
        fused_ = config_.key_input_dim == e && config_.value_input_dim == e;
        w_q_ = detail::row_panels<Scalar>(p.w_q);
        w_k_ = detail::row_panels<Scalar>(p.w_k);
        w_v_ = detail::row_panels<Scalar>(p.w_v);
        w_o_ = detail::row_panels<Scalar>(p.w_o);
        if (config_.bias) {
            b_in_.resize(qk_width() + key_width() + value_width());
            b_in_ << p.b_q, p.b_k, p.b_v;
            b_o_ = p.b_o;
        }
    }

    /// From PyTorch's packed parameters: `in_proj_weight` (3E × E, rows q, k, v),
    /// `in_proj_bias` (3E, or size 0 without bias), `out_proj.weight` (E × E) and
    /// `out_proj.bias` (E, or size 0). Needs kdim = vdim = E, which is when PyTorch packs them.
    /// Other head widths and grouped heads take the same stacked form, rows
    /// [W_q; W_k; W_v] of heights H·d_k, H_kv·d_k and H_kv·d_v (a fused QKV checkpoint).
    static multi_head_attention from_packed(const attention_config& config,
                                            const Eigen::Ref<const matrix<Scalar>>& in_proj_weight,
                                            const Eigen::Ref<const vector<Scalar>>& in_proj_bias,
                                            const Eigen::Ref<const matrix<Scalar>>& out_weight,
                                            const Eigen::Ref<const vector<Scalar>>& out_bias) {
        const attention_config c = config.resolved();
        return multi_head_attention(c, detail::unpack_packed_parameters<Scalar>(
                                           "mha::multi_head_attention::from_packed", c,
                                           in_proj_weight, in_proj_bias, out_weight, out_bias));
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

    /// Self-attention over a packed batch with a score modifier (make_score_modifier) compiled
    /// into the kernels: `modifier.score(sequence, head, i, j, s)` changes each score after the
    /// scale, soft-capping and ALiBi, before the mask (docs/score_modifiers.md). Indices are those
    /// of the sequence within `batch`; `head` is the query head.
    template <class ScoreFn, class BlockPredicate>
    matrix<Scalar> forward(const input& x, const packed_batch& batch,
                           const attention_mask<Scalar>& mask,
                           const score_modifier<ScoreFn, BlockPredicate>& modifier) const {
        return run_allocating(self_inputs(x), batch, mask, {}, modifier).output;
    }

    /// Cross-attention over a packed batch with a score modifier (see the self-attention form).
    template <class ScoreFn, class BlockPredicate>
    matrix<Scalar> forward(const input& query, const input& key, const input& value,
                           const packed_batch& batch, const attention_mask<Scalar>& mask,
                           const score_modifier<ScoreFn, BlockPredicate>& modifier) const {
        return run_allocating({query, key, value, false}, batch, mask, {}, modifier).output;
    }

    /// Self-attention over one sequence, also returning the attention weights.
    attention_result<Scalar> forward_with_weights(const input& x, weights_mode mode,
                                                  const attention_mask<Scalar>& mask = {}) const {
        return forward_with_weights(x, packed_batch::single(x.cols(), x.cols()), mode, mask);
    }

    /// Self-attention over a packed batch, also returning the attention weights (x projected as
    /// in `forward`).
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

    /// The general form with a score modifier: the weights are those the modified scores give.
    template <class ScoreFn, class BlockPredicate>
    attention_result<Scalar> forward_with_weights(
        const input& query, const input& key, const input& value, const packed_batch& batch,
        weights_mode mode, const attention_mask<Scalar>& mask,
        const score_modifier<ScoreFn, BlockPredicate>& modifier) const {
        return run_allocating({query, key, value, false}, batch, mask,
                              attention_request{mode, false}, modifier);
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

    /// Self-attention into `out` with a score modifier compiled into the kernels (see `forward`
    /// with a modifier); allocates nothing under the conditions of `forward_into` above.
    template <class ScoreFn, class BlockPredicate>
    void forward_into(const input& x, const packed_batch& batch, const attention_mask<Scalar>& mask,
                      Eigen::Ref<matrix<Scalar>> out, forward_workspace<Scalar>& workspace,
                      const score_modifier<ScoreFn, BlockPredicate>& modifier) const {
        run(self_inputs(x), batch, mask, out, {}, workspace, modifier);
    }

    /// Cross-attention into `out` with a score modifier.
    template <class ScoreFn, class BlockPredicate>
    void forward_into(const input& query, const input& key, const input& value,
                      const packed_batch& batch, const attention_mask<Scalar>& mask,
                      Eigen::Ref<matrix<Scalar>> out, forward_workspace<Scalar>& workspace,
                      const score_modifier<ScoreFn, BlockPredicate>& modifier) const {
        run({query, key, value, false}, batch, mask, out, {}, workspace, modifier);
    }

    /// An empty cache for this layer's keys and values (key_width() × tokens and
    /// value_width() × tokens).
    kv_cache<Scalar> make_cache(const kv_cache_options& options = {}) const {
        return kv_cache<Scalar>(key_width(), value_width(), options);
    }

    /// One decoding step of one sequence: x (E × n) holds its n new tokens (one token, or a
    /// prompt, or a draft to verify). Projects only them, appends their keys and values to
    /// `cache`, and attends causally with bottom-right alignment: new token i sees every cached
    /// token and the new tokens up to itself (within the cache's window, if it has one).
    /// Returns E × n: the outputs `forward` with a causal mask gives for the last n tokens of
    /// the whole sequence.
    matrix<Scalar> decode(const input& x, kv_cache<Scalar>& cache) const {
        matrix<Scalar> out(config_.embed_dim, x.cols());
        forward_workspace<Scalar> workspace;
        decode_into(x, cache, out, workspace);
        return out;
    }

    /// `decode` into `out` (E × n), reusing `workspace`. With the cache's room reserved
    /// (`cache.fits(n)`) and a workspace that has served a step of the same shapes, a step
    /// allocates nothing (tests/test_allocation_free.cpp).
    void decode_into(const input& x, kv_cache<Scalar>& cache, Eigen::Ref<matrix<Scalar>> out,
                     forward_workspace<Scalar>& workspace) const {
        auto& d = workspace.decoding;
        d.one_length.assign(1, x.cols());
        d.one_cache.assign(1, &cache);
        decode_into(x, d.one_length, d.one_cache, out, workspace);
    }

    /// One decoding step for a batch of sequences at once (continuous batching): sequence b
    /// adds new_tokens[b] ≥ 0 tokens, consecutive columns of x (E × Σ new_tokens), to its own
    /// cache *caches[b], each cache with its own length. Returns E × Σ new_tokens.
    matrix<Scalar> decode(const input& x, const std::vector<Index>& new_tokens,
                          const std::vector<kv_cache<Scalar>*>& caches) const {
        matrix<Scalar> out(config_.embed_dim, x.cols());
        forward_workspace<Scalar> workspace;
        decode_into(x, new_tokens, caches, out, workspace);
        return out;
    }

    /// The batched step into `out` (E × Σ new_tokens), reusing `workspace`. Every argument and
    /// every cache's room are checked before any cache changes. Allocates nothing under the
    /// conditions of the single-sequence overload, for every cache.
    void decode_into(const input& x, const std::vector<Index>& new_tokens,
                     const std::vector<kv_cache<Scalar>*>& caches, Eigen::Ref<matrix<Scalar>> out,
                     forward_workspace<Scalar>& workspace) const {
        detail::check_decode_step(decode_where, config_, fused_, x.rows(), x.cols(), new_tokens,
                                  caches, out.rows(), out.cols());
        auto& d = workspace.decoding;
        // Q, K and V of the new tokens only, into one stacked buffer (decoding needs
        // self-attention weights, checked above).
        workspace.qkv.resize(qk_width() + key_width() + value_width(), x.cols());
        auto qkv = split_qkv(workspace.qkv, qk_width(), key_width(), value_width());
        project_self(x, qkv);
        detail::append_decode_step(
            d, new_tokens, caches, qkv.k, qkv.v,
            [&](std::size_t, Index column, Index n, const kv_cache<Scalar>& cache) {
                if (!rotary_) return;
                // The new tokens' positions continue the cache's.
                rotary_->apply(qkv.q.middleCols(column, n), config_.num_heads, cache.position());
                rotary_->apply(qkv.k.middleCols(column, n), config_.num_kv_heads, cache.position());
            });
        workspace.heads.resize(v_width(), x.cols());
        const detail::attention_problem<Scalar> problem{
            qkv.q,
            qkv.k,
            qkv.v,
            workspace.heads,
            heads(),
            d.batch,
            d.mask,
            detail::resolve_scale<Scalar>(decode_where, config_.attention, config_.head_dim),
            config_.attention.normalize,
            {},
            d.caches.data(),
            &config_.attention};
        detail::attend(problem, config_.attention.algorithm, &workspace.internal);
        project_output(workspace, out);
    }

    /// The layer's shape and settings, resolved: every derived width (head_dim, value_head_dim,
    /// key_input_dim, value_input_dim, num_kv_heads) is set.
    const attention_config& config() const { return config_; }
    /// Rows of the projected queries, H·d_k.
    Index qk_width() const { return config_.num_heads * config_.head_dim; }
    /// Rows of the concatenated head outputs, H·d_v.
    Index v_width() const { return config_.num_heads * config_.value_head_dim; }
    /// Rows of the projected keys, H_kv·d_k (what a kv_cache of this layer holds per token).
    Index key_width() const { return config_.num_kv_heads * config_.head_dim; }
    /// Rows of the projected values, H_kv·d_v.
    Index value_width() const { return config_.num_kv_heads * config_.value_head_dim; }

    /// A copy of the parameters in the separate-matrix form.
    attention_parameters<Scalar> parameters() const {
        attention_parameters<Scalar> p;
        p.w_q = w_q_.unpacked();
        p.w_k = w_k_.unpacked();
        p.w_v = w_v_.unpacked();
        p.w_o = w_o_.unpacked();
        if (!config_.bias) return p;
        const Index qk = qk_width(), kw = key_width();
        p.b_q = b_in_.head(qk);
        p.b_k = b_in_.segment(qk, kw);
        p.b_v = b_in_.tail(value_width());
        p.b_o = b_o_;
        return p;
    }

    /// Self-attention forward on a packed batch that keeps what `backward` needs (see
    /// mha/layer_backward.hpp); its `output` is the layer's output.
    layer_saved_state<Scalar> forward_for_backward(const input& x, const packed_batch& batch,
                                                   const attention_mask<Scalar>& mask = {}) const {
        return layer_forward_for_backward(config_, parameters(), x, x, x, true, batch, mask);
    }

    /// Cross-attention forward that keeps what `backward` needs.
    layer_saved_state<Scalar> forward_for_backward(const input& query, const input& key,
                                                   const input& value, const packed_batch& batch,
                                                   const attention_mask<Scalar>& mask = {}) const {
        return layer_forward_for_backward(config_, parameters(), query, key, value, false, batch,
                                          mask);
    }

    /// The gradients of a loss with respect to the inputs and parameters of the forward that
    /// produced `saved`, given ∂loss/∂output (E × Nq); see mha/layer_backward.hpp.
    layer_gradients<Scalar> backward(const layer_saved_state<Scalar>& saved, const input& d_output,
                                     int threads = 0) const {
        return layer_backward(config_, parameters(), saved, d_output, threads);
    }

private:
    static constexpr const char* decode_where = "mha::multi_head_attention::decode";

    static std::optional<rotary_embedding<Scalar>> make_rotary(const attention_config& c) {
        if (!c.rotary) return std::nullopt;
        return rotary_embedding<Scalar>(*c.rotary, c.head_dim);
    }

    detail::head_layout heads() const {
        return {config_.num_heads, config_.num_kv_heads, config_.head_dim, config_.value_head_dim};
    }

    // Biases of the stacked input projection, as segments (size 0 without bias).
    auto bias_segment(Index start, Index size) const {
        return b_in_.segment(config_.bias ? start : 0, config_.bias ? size : 0);
    }

    // The token sources of a call. Self-attention reads one x for all three, which lets
    // project_inputs write Q, K and V into one stacked buffer.
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
        detail::const_matrix_ref<Scalar> k;  // (H_kv·d_k) × Nk
        detail::const_matrix_ref<Scalar> v;  // (H_kv·d_v) × Nk
    };

    // A forward call that allocates its result and its buffers.
    template <class Mod = detail::no_score_modifier>
    attention_result<Scalar> run_allocating(const layer_inputs& in, const packed_batch& batch,
                                            const attention_mask<Scalar>& mask,
                                            const attention_request& request,
                                            const Mod& mod = Mod{}) const {
        attention_result<Scalar> r;
        r.output.resize(config_.embed_dim, in.query.cols());
        forward_workspace<Scalar> workspace;
        r.weights = run(in, batch, mask, r.output, request, workspace, mod).weights;
        return r;
    }

    template <class Mod = detail::no_score_modifier>
    attention_outputs<Scalar> run(const layer_inputs& in, const packed_batch& batch,
                                  const attention_mask<Scalar>& mask,
                                  Eigen::Ref<matrix<Scalar>> out, const attention_request& request,
                                  forward_workspace<Scalar>& ws, const Mod& mod = Mod{}) const {
        validate(in, batch, mask, out);
        const projected qkv = project_inputs(in, batch, ws);
        attention_outputs<Scalar> outputs = attend(qkv, batch, mask, request, ws, mod);
        project_output(ws, out);
        return outputs;
    }

    // Every check of a call, before any work: the kernels below trust what passes here.
    void validate(const layer_inputs& in, const packed_batch& batch,
                  const attention_mask<Scalar>& mask, const Eigen::Ref<matrix<Scalar>>& out) const {
        constexpr const char* where = "mha::multi_head_attention::forward";
        detail::check_token_rows(where, "query.rows()", config_.embed_dim, in.query.rows(),
                                 "embed_dim", batch.total_queries(), in.query.cols());
        detail::check_token_rows(where, "key.rows()", config_.key_input_dim, in.key.rows(),
                                 "key_input_dim", batch.total_keys(), in.key.cols());
        detail::check_token_rows(where, "value.rows()", config_.value_input_dim, in.value.rows(),
                                 "value_input_dim", batch.total_keys(), in.value.cols());
        detail::check_size(where, "value.cols()", in.key.cols(), in.value.cols(), "key.cols()");
        detail::check_size(where, "query.cols()", batch.total_queries(), in.query.cols(),
                           "the batch's total query count");
        detail::check_size(where, "key.cols()", batch.total_keys(), in.key.cols(),
                           "the batch's total key count");
        detail::check_size(where, "out.rows()", config_.embed_dim, out.rows(), "embed_dim");
        detail::check_size(where, "out.cols()", in.query.cols(), out.cols(), "query.cols()");
        mask.validate(where, config_.num_heads, batch.query_lengths(), batch.key_lengths());
    }

    // Q, K and V of every token, into the workspace: products of the weights packed once
    // (detail/tiled_product.hpp) on this call's OpenMP threads, which allocate nothing.
    // resize() keeps a buffer whose size is unchanged, so repeated calls reuse the workspace.
    projected project_inputs(const layer_inputs& in, const packed_batch& batch,
                             forward_workspace<Scalar>& ws) const {
        const Index qk = qk_width();
        const Index kw = key_width();
        const Index kvw = value_width();
        if (in.self && fused_) {
            // Q, K and V stacked in one buffer, which split_qkv views.
            ws.qkv.resize(qk + kw + kvw, in.query.cols());
            auto views = split_qkv(ws.qkv, qk, kw, kvw);
            project_self(in.query, views);
            rotate_positions(views.q, views.k, batch);
            return {views.q, views.k, views.v};
        }
        ws.q.resize(qk, in.query.cols());
        ws.k.resize(kw, in.key.cols());
        ws.v.resize(kvw, in.key.cols());
        detail::linear_into(w_q_, bias_segment(0, qk), in.query, ws.q);
        detail::linear_into(w_k_, bias_segment(qk, kw), in.key, ws.k);
        detail::linear_into(w_v_, bias_segment(qk + kw, kvw), in.value, ws.v);
        rotate_positions(ws.q, ws.k, batch);
        return {ws.q, ws.k, ws.v};
    }

    // Q, K and V of the tokens x into the views of a stacked buffer (split_qkv).
    template <class Views>
    void project_self(const input& x, Views& qkv) const {
        const Index qk = qk_width(), kw = key_width();
        detail::linear_into(w_q_, bias_segment(0, qk), x, qkv.q);
        detail::linear_into(w_k_, bias_segment(qk, kw), x, qkv.k);
        detail::linear_into(w_v_, bias_segment(qk + kw, value_width()), x, qkv.v);
    }

    // Rotary positions, when configured (detail::rotate_packed says where each token is).
    template <class DQ, class DK>
    void rotate_positions(DQ&& q, DK&& k, const packed_batch& batch) const {
        if (rotary_)
            detail::rotate_packed(*rotary_, q, k, batch, config_.num_heads, config_.num_kv_heads);
    }

    // Every head's attention, each written into its rows of ws.heads ((H·d_v) × Nq).
    template <class Mod>
    attention_outputs<Scalar> attend(const projected& qkv, const packed_batch& batch,
                                     const attention_mask<Scalar>& mask,
                                     const attention_request& request,
                                     forward_workspace<Scalar>& ws, const Mod& mod) const {
        ws.heads.resize(v_width(), qkv.q.cols());
        const detail::attention_problem<Scalar> problem{
            qkv.q,
            qkv.k,
            qkv.v,
            ws.heads,
            heads(),
            batch,
            mask,
            detail::resolve_scale<Scalar>("mha::multi_head_attention::forward", config_.attention,
                                          config_.head_dim),
            config_.attention.normalize,
            request,
            nullptr,
            &config_.attention};
        return detail::attend(problem, config_.attention.algorithm, &ws.internal, mod);
    }

    // out = W_o·heads + b_o.
    void project_output(forward_workspace<Scalar>& ws, Eigen::Ref<matrix<Scalar>> out) const {
        detail::linear_into(w_o_, b_o_, ws.heads, out);
    }

    attention_config config_;
    bool fused_ = true;  // key and value inputs have width E: self-attention projects one buffer
    // The weights, kept only in the panels of the projections' product (detail/tiled_product.hpp),
    // packed once here so that no call copies them (up to a sixth of a projection's time at 128
    // tokens); parameters() unpacks them.
    detail::row_panels<Scalar> w_q_;                  // (H·d_k) × E
    detail::row_panels<Scalar> w_k_;                  // (H_kv·d_k) × key_input_dim
    detail::row_panels<Scalar> w_v_;                  // (H_kv·d_v) × value_input_dim
    detail::row_panels<Scalar> w_o_;                  // E × (H·d_v)
    vector<Scalar> b_in_;                             // [b_q; b_k; b_v], or size 0 without bias
    vector<Scalar> b_o_;                              // E, or size 0
    std::optional<rotary_embedding<Scalar>> rotary_;  // config_.rotary for d_k, when set
};

}  // namespace mha

#if defined(MHA_EXTERN_TEMPLATES)
// The layer's float and double members, defined once by src/mha_instantiate.cpp.
extern template class mha::multi_head_attention<float>;
extern template class mha::multi_head_attention<double>;
#endif
