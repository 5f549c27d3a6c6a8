// SPDX-License-Identifier: MIT
/// @file
/// What a caller chooses about an attention call: how scores become weights, which kernel runs,
/// and what the call returns besides its output.
#pragma once

#include <optional>
#include <vector>

#include <mha/core.hpp>

namespace mha {

/// How each query's scores become weights.
enum class normalization {
    /// exp(s − max) / Σ exp(s − max): weights are positive and sum to 1. The default.
    softmax,
    /// max(s, 0) / Σ max(s, 0) over the query's keys (ReLU followed by normalisation, the
    /// alternative the textbook names). A query whose scores are all ≤ 0 gets weights 0.
    relu,
    /// 1 / (1 + exp(−s)) per key, not normalised across keys (sigmoid attention; pair it with an
    /// `additive_bias` of −log(Lk) to keep outputs at softmax scale).
    sigmoid,
};

/// The enumerator's name, e.g. "softmax" (for messages and logs).
inline const char* to_string(normalization n) {
    switch (n) {
        case normalization::softmax:
            return "softmax";
        case normalization::relu:
            return "relu";
        case normalization::sigmoid:
            return "sigmoid";
    }
    return "unknown";
}

/// Which kernel computes the attention core.
enum class attention_algorithm {
    /// tiled for softmax, materialized for the other normalisations.
    automatic,
    /// Scores Lk × Lq in full, then normalise, then V·P: the simple reference path.
    materialized,
    /// Online-softmax tiles (detail/tiled/): memory linear in L, multi-threaded with OpenMP.
    /// Softmax only: relu and sigmoid have no online form here and use materialized.
    tiled,
};

/// Settings of the attention core.
struct attention_options {
    /// Multiplies Kᵀ·Q; 1/√d_k when not set. Must be finite.
    std::optional<double> scale;
    /// How scores become weights.
    normalization normalize = normalization::softmax;
    /// Which kernel runs (the results agree to rounding; see attention_algorithm).
    attention_algorithm algorithm = attention_algorithm::automatic;
    /// Logit soft-capping (Gemma 2, Grok): each scaled score s becomes cap·tanh(s / cap), before
    /// ALiBi, the bias and the mask. Not set: no capping. Must be finite and > 0.
    std::optional<double> softcap;
    /// ALiBi: query head h adds alibi_slopes[h]·(j − i − (Lk − Lq)) to the score of query i and
    /// key j of its sequence (positions aligned bottom-right, as causal masks are). Empty: no
    /// ALiBi; otherwise one slope per query head (mha::alibi_slopes gives the standard ones).
    std::vector<double> alibi_slopes;
    /// Attention sinks (gpt-oss): query head h's softmax normaliser gets the extra term
    /// exp(sinks[h]), a logit with no value, so the weights of the keys sum to less than 1.
    /// Empty: none; otherwise one finite logit per query head. Softmax only.
    std::vector<double> sinks;
};

/// Which attention weights a call returns.
enum class weights_mode {
    none,      ///< do not return weights
    per_head,  ///< one `Lk × Lq` matrix per sequence and head, index b·H + h
    averaged,  ///< one `Lk × Lq` matrix per sequence: the mean over heads (PyTorch's default)
};

/// What an attention call computes besides its output. The default asks for nothing more, and
/// costs nothing more.
struct attention_request {
    /// Attention weights (`attention_outputs::weights`). Only they grow with Lk × Lq.
    weights_mode weights = weights_mode::none;
    /// Each query's log-sum-exp (`attention_outputs::log_sum_exp`). Softmax only.
    bool log_sum_exp = false;
};

/// What an attention call returns besides its output, as its `attention_request` asked.
template <class Scalar>
struct attention_outputs {
    /// `weights_mode::per_head`: B·H matrices, sequence b and head h at b·H + h;
    /// `weights_mode::averaged`: B matrices. Each `Lk × Lq` of its sequence. Empty if not asked.
    std::vector<matrix<Scalar>> weights;
    /// `H × Nq`: entry (h, i) is log Σ_j exp(s_ij) of head h and query column i over the keys
    /// the query may attend to, s being the scores after scale, soft-capping, ALiBi, bias and
    /// score modifier (the softmax weights are exp(s_ij − log_sum_exp(h, i))); with attention
    /// sinks the sum also holds exp(sinks[h]), so a query with no key to attend to has
    /// sinks[h], and without sinks −∞. What a backward
    /// pass needs to recompute the weights, and what merges results over disjoint key sets.
    /// Empty (0 × 0) if not asked.
    matrix<Scalar> log_sum_exp;
};

}  // namespace mha
