// SPDX-License-Identifier: MIT
// libFuzzer entry point for the layer's public API with hostile batches, masks and settings: any
// violated invariant (see layer_invariants.hpp) is a crash.
#include <cstdio>
#include <cstdlib>

#include "layer_invariants.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (const auto violation = mha_fuzz::check_layer(data, size)) {
        std::fprintf(stderr, "invariant violated: %s\n", violation->c_str());
        std::abort();
    }
    return 0;
}
