// SPDX-License-Identifier: MIT
// Replays the safetensors fuzzer's corpus (fuzz/safetensors_corpus: seeds and the regressions it
// found) and the golden files through the fuzzer's oracle, so that every ordinary test run checks
// them without libFuzzer.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "safetensors_invariants.hpp"

TEST_CASE("every safetensors corpus file satisfies the fuzzing invariants", "[fuzz][safetensors]") {
    std::size_t replayed = 0;
    for (const char* directory : {MHA_SAFETENSORS_CORPUS_DIR, MHA_TEST_DATA_DIR "/golden"}) {
        for (const auto& entry : std::filesystem::directory_iterator(directory)) {
            std::ifstream file(entry.path(), std::ios::binary);
            const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(file)),
                                                  std::istreambuf_iterator<char>());
            CAPTURE(entry.path().string());
            const auto violation = mha_fuzz::check_safetensors(bytes.data(), bytes.size());
            INFO((violation ? *violation : std::string("none")));
            CHECK(!violation);
            ++replayed;
        }
    }
    REQUIRE(replayed >= 20);  // the committed seeds and golden files: an empty directory must fail
}
