// SPDX-License-Identifier: MIT
// The SVG pictures of mha/plot.hpp read back as a user's browser would read them: a small XML
// parser written here (elements, attributes, text, the five entities; what the pictures use)
// checks that every document is well-formed, then the tests count what must be there — one
// cell per weight and head, one line per weight above the threshold, every token as a label —
// and read back the colours and widths, computed independently from the weights.
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/plot.hpp>

#include "reference.hpp"

using Catch::Matchers::ContainsSubstring;
using mha::Index;

namespace {

struct element {
    std::string name;
    std::map<std::string, std::string> attributes;
    std::string text;  // character data directly inside, entities resolved
    std::vector<std::unique_ptr<element>> children;

    const std::string& attribute(const std::string& key) const {
        const auto it = attributes.find(key);
        if (it == attributes.end()) throw std::runtime_error("<" + name + "> has no " + key);
        return it->second;
    }
};

// A strict parser for the subset of XML the pictures use: it throws on anything else (an
// unescaped '<' or '&', an unquoted or repeated attribute, a mismatched or missing end tag,
// text after the root), which is what "well-formed" means for these documents.
class xml_parser {
public:
    explicit xml_parser(const std::string& text) : s_(text) {}

    std::unique_ptr<element> document() {
        skip_space();
        auto root = parse_element();
        skip_space();
        if (pos_ != s_.size()) error("content after the root element");
        return root;
    }

private:
    [[noreturn]] void error(const std::string& what) const {
        throw std::runtime_error("XML error at byte " + std::to_string(pos_) + ": " + what);
    }
    void skip_space() {
        while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_])))
            ++pos_;
    }
    void expect(char c) {
        if (pos_ >= s_.size() || s_[pos_] != c) error(std::string("expected '") + c + "'");
        ++pos_;
    }
    std::string name() {
        const std::size_t start = pos_;
        while (pos_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[pos_])) ||
                                    s_[pos_] == '-' || s_[pos_] == ':' || s_[pos_] == '_'))
            ++pos_;
        if (pos_ == start) error("expected a name");
        return s_.substr(start, pos_ - start);
    }
    // Character data up to `stop`, with the five predefined entities resolved.
    std::string characters(char stop) {
        std::string out;
        while (pos_ < s_.size() && s_[pos_] != stop) {
            const char c = s_[pos_];
            if (c == '<') error("unescaped '<' in character data");
            if (c == '&') {
                const std::size_t end = s_.find(';', pos_);
                if (end == std::string::npos) error("unterminated entity");
                const std::string entity = s_.substr(pos_ + 1, end - pos_ - 1);
                static const std::map<std::string, char> known = {
                    {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
                const auto it = known.find(entity);
                if (it == known.end()) error("unknown entity &" + entity + ";");
                out += it->second;
                pos_ = end + 1;
            } else {
                if (static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != '\t' && c != '\r')
                    error("control character");
                out += c;
                ++pos_;
            }
        }
        return out;
    }
    std::unique_ptr<element> parse_element() {
        expect('<');
        auto e = std::make_unique<element>();
        e->name = name();
        for (;;) {
            skip_space();
            if (pos_ >= s_.size()) error("unterminated start tag");
            if (s_[pos_] == '/') {
                ++pos_;
                expect('>');
                return e;
            }
            if (s_[pos_] == '>') {
                ++pos_;
                break;
            }
            const std::string key = name();
            expect('=');
            expect('"');
            std::string value = characters('"');
            expect('"');
            if (!e->attributes.emplace(key, value).second) error("repeated attribute " + key);
        }
        for (;;) {
            e->text += characters('<');
            if (pos_ + 1 >= s_.size()) error("missing end tag of <" + e->name + ">");
            if (s_[pos_ + 1] == '/') {
                pos_ += 2;
                if (name() != e->name) error("end tag does not match <" + e->name + ">");
                skip_space();
                expect('>');
                return e;
            }
            e->children.push_back(parse_element());
        }
    }

    const std::string& s_;
    std::size_t pos_ = 0;
};

// Every element below `e` (e included) named `tag` whose class is `cls` (any class when empty).
void collect(const element& e, const std::string& tag, const std::string& cls,
             std::vector<const element*>& out) {
    const auto it = e.attributes.find("class");
    if (e.name == tag && (cls.empty() || (it != e.attributes.end() && it->second == cls)))
        out.push_back(&e);
    for (const auto& child : e.children)
        collect(*child, tag, cls, out);
}

std::vector<const element*> find(const element& root, const std::string& tag,
                                 const std::string& cls = "") {
    std::vector<const element*> out;
    collect(root, tag, cls, out);
    return out;
}

double as_number(const std::string& text) {
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (end == text.c_str() || *end != '\0') throw std::runtime_error("not a number: " + text);
    return v;
}

// H random weight matrices Lk × Lq whose columns are distributions, as softmax makes them.
std::vector<mha::matrix<float>> softmax_like(Index heads, Index lk, Index lq, std::uint64_t seed) {
    mha_test::value_source values(seed);
    std::vector<mha::matrix<float>> w;
    for (Index h = 0; h < heads; ++h) {
        mha::matrix<float> m = values.normal_matrix<float>(lk, lq, 1.5).array().exp().matrix();
        for (Index i = 0; i < lq; ++i)
            m.col(i) /= m.col(i).sum();
        w.push_back(m);
    }
    return w;
}

std::vector<std::string> words(Index n) {
    std::vector<std::string> out;
    for (Index i = 0; i < n; ++i)
        out.push_back("w" + std::to_string(i));
    return out;
}

}  // namespace

