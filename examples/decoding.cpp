// Decoding with grouped-query heads and a KV cache: a prompt, then one token per step, two
// sequences decoding together, a rejected draft rolled back, and a sliding-window cache.
#include <iostream>
#include <vector>

#include <mha/mha.hpp>

int main() {
    // 8 query heads share 2 key/value heads (groups of 4), head width 8.
    mha::attention_config config;
    config.embed_dim = 64;
    config.num_heads = 8;
    config.num_kv_heads = 2;
    const mha::multi_head_attention<float> layer(config, /*seed=*/7);

    const mha::matrix<float> tokens = mha::matrix<float>::Random(64, 12);  // E × L

    // One sequence: the prompt (8 tokens) in one call, then one token per call.
    mha::kv_cache<float> cache = layer.make_cache();  // key_width() = 2·8 rows per token
    cache.reserve(12);
    mha::matrix<float> decoded(64, 12);
    decoded.leftCols(8) = layer.decode(tokens.leftCols(8), cache);
    for (mha::Index t = 8; t < 12; ++t)
        decoded.col(t) = layer.decode(tokens.col(t), cache);
    // The same as a causal forward over the whole sequence.
    const mha::matrix<float> full = layer.forward(tokens, mha::causal{});
    std::cout << "cached tokens: " << cache.size()
              << ", max |decode - forward| = " << (decoded - full).cwiseAbs().maxCoeff() << "\n";

    // Speculative decoding: append 3 draft tokens, keep the first, roll back the other two.
    const mha::Index accepted = cache.position() + 1;
    layer.decode(mha::matrix<float>::Random(64, 3), cache);
    cache.truncate(accepted);
    std::cout << "after the rollback: " << cache.size() << " tokens\n";

    // Continuous batching: two sequences with caches of different lengths, one step each, in
    // one call; sequence 0 adds one token, sequence 1 adds two.
    mha::kv_cache<float> other = layer.make_cache();
    layer.decode(tokens.leftCols(3), other);
    const std::vector<mha::Index> new_tokens{1, 2};
    const std::vector<mha::kv_cache<float>*> caches{&cache, &other};
    const mha::matrix<float> step = layer.decode(tokens.leftCols(3), new_tokens, caches);
    std::cout << "batched step: " << step.cols() << " outputs, caches of " << cache.size()
              << " and " << other.size() << " tokens\n";

    // A sliding window of 4 (each token sees itself and the 3 before it): the cache keeps only
    // what the next step can see.
    mha::kv_cache_options window;
    window.window = 4;
    mha::kv_cache<float> recent = layer.make_cache(window);
    for (mha::Index t = 0; t < 12; ++t)
        layer.decode(tokens.col(t), recent);
    std::cout << "window cache: " << recent.size() << " tokens stored of " << recent.position()
              << " seen\n";
}
