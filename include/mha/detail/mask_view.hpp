// SPDX-License-Identifier: MIT
// What a kernel sees of an `attention_mask` for one (sequence, head) problem, and the one place
// that says how masks exclude keys:
//   - positional masks (causal, sliding windows, key_lengths) give each query an interval of
//     allowed keys, `key_range(i)`; kernels skip whole blocks outside it;
//   - inside that interval, a key is excluded by a `keep_mask` entry that is false, a
//     `padded_keys` entry that is true, or a total `additive_bias` of −∞; otherwise its score
//     becomes score + bias.
// Exclusion is a selection, never arithmetic: an excluded score becomes −∞ whatever the score
// was, because adding −∞ to a NaN or ±∞ score (a poisoned key) would give NaN and leak it into
// every weight of the query.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/mask.hpp>

namespace mha {
namespace detail {

/// The masks of one (sequence, head) problem with `lq` queries and `lk` keys. A view refers to
/// the `attention_mask` and the `mask_views` it came from (a few words, no copy): it must not
/// outlive them, nor see them modified.
template <class Scalar>
class mask_view {
public:
    /// No mask: every query may attend to all `lk` keys.
    mask_view(Index lq, Index lk) : lq_(lq), lk_(lk), key_limit_(lk) {}

    Index query_count() const { return lq_; }
    Index key_count() const { return lk_; }

    /// The view of a one-query problem in which every query index means that one query: the
    /// query heads of a key/value group stacked as the queries of one problem (see
    /// make_stacked_problem) all see what query 0 sees.
    mask_view stacked() const {
        mask_view v = *this;
        v.query_step_ = 0;
        return v;
    }

    /// Keys [first, last) of query i allowed by the positional masks (causal, windows,
    /// key_lengths); first == last when none is.
    std::pair<Index, Index> key_range(Index i) const {
        i *= query_step_;
        Index first = 0;
        Index last = key_limit_;
        if (mask_ != nullptr) {
            if (mask_->causal_) {
                const Index c = i + offset(mask_->causal_->alignment);
                last = std::min(last, c + 1);
            }
            // A window reaching further than lq + lk keys reaches every key; capping it there
            // keeps c - left and c + right + 1 inside Index for any window up to INT64_MAX.
            const Index reach = lq_ + lk_;
            for (const auto& w : mask_->windows_) {
                const Index c = i + offset(w.alignment);
                first = std::max(first, c - std::min(w.left, reach));
                last = std::min(last, c + std::min(w.right, reach) + 1);
            }
        }
        // Clamp into [0, key_limit]: a top-left window with Lq > Lk would otherwise start past
        // the last key, and callers index the scores with the range.
        first = std::min(std::max<Index>(first, 0), key_limit_);
        if (last < first) last = first;
        return {first, last};
    }

    bool has_keep() const { return keep_count_ > 0 || padding_ != nullptr; }
    bool has_bias() const { return bias_count_ > 0; }
    /// Whether any mask acts key by key (keep_mask, padded_keys, additive_bias).
    bool has_elementwise() const { return has_keep() || has_bias(); }

    /// Whether every keep_mask, and padded_keys, allow key j for query i.
    bool keeps(Index j, Index i) const {
        if (padding_ != nullptr && padding_[j * padding_stride_]) return false;
        i *= query_step_;
        for (Index g = 0; g < keep_count_; ++g)
            if (!(*keep_[g])(j, i)) return false;
        return true;
    }
    /// The sum of the additive biases at (key j, query i).
    Scalar bias(Index j, Index i) const {
        i *= query_step_;
        Scalar total(0);
        for (Index g = 0; g < bias_count_; ++g)
            total += (*bias_[g])(j, i);
        return total;
    }

    /// The single rule: the score of key j for query i after the element-wise masks, given the
    /// scaled score s of a key inside the query's key_range: −∞ if a keep_mask or a −∞ bias
    /// excludes it, else s + bias.
    Scalar masked_score(Scalar s, Index j, Index i) const {
        const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
        if (has_bias()) {
            const Scalar b = bias(j, i);
            s = b == minus_inf ? minus_inf : s + b;
        }
        if (has_keep() && !keeps(j, i)) s = minus_inf;
        return s;
    }

    /// Whether the element-wise masks exclude key j for query i (see masked_score).
    bool excludes(Index j, Index i) const {
        return (has_keep() && !keeps(j, i)) ||
               (has_bias() && bias(j, i) == -std::numeric_limits<Scalar>::infinity());
    }

    /// Whether query i may see key j by the positional and keep masks (a −∞ bias aside).
    bool allows(Index j, Index i) const {
        const auto range = key_range(i);
        return j >= range.first && j < range.second && keeps(j, i);
    }

    /// True when no mask excludes or changes any score.
    bool is_unmasked() const {
        return key_limit_ == lk_ && !has_elementwise() &&
               (mask_ == nullptr || (!mask_->causal_ && mask_->windows_.empty()));
    }

    /// Masks query i's scores against keys [j0, j0 + nk): the score of key j0 + r lies at
    /// s[r·key_stride]. Keys outside [first, last) (block-relative, from key_range) become −∞;
    /// the others go through masked_score.
    void apply(Scalar* s, Index key_stride, Index i, Index j0, Index nk, Index first,
               Index last) const {
        const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
        if (key_stride == 1) {  // a column of Lk × Lq scores: contiguous, filled by packets
            std::fill(s, s + first, minus_inf);
            std::fill(s + last, s + nk, minus_inf);
        } else {
            for (Index r = 0; r < first; ++r)
                s[r * key_stride] = minus_inf;
            for (Index r = last; r < nk; ++r)
                s[r * key_stride] = minus_inf;
        }
        if (!has_elementwise()) return;
        for (Index r = first; r < last; ++r) {
            Scalar& x = s[r * key_stride];
            x = masked_score(x, j0 + r, i);
        }
    }

private:
    friend class mask_views<Scalar>;

