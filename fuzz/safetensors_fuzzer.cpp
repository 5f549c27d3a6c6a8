// SPDX-License-Identifier: MIT
// libFuzzer entry point for the safetensors reader and the state-dict loader: any violated
// invariant (see safetensors_invariants.hpp) is a crash.
#include <cstdio>
#include <cstdlib>

#include "safetensors_invariants.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (const auto violation = mha_fuzz::check_safetensors(data, size)) {
        std::fprintf(stderr, "invariant violated: %s\n", violation->c_str());
        std::abort();
    }
    return 0;
}
