// SPDX-License-Identifier: MIT
// Checks a browser's rendering of an SVG picture, given as a binary PPM (P6) image: it has the
// size the SVG declares, it is not blank (part of it is drawn, and not all of it), and every
// colour given on the command line (the heads' colours, "#rrggbb") appears in it.
//
//   picture_check IMAGE.ppm WIDTH HEIGHT [#rrggbb ...]
//
// Exit status 0 when every check passes; otherwise 1 with a message naming the failed check.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

namespace {

struct image {
    long width = 0, height = 0;
    std::vector<unsigned char> rgb;  // width × height pixels, 3 bytes each, rows top to bottom
};

// The next header field of a PPM file: a token after white space and '#' comments.
std::string header_token(std::istream& in) {
    std::string token;
    char c = 0;
    while (in.get(c)) {
        if (c == '#') {
            std::string comment;
            std::getline(in, comment);
        } else if (c == ' ' || c == '\n' || c == '\r' || c == '\t') {
            if (!token.empty()) return token;
        } else {
            token += c;
        }
    }
    return token;
}

bool read_ppm(const std::string& path, image& out, std::string& error) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return error = "cannot open " + path, false;
    if (header_token(in) != "P6") return error = path + " is not a binary PPM (P6)", false;
    out.width = std::atol(header_token(in).c_str());
    out.height = std::atol(header_token(in).c_str());
    const long max_value = std::atol(header_token(in).c_str());
    if (out.width <= 0 || out.height <= 0 || max_value != 255)
        return error = path + ": unsupported PPM header", false;
    out.rgb.resize(static_cast<std::size_t>(out.width * out.height * 3));
    in.read(reinterpret_cast<char*>(out.rgb.data()), static_cast<std::streamsize>(out.rgb.size()));
    if (in.gcount() != static_cast<std::streamsize>(out.rgb.size()))
        return error = path + ": fewer pixels than the header says", false;
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::cerr << "usage: picture_check IMAGE.ppm WIDTH HEIGHT [#rrggbb ...]\n";
        return 2;
    }
    image img;
    std::string error;
    if (!read_ppm(argv[1], img, error)) {
        std::cerr << "picture_check: " << error << "\n";
        return 1;
    }
    const long width = std::atol(argv[2]), height = std::atol(argv[3]);
    if (img.width != width || img.height != height) {
        std::cerr << "picture_check: " << argv[1] << " is " << img.width << " × " << img.height
                  << " pixels, the SVG declares " << width << " × " << height << "\n";
        return 1;
    }
    const std::size_t pixels = img.rgb.size() / 3;
    std::size_t drawn = 0;
    std::set<long> colours;
    for (std::size_t p = 0; p < pixels; ++p) {
        const unsigned char* px = &img.rgb[3 * p];
        if (px[0] < 250 || px[1] < 250 || px[2] < 250) ++drawn;
        colours.insert((long{px[0]} << 16) | (long{px[1]} << 8) | px[2]);
    }
    // A rendered picture of text, lines and cells covers a few percent of its area at least and
    // leaves white space; a blank page, an error page or a solid fill fails one of the two.
    const double fraction = static_cast<double>(drawn) / static_cast<double>(pixels);
    if (fraction < 0.02 || fraction > 0.95) {
        std::cerr << "picture_check: " << argv[1] << " has " << fraction * 100
                  << " % drawn pixels (expected between 2 % and 95 %)\n";
        return 1;
    }
    for (int a = 4; a < argc; ++a) {
        unsigned r = 0, g = 0, b = 0;
        if (std::sscanf(argv[a], "#%02x%02x%02x", &r, &g, &b) != 3) {
            std::cerr << "picture_check: " << argv[a] << " is not a colour #rrggbb\n";
            return 2;
        }
        // Within 6 levels per channel: colour management and anti-aliasing move solid fills by
        // a few levels at most; another head's colour differs by far more.
        bool found = false;
        for (std::size_t p = 0; p < pixels && !found; ++p) {
            const unsigned char* px = &img.rgb[3 * p];
            found = std::abs(px[0] - static_cast<int>(r)) <= 6 &&
                    std::abs(px[1] - static_cast<int>(g)) <= 6 &&
                    std::abs(px[2] - static_cast<int>(b)) <= 6;
        }
        if (!found) {
            std::cerr << "picture_check: " << argv[1] << " has no pixel of colour " << argv[a]
                      << "\n";
            return 1;
        }
    }
    std::cout << "picture_check: " << argv[1] << ": " << width << " × " << height << ", "
              << fraction * 100 << " % drawn, " << colours.size() << " colours\n";
    return 0;
}