    // Where query i's diagonal lies: key i + offset.
    Index offset(causal_alignment alignment) const {
        return alignment == causal_alignment::bottom_right ? lk_ - lq_ : 0;
    }

    const attention_mask<Scalar>* mask_ = nullptr;
    const bool_matrix* const* keep_ = nullptr;     // the keep_mask matrices of this problem
    const matrix<Scalar>* const* bias_ = nullptr;  // the additive_bias matrices of this problem
    Index keep_count_ = 0, bias_count_ = 0;
    const bool* padding_ = nullptr;  // padded_keys: this sequence's row, key j at j·padding_stride_
    Index padding_stride_ = 0;
    Index lq_;
    Index lk_;
    Index key_limit_;       // key_lengths: keys at or past it do not exist for this sequence
    Index query_step_ = 1;  // query index i reads the masks at query i·query_step_ (0: stacked)
};

/// The mask views of every (sequence, head) problem of a call. Which matrix of a group applies
/// is resolved here once (a group of 1 is shared, B has one per sequence, B·H one per head), so
/// kernels never search groups per score. Rebuilt per call; its vectors only grow, so a call
/// with the shapes of an earlier one allocates nothing.
template <class Scalar>
class mask_views {
public:
    /// Views of `mask` (already validated for this batch and head count) for sequence b and
    /// head h of `batch`, at index b·num_heads + h.
    void build(const attention_mask<Scalar>& mask, Index num_heads, const packed_batch& batch) {
        const Index nb = batch.size();
        const auto problems = static_cast<std::size_t>(nb * num_heads);
        const std::size_t keep_groups = mask.keep_groups_.size();
        const std::size_t bias_groups = mask.bias_groups_.size();
        // Sized before any view takes a pointer into them.
        keep_.resize(problems * keep_groups);
        bias_.resize(problems * bias_groups);
        views_.clear();
        for (Index b = 0; b < nb; ++b)
            for (Index h = 0; h < num_heads; ++h) {
                const auto p = views_.size();
                mask_view<Scalar> v(batch.query_length(b), batch.key_length(b));
                v.mask_ = &mask;
                if (mask.key_lengths_)
                    v.key_limit_ = mask.key_lengths_->lengths[static_cast<std::size_t>(b)];
                if (mask.padded_keys_ && mask.padded_keys_->padding.size() > 0) {
                    // Row b of the N × S column-major matrix: key j lies N entries after key j-1.
                    v.padding_ = mask.padded_keys_->padding.data() + b;
                    v.padding_stride_ = mask.padded_keys_->padding.rows();
                }
                const bool_matrix** keep = keep_.data() + p * keep_groups;
                const matrix<Scalar>** bias = bias_.data() + p * bias_groups;
                std::size_t at = 0;
                for (std::size_t g = 0; g < keep_groups; ++g) {
                    const std::size_t n = mask.keep_groups_[g];
                    keep[g] = &mask.keep_[at + member(n, b, h, nb, num_heads)];
                    at += n;
                }
                at = 0;
                for (std::size_t g = 0; g < bias_groups; ++g) {
                    const std::size_t n = mask.bias_groups_[g];
                    bias[g] = &mask.bias_[at + member(n, b, h, nb, num_heads)];
                    at += n;
                }
                v.keep_ = keep;
                v.keep_count_ = static_cast<Index>(keep_groups);
                v.bias_ = bias;
                v.bias_count_ = static_cast<Index>(bias_groups);
                views_.push_back(v);
            }
        num_heads_ = num_heads;
        // A group of B·H matrices differs from head to head (with H > 1); 1 or B do not.
        same_for_every_head_ = true;
        for (std::size_t n : mask.keep_groups_)
            same_for_every_head_ &= num_heads == 1 || static_cast<Index>(n) != nb * num_heads;
        for (std::size_t n : mask.bias_groups_)
            same_for_every_head_ &= num_heads == 1 || static_cast<Index>(n) != nb * num_heads;
    }

    /// Whether every head of a sequence has the same masks (no per-head keep_mask or bias).
    bool same_for_every_head() const { return same_for_every_head_; }

    /// The view of sequence b, head h.
    const mask_view<Scalar>& operator()(Index b, Index h) const {
        return views_[static_cast<std::size_t>(b * num_heads_ + h)];
    }

private:
    // Which matrix of a group of `count` serves (b, h); validate() allows no other counts.
    static std::size_t member(std::size_t count, Index b, Index h, Index nb, Index num_heads) {
        const auto n = static_cast<Index>(count);
        if (n == 1) return 0;
        if (n == nb) return static_cast<std::size_t>(b);
        return static_cast<std::size_t>(b * num_heads + h);
    }

    std::vector<const bool_matrix*> keep_;
    std::vector<const matrix<Scalar>*> bias_;
    std::vector<mask_view<Scalar>> views_;
    Index num_heads_ = 1;
    bool same_for_every_head_ = true;
};

}  // namespace detail
}  // namespace mha