TEST_CASE("heat maps: one cell per weight and head, every token labelled, colours from weights",
          "[plot]") {
    const Index heads = 3, lq = 5, lk = 7;
    const auto w = softmax_like(heads, lk, lq, 11);
    const auto queries = words(lq);
    std::vector<std::string> keys = words(lk);
    keys[2] = "key two";
    mha::plot::options opts;
    opts.title = "a title";
    const std::string svg = mha::plot::heat_maps(w, queries, keys, opts);
    const auto root = xml_parser(svg).document();
    REQUIRE(root->name == "svg");
    REQUIRE(root->attribute("xmlns") == "http://www.w3.org/2000/svg");

    const auto cells = find(*root, "rect", "cell");
    REQUIRE(cells.size() == static_cast<std::size_t>(heads * lq * lk));
    REQUIRE(find(*root, "text", "key").size() == static_cast<std::size_t>(heads * lk));
    REQUIRE(find(*root, "text", "query").size() == static_cast<std::size_t>(heads * lq));
    REQUIRE(find(*root, "text", "title").at(0)->text == "a title");
    const auto head_titles = find(*root, "text", "head");
    REQUIRE(head_titles.size() == static_cast<std::size_t>(heads));
    REQUIRE(head_titles[1]->text == "head 1");
    REQUIRE(find(*root, "text", "key").at(2)->text == "key two");

    // Cells are written query by query, key by key within a panel: cell (h, i, j) is the
    // (h·Lq + i)·Lk + j-th. Its fill is rgb(255 + t·(c − 255)) per channel with t = w(j, i) for
    // softmax weights (full_weight 1), c the head's colour: read the colour from a full-weight
    // cell of the legend bar instead of trusting the header's table.
    for (Index h = 0; h < heads; ++h) {
        const auto panel = find(*root, "g", "panel").at(static_cast<std::size_t>(h));
        const std::string colour = find(*panel, "stop").at(1)->attribute("stop-color");
        REQUIRE(colour.size() == 7);
        for (Index i = 0; i < lq; ++i)
            for (Index j = 0; j < lk; ++j) {
                const element* cell = cells.at(static_cast<std::size_t>((h * lq + i) * lk + j));
                const std::string fill = cell->attribute("fill");
                int rgb[3];
                REQUIRE(std::sscanf(fill.c_str(), "rgb(%d,%d,%d)", &rgb[0], &rgb[1], &rgb[2]) == 3);
                for (int c = 0; c < 3; ++c) {
                    const double full = std::stoi(colour.substr(1 + 2 * c, 2), nullptr, 16);
                    const double expected = 255.0 + w[h](j, i) * (full - 255.0);
                    // Channels are rounded to integers: within 0.5 of the exact blend.
                    REQUIRE(std::abs(rgb[c] - expected) <= 0.5 + 1e-9);
                }
            }
    }
    // Rows are queries and columns keys: a cell further right is a later key.
    REQUIRE(as_number(cells[1]->attribute("x")) > as_number(cells[0]->attribute("x")));
    REQUIRE(as_number(cells[static_cast<std::size_t>(lk)]->attribute("y")) >
            as_number(cells[0]->attribute("y")));
}

