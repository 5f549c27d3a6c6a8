// SPDX-License-Identifier: MIT
/// @file
/// Mask types. Each says in its name what it means, so no boolean convention can be misread:
/// `keep_mask` true = may attend; `additive_bias` is added to the scaled scores; `causal`,
/// `sliding_window` and `key_lengths` exclude keys by position. They compose by intersection
/// (a key is attended only if every mask allows it) into an `attention_mask<Scalar>`. Kernels
/// read them through detail/mask_view.hpp, the one place that says how a mask excludes a key.
#pragma once

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <mha/core.hpp>

namespace mha {

namespace detail {
template <class Scalar>
class mask_view;
template <class Scalar>
class mask_views;
}  // namespace detail

/// Where the causal diagonal sits when the query and key lengths differ.
enum class causal_alignment {
    /// Query i sees keys j <= i + (Lk - Lq): the last query sees every key. This is what a
    /// decode step over a KV cache needs, and what FlashAttention and ONNX use.
    bottom_right,
    /// Query i sees keys j <= i, as PyTorch's `is_causal=True` does.
    top_left,
};

/// Each query attends only to keys at or before its own position (see `causal_alignment`).
struct causal {
    /// Where the diagonal sits when Lq ≠ Lk; bottom-right unless set.
    causal_alignment alignment = causal_alignment::bottom_right;
};

/// Each query attends to keys within `left` positions before and `right` positions after its
/// own position (aligned as `alignment` says). `sliding_window{w, 0}` is causal with a window.
struct sliding_window {
    Index left = 0;   ///< keys before the query's aligned position it may see, ≥ 0
    Index right = 0;  ///< keys after it, ≥ 0 (0: causal with a window)
    causal_alignment alignment = causal_alignment::bottom_right;  ///< as for `causal`
};

/// Sequence b attends only to its first `lengths[b]` keys (the rest is padding or unused cache).
/// One entry per sequence of the batch (a single entry for an unbatched call).
struct key_lengths {
    /// lengths[b]: the keys sequence b sees, 0 ≤ lengths[b] ≤ its key count.
    std::vector<Index> lengths;
};

/// Keys excluded sequence by sequence, whatever their pattern: `padding(b, j)` true means key `j`
/// of sequence `b` is padding, and no query of that sequence attends to it. Shape `N × S`
/// (sequences × keys, S the longest key length of the batch), true = padding: the same bytes and
/// polarity as `nn.MultiheadAttention`'s `key_padding_mask`, so an arbitrary PyTorch padding mask
/// needs no expansion to N matrices of `S × L`. A sequence whose keys are all padding has no key
/// to attend to: its queries get output 0 (see docs/semantics.md). For padding only at the end
/// of each sequence, `key_lengths` says the same in less memory and lets kernels skip the keys.
struct padded_keys {
    /// N × S, true = key j of sequence b is padding (excluded).
    bool_matrix padding;
};

/// Explicit permission matrix, shape `Lk × Lq` (rows: keys, columns: queries, like the scores):
/// `true` means the query may attend to the key. The same bytes as a PyTorch `(L, S)` bool
/// tensor, but note the polarity: this is SDPA's convention, the opposite of
/// `nn.MultiheadAttention`'s boolean `attn_mask` (where true means "do not attend").
///
/// `masks` holds 1 matrix (shared by every sequence and head), B (one per sequence) or B·H
/// (sequence b, head h at index b·H + h).
struct keep_mask {
    /// 1, B or B·H matrices, each Lk × Lq, true = may attend.
    std::vector<bool_matrix> masks;
    /// No matrix (masks nothing until some are added to `masks`).
    keep_mask() = default;
    /// One matrix shared by every sequence and head.
    explicit keep_mask(bool_matrix mask) { masks.push_back(std::move(mask)); }
    /// B matrices (one per sequence) or B·H (sequence b, head h at index b·H + h).
    explicit keep_mask(std::vector<bool_matrix> per_sequence_or_head)
        : masks(std::move(per_sequence_or_head)) {}
};

/// Added to the scaled scores before normalisation, shape `Lk × Lq`; −∞ excludes a key.
/// Broadcast like `keep_mask`: 1, B or B·H matrices.
template <class Scalar>
struct additive_bias {
    /// 1, B or B·H matrices, each Lk × Lq.
    std::vector<matrix<Scalar>> biases;
    /// No matrix (adds nothing until some are added to `biases`).
    additive_bias() = default;
    /// One matrix shared by every sequence and head.
    explicit additive_bias(matrix<Scalar> bias) { biases.push_back(std::move(bias)); }
    /// B matrices (one per sequence) or B·H (sequence b, head h at index b·H + h).
    explicit additive_bias(std::vector<matrix<Scalar>> per_sequence_or_head)
        : biases(std::move(per_sequence_or_head)) {}
};

/// The composition of any number of the masks above. Implicitly constructible from each of them,
/// so a function taking `const attention_mask<Scalar>&` accepts `mha::causal{}` directly.
template <class Scalar>
class attention_mask {
public:
    /// No mask: every query attends to every key of its sequence.
    attention_mask() = default;
    // NOLINTBEGIN(google-explicit-constructor): one mask is a mask set of one.
    /// The set of one causal mask.
    attention_mask(causal c) { add(c); }
    /// The set of one sliding window; value_error if a side is negative.
    attention_mask(sliding_window w) { add(w); }
    /// The set of one key_lengths; value_error if a length is negative.
    attention_mask(key_lengths k) { add(std::move(k)); }
    /// The set of one keep_mask.
    attention_mask(keep_mask k) { add(std::move(k)); }
    /// The set of one padded_keys.
    attention_mask(padded_keys p) { add(std::move(p)); }
    /// The set of one additive_bias.
    attention_mask(additive_bias<Scalar> b) { add(std::move(b)); }
    // NOLINTEND(google-explicit-constructor)

