// SPDX-License-Identifier: MIT
// libFuzzer entry point: any violated invariant (see attention_invariants.hpp) is a crash.
#include <cstdio>
#include <cstdlib>

#include "attention_invariants.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (const auto violation = mha_fuzz::check(data, size)) {
        std::fprintf(stderr, "invariant violated: %s\n", violation->c_str());
        std::abort();
    }
    return 0;
}