TEST_CASE("word lines: one line per weight at or above the threshold, width proportional",
          "[plot]") {
    const Index heads = 2, l = 9;
    const auto w = softmax_like(heads, l, l, 12);
    mha::plot::options opts;
    opts.min_weight = 0.1;
    opts.max_line_width = 10;
    const std::string svg = mha::plot::word_lines(w, words(l), opts);
    const auto root = xml_parser(svg).document();

    // Counted from the weights, not from the picture.
    std::size_t expected_lines = 0;
    for (const auto& m : w)
        expected_lines += static_cast<std::size_t>((m.array() >= 0.1f).count());
    REQUIRE(expected_lines > 0);
    REQUIRE(expected_lines < static_cast<std::size_t>(heads * l * l));  // the threshold matters
    const auto lines = find(*root, "line", "weight");
    REQUIRE(lines.size() == expected_lines);
    REQUIRE(find(*root, "g", "legend").size() == static_cast<std::size_t>(heads));
    REQUIRE(find(*root, "text", "query").size() == static_cast<std::size_t>(l));
    REQUIRE(find(*root, "text", "key").size() == static_cast<std::size_t>(l));

    const auto groups = find(*root, "g", "head");
    REQUIRE(groups.size() == static_cast<std::size_t>(heads));
    for (std::size_t h = 0; h < groups.size(); ++h)
        for (const element* line : find(*groups[h], "line", "weight")) {
            const auto i = static_cast<Index>(as_number(line->attribute("data-query")));
            const auto j = static_cast<Index>(as_number(line->attribute("data-key")));
            const double weight = w[h](j, i);
            REQUIRE(weight >= 0.1);
            // Written with two decimals: within 0.005 of max_line_width · weight.
            REQUIRE(std::abs(as_number(line->attribute("stroke-width")) - 10 * weight) <= 0.005);
            // The line starts at query i's row and ends at key j's row (rows top to bottom).
            const double y1 = as_number(line->attribute("y1"));
            const double y2 = as_number(line->attribute("y2"));
            REQUIRE((i < j) == (y1 < y2));
        }
}

TEST_CASE("word lines: a weight exactly at the threshold is drawn, one just below is not",
          "[plot]") {
    // options::min_weight: weights *below* it are not drawn. 0.25 and the float below it are
    // exact, so the comparison is on the stored values, not on rounding.
    const float at = 0.25f, below = std::nextafter(0.25f, 0.0f);
    std::vector<mha::matrix<float>> w = {mha::matrix<float>::Zero(3, 2)};
    w[0](0, 0) = at;
    w[0](1, 0) = below;
    w[0](2, 1) = 1.0f;
    mha::plot::options opts;
    opts.min_weight = 0.25;
    const auto root = xml_parser(mha::plot::word_lines(w, words(2), words(3), opts)).document();
    const auto lines = find(*root, "line", "weight");
    REQUIRE(lines.size() == 2);
    REQUIRE(lines[0]->attribute("data-query") == "0");
    REQUIRE(lines[0]->attribute("data-key") == "0");
    REQUIRE(lines[1]->attribute("data-query") == "1");
    REQUIRE(lines[1]->attribute("data-key") == "2");
}