    /// Several masks at once: `attention_mask<float>(causal{}, key_lengths{{3, 5}})`.
    template <class First, class Second, class... Rest>
    attention_mask(First first, Second second, Rest... rest) {
        add(std::move(first));
        add(std::move(second));
        (add(std::move(rest)), ...);
    }

    /// Adds a causal mask; value_error if one of the other alignment is already there.
    attention_mask& add(causal c) {
        if (causal_ && causal_->alignment != c.alignment)
            detail::fail<value_error>("mha::attention_mask", "a second causal mask's alignment",
                                      "the same as the first", "a different one");
        causal_ = c;
        return *this;
    }
    /// Adds a window (several windows intersect); value_error if a side is negative.
    attention_mask& add(sliding_window w) {
        if (w.left < 0) detail::fail<value_error>("mha::sliding_window", "left", ">= 0", w.left);
        if (w.right < 0) detail::fail<value_error>("mha::sliding_window", "right", ">= 0", w.right);
        windows_.push_back(w);
        return *this;
    }
    /// Adds key lengths; value_error if a length is negative or key_lengths is already there.
    attention_mask& add(key_lengths k) {
        if (key_lengths_)
            detail::fail<value_error>("mha::attention_mask", "key_lengths", "given at most once",
                                      "a second one");
        for (std::size_t b = 0; b < k.lengths.size(); ++b)
            if (k.lengths[b] < 0)
                detail::fail<value_error>("mha::key_lengths", "lengths[" + std::to_string(b) + "]",
                                          ">= 0", k.lengths[b]);
        key_lengths_ = std::move(k);
        return *this;
    }
    /// Adds a per-key padding mask; value_error if one is already there.
    attention_mask& add(padded_keys p) {
        if (padded_keys_)
            detail::fail<value_error>("mha::attention_mask", "padded_keys", "given at most once",
                                      "a second one");
        padded_keys_ = std::move(p);
        return *this;
    }
    /// Adds a keep_mask (several intersect, each broadcast by its own count).
    attention_mask& add(keep_mask k) {
        for (auto& m : k.masks)
            keep_.push_back(std::move(m));
        keep_groups_.push_back(k.masks.size());
        return *this;
    }
    /// Adds an additive bias (several are summed, each broadcast by its own count).
    attention_mask& add(additive_bias<Scalar> b) {
        for (auto& m : b.biases)
            bias_.push_back(std::move(m));
        bias_groups_.push_back(b.biases.size());
        return *this;
    }
    /// Adds every mask of `other`, each as its own `add` would.
    attention_mask& add(const attention_mask& other) {
        if (other.causal_) add(*other.causal_);
        for (const auto& w : other.windows_)
            add(w);
        if (other.key_lengths_) add(*other.key_lengths_);
        if (other.padded_keys_) add(*other.padded_keys_);
        std::size_t at = 0;
        for (std::size_t n : other.keep_groups_) {
            add(keep_mask(
                std::vector<bool_matrix>(other.keep_.begin() + at, other.keep_.begin() + at + n)));
            at += n;
        }
        at = 0;
        for (std::size_t n : other.bias_groups_) {
            add(additive_bias<Scalar>(std::vector<matrix<Scalar>>(other.bias_.begin() + at,
                                                                  other.bias_.begin() + at + n)));
            at += n;
        }
        return *this;
    }

    /// Intersection of two mask sets.
    template <class Mask>
    friend attention_mask operator&(attention_mask lhs, Mask rhs) {
        lhs.add(std::move(rhs));
        return lhs;
    }

