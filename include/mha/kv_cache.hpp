// SPDX-License-Identifier: MIT
/// @file
/// A key/value cache for decoding: one layer's projected (and position-rotated) keys and values
/// of one sequence, one column per token, oldest first, so the attention kernels read them in
/// place as the keys of a packed batch.
///
///   storage:  | dropped or free | stored tokens (size()) | free (room for appends) |
///              0                 begin                    end                        capacity
///
/// A windowed cache (options.window = W) keeps the tokens the next step's queries can see: after
/// an append of n tokens it holds at most W − 1 earlier tokens plus the n new ones, and the token
/// at position p attends to positions (p − W, p]. Its stored columns slide right as tokens
/// arrive; only when they reach the end of the storage are they moved back to the front, once
/// every capacity − (W − 1) appended tokens, not on every step.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/huge_pages.hpp>

namespace mha {

/// How a kv_cache keeps its tokens.
struct kv_cache_options {
    /// W ≥ 1: each token attends to itself and the W − 1 tokens before it (the sliding window
    /// of Mistral and Gemma), and the cache keeps no more than that. 0: every token is kept.
    Index window = 0;
    /// false: an append that does not fit in the reserved capacity is a shape_error instead of
    /// a reallocation (for callers that must never allocate while decoding).
    bool growable = true;
    /// true: on Linux, the storage is advised onto 2 MiB pages (transparent huge pages, where
    /// the system has them in "madvise" or "always" mode). A decoding step reads one head's
    /// slice of each token's column, one 4 KiB page per token otherwise (a long cache's step
    /// measured 1.04-1.19x faster with huge pages). Costs at most 2 MiB per buffer beyond the
    /// tokens written.
    bool huge_pages = true;
};

/// The keys (key_rows × tokens) and values (value_rows × tokens) of one sequence at one layer.
/// For a multi_head_attention layer: key_rows = layer.key_width() = H_kv·d_k and
/// value_rows = layer.value_width() = H_kv·d_v. Not thread-safe; one cache per sequence.
template <class Scalar>
class kv_cache {
    static_assert(detail::is_supported_scalar_v<Scalar> || detail::is_bfloat16_v<Scalar>,
                  "mha: Scalar must be float or double (a kv_cache also takes Eigen::bfloat16)");

public:
    /// What `append` takes: any column-major Scalar matrix expression, viewed without a copy.
    using input = Eigen::Ref<const matrix<Scalar>>;
    /// The stored keys or values, a view into the cache (valid until it is modified).
    using const_view = Eigen::Block<const matrix<Scalar>, Eigen::Dynamic, Eigen::Dynamic, true>;

    /// An empty cache of no width; assign a sized one before use.
    kv_cache() = default;

    /// An empty cache for keys of `key_rows` rows (H_kv·d_k) and values of `value_rows` rows
    /// (H_kv·d_v); value_error unless both are ≥ 1 and `options.window` ≥ 0.
    kv_cache(Index key_rows, Index value_rows, const kv_cache_options& options = {})
        : options_(options) {
        constexpr const char* where = "mha::kv_cache";
        if (key_rows <= 0) detail::fail<value_error>(where, "key_rows", ">= 1", key_rows);
        if (value_rows <= 0) detail::fail<value_error>(where, "value_rows", ">= 1", value_rows);
        if (options.window < 0)
            detail::fail<value_error>(where, "options.window", ">= 0 (0: keep every token)",
                                      options.window);
        keys_.resize(key_rows, 0);
        values_.resize(value_rows, 0);
    }

    /// Rows of a stored key, H_kv·d_k.
    Index key_rows() const { return keys_.rows(); }
    /// Rows of a stored value, H_kv·d_v.
    Index value_rows() const { return values_.rows(); }
    /// The options the cache was built with.
    const kv_cache_options& options() const { return options_; }
    /// The tokens kept (a sliding window), 0 for every token: `options().window`.
    Index window() const { return options_.window; }

    /// Tokens stored: the keys the next step attends to, besides its own.
    Index size() const { return end_ - begin_; }
    /// Whether no token is stored.
    bool empty() const { return size() == 0; }
    /// Tokens appended since `clear` (less those truncated): the position of the next token.
    Index position() const { return position_; }
    /// The position of the oldest stored token.
    Index first_position() const { return position_ - size(); }
    /// Columns of storage. An append of n tokens allocates nothing while the tokens kept from
    /// before it plus n fit (see `fits`).
    Index capacity() const { return keys_.cols(); }

    /// Whether an append of `tokens` tokens needs no allocation.
    bool fits(Index tokens) const { return kept_before_append() + tokens <= capacity(); }