TEST_CASE("labels: 18 characters are shown whole, longer tokens cut to 18 and an ellipsis",
          "[plot]") {
    // docs/pictures.md: tokens longer than 18 characters are cut with "…". Characters, not
    // bytes: "é" is two bytes in UTF-8.
    const std::string ellipsis = "\xE2\x80\xA6";
    std::string e18, e19;
    for (int i = 0; i < 18; ++i)
        e18 += "\xC3\xA9";
    e19 = e18 + "\xC3\xA9";
    const std::vector<std::string> tokens = {std::string(17, 'a'),
                                             std::string(18, 'b'),
                                             std::string(19, 'c'),
                                             std::string(40, 'd'),
                                             e18,
                                             e19};
    const std::vector<std::string> shown = {std::string(17, 'a'),
                                            std::string(18, 'b'),
                                            std::string(18, 'c') + ellipsis,
                                            std::string(18, 'd') + ellipsis,
                                            e18,
                                            e18 + ellipsis};
    const auto w = softmax_like(1, 6, 6, 17);
    for (const std::string& svg :
         {mha::plot::heat_maps(w, tokens), mha::plot::word_lines(w, tokens)}) {
        const auto root = xml_parser(svg).document();
        for (const char* cls : {"query", "key"}) {
            const auto labels = find(*root, "text", cls);
            REQUIRE(labels.size() == tokens.size());
            for (std::size_t j = 0; j < tokens.size(); ++j) {
                CAPTURE(cls, j);
                REQUIRE(labels[j]->text == shown[j]);
            }
        }
    }
}

TEST_CASE("tokens with XML's special characters stay text", "[plot]") {
    const std::vector<std::string> tokens = {"<b>", "a&b", "\"q\"", "it's", "x > y"};
    const auto w = softmax_like(1, 5, 5, 13);
    for (const std::string& svg :
         {mha::plot::heat_maps(w, tokens), mha::plot::word_lines(w, tokens)}) {
        const auto root = xml_parser(svg).document();
        const auto keys = find(*root, "text", "key");
        REQUIRE(keys.size() == tokens.size());
        for (std::size_t j = 0; j < tokens.size(); ++j)
            REQUIRE(keys[j]->text == tokens[j]);
    }
    mha::plot::options named;
    named.head_names = {"<head & co>"};
    named.title = "</svg>";
    const auto root = xml_parser(mha::plot::word_lines(w, tokens, named)).document();
    REQUIRE(find(*root, "text", "title").at(0)->text == "</svg>");
}

TEST_CASE("pictures scale from 5 to 64 tokens and stay readable", "[plot]") {
    for (const Index l : {5, 16, 64}) {
        CAPTURE(l);
        const auto w = softmax_like(4, l, l, 14);
        const auto heat = xml_parser(mha::plot::heat_maps(w, words(l))).document();
        const auto cells = find(*heat, "rect", "cell");
        REQUIRE(cells.size() == static_cast<std::size_t>(4 * l * l));
        // Cells at least 9 px (a weight's colour is seen), labels at least 8 px.
        REQUIRE(as_number(cells[0]->attribute("width")) >= 9);
        for (const element* t : find(*heat, "text", "query"))
            REQUIRE(as_number(t->attribute("font-size")) >= 8);
        // Four panels of 64 tokens fit a wide screen: under 3000 × 1000 px.
        REQUIRE(as_number(heat->attribute("width")) <= 3000);
        REQUIRE(as_number(heat->attribute("height")) <= 1000);
        const auto lines = xml_parser(mha::plot::word_lines(w, words(l))).document();
        REQUIRE(as_number(lines->attribute("height")) <= 2200);
        const auto keys = find(*lines, "text", "key");
        for (const element* t : keys)
            REQUIRE(as_number(t->attribute("font-size")) >= 8);
        // Lines of neighbouring words stay apart: none wider than half the distance between two
        // words' rows.
        const double row =
            as_number(keys.at(1)->attribute("y")) - as_number(keys.at(0)->attribute("y"));
        for (const element* line : find(*lines, "line", "weight"))
            REQUIRE(as_number(line->attribute("stroke-width")) <= row / 2 + 0.01);
    }
}