    /// Whether the set holds no mask.
    bool empty() const {
        return !causal_ && windows_.empty() && !key_lengths_ && !padded_keys_ && keep_.empty() &&
               bias_.empty();
    }
    /// The causal mask, if one was added.
    const std::optional<causal>& causal_mask() const { return causal_; }
    /// The sliding windows, in the order added.
    const std::vector<sliding_window>& windows() const { return windows_; }
    /// The key lengths, if added.
    const std::optional<key_lengths>& lengths() const { return key_lengths_; }
    /// The per-key padding mask, if added.
    const std::optional<padded_keys>& padding() const { return padded_keys_; }
    /// Whether a mask acts key by key (keep_mask, padded_keys, additive_bias) rather than by
    /// position alone.
    bool has_elementwise() const { return !keep_.empty() || !bias_.empty() || padded_keys_; }

    /// Checks every mask against a batch of `num_sequences` sequences with `num_heads` heads
    /// whose query and key lengths are given; throws shape_error naming the offending mask.
    void validate(const char* where, Index num_heads, const std::vector<Index>& query_lengths,
                  const std::vector<Index>& key_lengths_of_batch) const {
        const auto batch = static_cast<Index>(query_lengths.size());
        // Kernels index their (sequence, head) problems by b·H + h.
        detail::checked_mul(where, "sequences * num_heads", batch, num_heads);
        if (key_lengths_) {
            detail::check_size(where, "key_lengths.lengths.size()", batch,
                               static_cast<Index>(key_lengths_->lengths.size()),
                               "one per sequence");
            for (Index b = 0; b < batch; ++b)
                if (key_lengths_->lengths[b] > key_lengths_of_batch[b])
                    detail::fail<shape_error>(
                        where, "key_lengths.lengths[" + std::to_string(b) + "]",
                        "<= " + std::to_string(key_lengths_of_batch[b]) + " (keys in sequence)",
                        key_lengths_->lengths[b]);
        }
        if (padded_keys_) {
            const bool_matrix& p = padded_keys_->padding;
            const Index longest =
                key_lengths_of_batch.empty()
                    ? 0
                    : *std::max_element(key_lengths_of_batch.begin(), key_lengths_of_batch.end());
            detail::check_size(where, "padded_keys.padding.rows()", batch, p.rows(),
                               "one row per sequence");
            detail::check_size(where, "padded_keys.padding.cols()", longest, p.cols(),
                               "the longest key length of the batch");
        }
        check_groups(where, "keep_mask", keep_groups_, keep_, num_heads, query_lengths,
                     key_lengths_of_batch);
        check_groups(where, "additive_bias", bias_groups_, bias_, num_heads, query_lengths,
                     key_lengths_of_batch);
    }

private:
    template <class M>
    static void check_groups(const char* where, const char* name,
                             const std::vector<std::size_t>& groups, const std::vector<M>& items,
                             Index num_heads, const std::vector<Index>& lq,
                             const std::vector<Index>& lk) {
        const auto batch = static_cast<Index>(lq.size());
        std::size_t at = 0;
        for (std::size_t n : groups) {
            const auto count = static_cast<Index>(n);
            if (count != 1 && count != batch && count != batch * num_heads)
                detail::fail<shape_error>(where, std::string(name) + " count",
                                          "1, " + std::to_string(batch) + " (sequences) or " +
                                              std::to_string(batch * num_heads) +
                                              " (sequences x heads)",
                                          count);
            for (Index i = 0; i < count; ++i) {
                const Index b = count == 1 ? 0 : (count == batch ? i : i / num_heads);
                const auto& m = items[at + static_cast<std::size_t>(i)];
                // The argument's name is built only for the message: a passing check allocates
                // nothing.
                auto check = [&](const char* member, Index expected, Index actual,
                                 const char* meaning) {
                    if (actual == expected) return;
                    detail::check_size(where,
                                       std::string(name) + "[" + std::to_string(i) + "]" + member,
                                       expected, actual, meaning);
                };
                if (count == 1) {
                    for (Index s = 0; s < batch; ++s) {
                        check(".rows()", lk[s], m.rows(), "keys in sequence");
                        check(".cols()", lq[s], m.cols(), "queries in sequence");
                    }
                } else {
                    check(".rows()", lk[b], m.rows(), "keys in sequence");
                    check(".cols()", lq[b], m.cols(), "queries in sequence");
                }
            }
            at += n;
        }
    }

    std::optional<causal> causal_;
    std::vector<sliding_window> windows_;
    std::optional<key_lengths> key_lengths_;
    std::optional<padded_keys> padded_keys_;
    std::vector<bool_matrix> keep_;
    std::vector<std::size_t> keep_groups_;
    std::vector<matrix<Scalar>> bias_;
    std::vector<std::size_t> bias_groups_;

    // What a kernel sees of the masks for one (sequence, head): detail/mask_view.hpp.
    friend class detail::mask_view<Scalar>;
    friend class detail::mask_views<Scalar>;
};

}  // namespace mha