    /// Room for `tokens` tokens (in window mode, at least 2·W columns, so that the window
    /// moves back to the front at most once every W + 1 single-token steps). Keeps the stored
    /// tokens; never shrinks.
    void reserve(Index tokens) {
        if (tokens < 0)
            detail::fail<value_error>("mha::kv_cache::reserve", "tokens", ">= 0", tokens);
        grow_to(options_.window > 0 ? std::max(tokens, 2 * options_.window) : tokens);
    }

    /// Appends the keys (key_rows × n) and values (value_rows × n) of n new tokens, at
    /// positions position() … position() + n − 1. In window mode, first drops the tokens no
    /// new query can see. Allocates only when `fits(n)` is false, and then only if growable.
    void append(const input& keys, const input& values) {
        constexpr const char* where = "mha::kv_cache::append";
        detail::check_size(where, "keys.rows()", key_rows(), keys.rows(), "the cache's key_rows");
        detail::check_size(where, "values.rows()", value_rows(), values.rows(),
                           "the cache's value_rows");
        detail::check_size(where, "values.cols()", keys.cols(), values.cols(), "keys.cols()");
        const Index n = keys.cols();
        make_room(where, n);
        keys_.middleCols(end_, n) = keys;
        values_.middleCols(end_, n) = values;
        end_ += n;
        position_ += n;
    }

    /// Forgets the tokens at positions ≥ `position` (rolls back a rejected draft). `position`
    /// must lie in [first_position(), position()].
    void truncate(Index position) {
        if (position < first_position() || position > position_)
            detail::fail<value_error>("mha::kv_cache::truncate", "position",
                                      "in [" + std::to_string(first_position()) + ", " +
                                          std::to_string(position_) + "] (the stored positions)",
                                      position);
        end_ -= position_ - position;
        position_ = position;
    }

    /// Forgets every token; keeps the storage.
    void clear() { begin_ = end_ = position_ = 0; }

    /// The stored keys, key_rows × size(), oldest first.
    const_view keys() const { return keys_.middleCols(begin_, size()); }
    /// The stored values, value_rows × size(), oldest first.
    const_view values() const { return values_.middleCols(begin_, size()); }

    /// Throws what `append` of `tokens` tokens would throw for lack of room, changing nothing:
    /// lets a batched step check every cache before it changes any.
    void check_append(Index tokens) const {
        if (tokens < 0)
            detail::fail<value_error>("mha::kv_cache::append", "tokens", ">= 0", tokens);
        if (!fits(tokens) && !options_.growable) refuse("mha::kv_cache::append", tokens);
    }

private:
    // Stored tokens that an append keeps: in window mode only the W − 1 most recent.
    Index kept_before_append() const {
        return options_.window > 0 ? std::min(size(), options_.window - 1) : size();
    }

    [[noreturn]] void refuse(const char* where, Index tokens) const {
        detail::fail<shape_error>(where, "the number of new tokens",
                                  "<= " + std::to_string(capacity() - kept_before_append()) +
                                      " (the reserved capacity " + std::to_string(capacity()) +
                                      " less the " + std::to_string(kept_before_append()) +
                                      " tokens kept; the cache is not growable)",
                                  tokens);
    }

    void make_room(const char* where, Index n) {
        const Index kept = kept_before_append();
        // Refused before anything moves: a throwing append leaves the cache as it was.
        if (kept + n > capacity() && !options_.growable) refuse(where, n);
        begin_ = end_ - kept;
        if (end_ + n <= capacity()) return;
        if (kept + n > capacity()) {
            const Index floor = options_.window > 0 ? 2 * options_.window : 0;
            grow_to(std::max({kept + n, 2 * capacity(), floor}));
        }
        move_to_front();
    }

    // Moves the stored columns to the front of the storage. Columns move left, so copying them
    // in increasing order never overwrites a column before it is read.
    void move_to_front() {
        if (begin_ == 0) return;
        for (Index c = 0; c < size(); ++c) {
            keys_.col(c) = keys_.col(begin_ + c);
            values_.col(c) = values_.col(begin_ + c);
        }
        end_ -= begin_;
        begin_ = 0;
    }

    void grow_to(Index columns) {
        if (columns <= capacity()) return;
        matrix<Scalar> keys(key_rows(), columns), values(value_rows(), columns);
        if (options_.huge_pages) {
            detail::advise_huge_pages(keys.data(), sizeof(Scalar) * std::size_t(keys.size()));
            detail::advise_huge_pages(values.data(), sizeof(Scalar) * std::size_t(values.size()));
        }
        keys.leftCols(size()) = this->keys();
        values.leftCols(size()) = this->values();
        keys_.swap(keys);
        values_.swap(values);
        end_ -= begin_;
        begin_ = 0;
    }

    kv_cache_options options_{};
    matrix<Scalar> keys_;    // key_rows × capacity
    matrix<Scalar> values_;  // value_rows × capacity
    Index begin_ = 0, end_ = 0;
    Index position_ = 0;
};

}  // namespace mha