TEST_CASE("NaN weights are drawn apart, weights above 1 raise the scale", "[plot]") {
    auto w = softmax_like(1, 4, 4, 15);
    w[0](1, 2) = std::numeric_limits<float>::quiet_NaN();
    const auto heat = xml_parser(mha::plot::heat_maps(w, words(4))).document();
    const auto cells = find(*heat, "rect", "cell");
    REQUIRE(cells.at(2 * 4 + 1)->attribute("fill") == "url(#nan)");
    mha::plot::options all;
    all.min_weight = 0;
    const auto lines = xml_parser(mha::plot::word_lines(w, words(4), all)).document();
    REQUIRE(find(*lines, "line", "weight").size() == 15);  // 16 weights, one NaN

    // ReLU-normalised weights may exceed 1: the scale becomes the largest weight, shown on the bar.
    std::vector<mha::matrix<float>> relu = {mha::matrix<float>::Constant(3, 3, 0.5f)};
    relu[0](0, 0) = 2.5f;
    const auto scaled = xml_parser(mha::plot::heat_maps(relu, words(3))).document();
    REQUIRE(find(*scaled, "text", "tick").at(1)->text == "2.50");
    // The largest weight gets the head's full colour (the bar's end), not a clipped one.
    const std::string colour = find(*scaled, "stop").at(1)->attribute("stop-color");
    std::string full = "rgb(";
    for (int c = 0; c < 3; ++c)
        full += (c > 0 ? "," : "") +
                std::to_string(std::stoi(colour.substr(1 + 2 * c, 2), nullptr, 16));
    full += ")";
    REQUIRE(find(*scaled, "rect", "cell").at(0)->attribute("fill") == full);
}

TEST_CASE("bad arguments name the argument, the expected and the actual value", "[plot]") {
    const auto w = softmax_like(2, 4, 3, 16);
    REQUIRE_THROWS_AS(mha::plot::heat_maps(w, words(3), words(5)), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::plot::heat_maps(w, words(3), words(5)),
                        ContainsSubstring("mha::plot::heat_maps: weights[0].rows() must be 5 (the "
                                          "number of key tokens), got 4"));
    REQUIRE_THROWS_AS(mha::plot::word_lines(w, words(4)), mha::shape_error);
    REQUIRE_THROWS_WITH(
        mha::plot::word_lines(w, words(4)),
        ContainsSubstring("weights[0].cols() must be 4 (the number of query tokens), got 3"));
    REQUIRE_THROWS_AS(mha::plot::heat_maps(std::vector<mha::matrix<float>>{}, words(3)),
                      mha::shape_error);
    mha::plot::options opts;
    opts.head_names = {"one"};
    REQUIRE_THROWS_AS(mha::plot::heat_maps(w, words(3), words(4), opts), mha::shape_error);
    REQUIRE_THROWS_WITH(
        mha::plot::heat_maps(w, words(3), words(4), opts),
        ContainsSubstring("options.head_names.size() must be 2 (one name per head) or 0, got 1"));
    opts = {};
    opts.min_weight = 2;
    REQUIRE_THROWS_AS(mha::plot::word_lines(w, words(3), words(4), opts), mha::value_error);
    REQUIRE_THROWS_WITH(
        mha::plot::word_lines(w, words(3), words(4), opts),
        ContainsSubstring("options.min_weight must be in [0, options.full_weight = 1], got 2"));
    opts = {};
    opts.full_weight = 0;
    REQUIRE_THROWS_AS(mha::plot::heat_maps(w, words(3), words(4), opts), mha::value_error);
    REQUIRE_THROWS_AS(mha::plot::save("/nonexistent-folder/x.svg", "<svg/>"), std::runtime_error);
}
