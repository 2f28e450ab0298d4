// A Structured Field parser (RFC 8941, "Structured Field Values for HTTP"),
// test-only and independent of the library: the headers ratekeeper writes
// are parsed back with it. It follows the parsing algorithms of RFC 8941
// §4.2 step by step (lists §4.2.1, inner lists §4.2.1.2, dictionaries
// §4.2.2, items §4.2.3, parameters §4.2.3.2, keys §4.2.3.3, integers and
// decimals §4.2.4, strings §4.2.5, tokens §4.2.6, byte sequences §4.2.7,
// booleans §4.2.8), and is itself checked against the published test
// vectors (tests/data/structured-field-tests/).
#ifndef RATEKEEPER_TESTS_SF_PARSER_HPP_
#define RATEKEEPER_TESTS_SF_PARSER_HPP_

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace sf {

struct Token {
  std::string value;
  friend bool operator==(const Token&, const Token&) = default;
};
struct Bytes {
  std::string value;  // decoded
  friend bool operator==(const Bytes&, const Bytes&) = default;
};

// A bare item: Integer, Decimal, String, Token, Byte Sequence or Boolean.
using Bare =
    std::variant<std::int64_t, double, std::string, Token, Bytes, bool>;
using Parameters = std::vector<std::pair<std::string, Bare>>;

struct Item {
  Bare bare;
  Parameters params;

  // The parameter `key`, or nullptr.
  const Bare* param(std::string_view key) const {
    for (const auto& [k, v] : params) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};
struct InnerList {
  std::vector<Item> items;
  Parameters params;
};
using Member = std::variant<Item, InnerList>;
using List = std::vector<Member>;
using Dictionary = std::vector<std::pair<std::string, Member>>;

namespace detail {

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }
inline bool is_lcalpha(char c) { return c >= 'a' && c <= 'z'; }
inline bool is_alpha(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
// tchar (RFC 9110 §5.6.2).
inline bool is_tchar(char c) {
  if (is_alpha(c) || is_digit(c)) return true;
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
      return true;
    default:
      return false;
  }
}

class Parser {
 public:
  explicit Parser(std::string_view in) : in_(in) {}

  // §4.2: the top-level algorithm for a list or an item.
  std::optional<List> top_list() {
    discard_sp();
    std::optional<List> l = list();
    if (!l) return std::nullopt;
    discard_sp();
    if (!empty()) return std::nullopt;
    return l;
  }
  std::optional<Item> top_item() {
    discard_sp();
    std::optional<Item> i = item();
    if (!i) return std::nullopt;
    discard_sp();
    if (!empty()) return std::nullopt;
    return i;
  }
  std::optional<Dictionary> top_dictionary() {
    discard_sp();
    std::optional<Dictionary> d = dictionary();
    if (!d) return std::nullopt;
    discard_sp();
    if (!empty()) return std::nullopt;
    return d;
  }

 private:
  bool empty() const { return pos_ >= in_.size(); }
  char peek() const { return in_[pos_]; }
  void discard_sp() {
    while (!empty() && peek() == ' ') ++pos_;
  }
  void discard_ows() {
    while (!empty() && (peek() == ' ' || peek() == '\t')) ++pos_;
  }

  // §4.2.1
  std::optional<List> list() {
    List members;
    while (!empty()) {
      std::optional<Member> m = item_or_inner_list();
      if (!m) return std::nullopt;
      members.push_back(std::move(*m));
      discard_ows();
      if (empty()) return members;
      if (peek() != ',') return std::nullopt;
      ++pos_;
      discard_ows();
      if (empty()) return std::nullopt;  // a trailing comma
    }
    return members;
  }

  // §4.2.1.1
  std::optional<Member> item_or_inner_list() {
    if (!empty() && peek() == '(') {
      std::optional<InnerList> l = inner_list();
      if (!l) return std::nullopt;
      return Member(std::move(*l));
    }
    std::optional<Item> i = item();
    if (!i) return std::nullopt;
    return Member(std::move(*i));
  }

  // §4.2.1.2
  std::optional<InnerList> inner_list() {
    if (empty() || peek() != '(') return std::nullopt;
    ++pos_;
    InnerList out;
    while (!empty()) {
      discard_sp();
      if (!empty() && peek() == ')') {
        ++pos_;
        std::optional<Parameters> p = parameters();
        if (!p) return std::nullopt;
        out.params = std::move(*p);
        return out;
      }
      std::optional<Item> i = item();
      if (!i) return std::nullopt;
      out.items.push_back(std::move(*i));
      if (empty() || (peek() != ' ' && peek() != ')')) return std::nullopt;
    }
    return std::nullopt;  // no closing parenthesis
  }

  // §4.2.2
  std::optional<Dictionary> dictionary() {
    Dictionary out;
    while (!empty()) {
      std::optional<std::string> k = key();
      if (!k) return std::nullopt;
      Member m;
      if (!empty() && peek() == '=') {
        ++pos_;
        std::optional<Member> v = item_or_inner_list();
        if (!v) return std::nullopt;
        m = std::move(*v);
      } else {
        std::optional<Parameters> p = parameters();
        if (!p) return std::nullopt;
        m = Item{Bare(true), std::move(*p)};
      }
      bool replaced = false;
      for (auto& [name, value] : out) {
        if (name == *k) {
          value = std::move(m);
          replaced = true;
          break;
        }
      }
      if (!replaced) out.emplace_back(std::move(*k), std::move(m));
      discard_ows();
      if (empty()) return out;
      if (peek() != ',') return std::nullopt;
      ++pos_;
      discard_ows();
      if (empty()) return std::nullopt;
    }
    return out;
  }

  // §4.2.3
  std::optional<Item> item() {
    std::optional<Bare> b = bare_item();
    if (!b) return std::nullopt;
    std::optional<Parameters> p = parameters();
    if (!p) return std::nullopt;
    return Item{std::move(*b), std::move(*p)};
  }

  // §4.2.3.1
  std::optional<Bare> bare_item() {
    if (empty()) return std::nullopt;
    const char c = peek();
    if (c == '-' || is_digit(c)) return integer_or_decimal();
    if (c == '"') return string();
    if (c == '*' || is_alpha(c)) return token();
    if (c == ':') return byte_sequence();
    if (c == '?') return boolean();
    return std::nullopt;
  }

  // §4.2.3.2: a later parameter of the same name overwrites the earlier
  // one's value, in the earlier one's place.
  std::optional<Parameters> parameters() {
    Parameters out;
    while (!empty()) {
      if (peek() != ';') break;
      ++pos_;
      discard_sp();
      std::optional<std::string> k = key();
      if (!k) return std::nullopt;
      Bare value = true;
      if (!empty() && peek() == '=') {
        ++pos_;
        std::optional<Bare> v = bare_item();
        if (!v) return std::nullopt;
        value = std::move(*v);
      }
      bool replaced = false;
      for (auto& [name, v] : out) {
        if (name == *k) {
          v = value;
          replaced = true;
          break;
        }
      }
      if (!replaced) out.emplace_back(std::move(*k), std::move(value));
    }
    return out;
  }

  // §4.2.3.3
  std::optional<std::string> key() {
    if (empty() || (!is_lcalpha(peek()) && peek() != '*')) return std::nullopt;
    std::string out;
    while (!empty()) {
      const char c = peek();
      if (!is_lcalpha(c) && !is_digit(c) && c != '_' && c != '-' && c != '.' &&
          c != '*') {
        break;
      }
      out.push_back(c);
      ++pos_;
    }
    return out;
  }

  // §4.2.4
  std::optional<Bare> integer_or_decimal() {
    bool is_decimal = false;
    bool negative = false;
    std::string num;
    if (peek() == '-') {
      ++pos_;
      negative = true;
    }
    if (empty() || !is_digit(peek())) return std::nullopt;
    while (!empty()) {
      const char c = peek();
      if (is_digit(c)) {
        num.push_back(c);
        ++pos_;
      } else if (!is_decimal && c == '.') {
        if (num.size() > 12) return std::nullopt;
        num.push_back(c);
        ++pos_;
        is_decimal = true;
      } else {
        break;
      }
      if (!is_decimal && num.size() > 15) return std::nullopt;
      if (is_decimal && num.size() > 16) return std::nullopt;
    }
    if (!is_decimal) {
      std::int64_t v = 0;
      for (const char c : num) v = v * 10 + (c - '0');
      return Bare(negative ? -v : v);
    }
    if (num.back() == '.') return std::nullopt;
    if (num.size() - num.find('.') - 1 > 3) return std::nullopt;
    const double v = std::strtod(num.c_str(), nullptr);
    return Bare(negative ? -v : v);
  }

  // §4.2.5
  std::optional<Bare> string() {
    if (empty() || peek() != '"') return std::nullopt;
    ++pos_;
    std::string out;
    while (!empty()) {
      const char c = peek();
      ++pos_;
      if (c == '\\') {
        if (empty()) return std::nullopt;
        const char n = peek();
        ++pos_;
        if (n != '"' && n != '\\') return std::nullopt;
        out.push_back(n);
      } else if (c == '"') {
        return Bare(std::move(out));
      } else if (static_cast<unsigned char>(c) < 0x20 ||
                 static_cast<unsigned char>(c) > 0x7E) {
        return std::nullopt;
      } else {
        out.push_back(c);
      }
    }
    return std::nullopt;  // no closing quote
  }

  // §4.2.6
  std::optional<Bare> token() {
    if (empty() || (!is_alpha(peek()) && peek() != '*')) return std::nullopt;
    std::string out;
    while (!empty()) {
      const char c = peek();
      if (!is_tchar(c) && c != ':' && c != '/') break;
      out.push_back(c);
      ++pos_;
    }
    return Bare(Token{std::move(out)});
  }

  // §4.2.7: base64 (RFC 4648 §4); padding is lenient, as the RFC allows.
  std::optional<Bare> byte_sequence() {
    if (empty() || peek() != ':') return std::nullopt;
    ++pos_;
    std::string b64;
    while (true) {
      if (empty()) return std::nullopt;  // no closing colon
      const char c = peek();
      ++pos_;
      if (c == ':') break;
      if (!is_alpha(c) && !is_digit(c) && c != '+' && c != '/' && c != '=') {
        return std::nullopt;
      }
      b64.push_back(c);
    }
    std::string out;
    std::uint32_t acc = 0;
    int bits = 0;
    bool padding = false;
    for (const char c : b64) {
      if (c == '=') {
        padding = true;
        continue;
      }
      if (padding) return std::nullopt;  // data after padding
      int v = 0;
      if (c >= 'A' && c <= 'Z') {
        v = c - 'A';
      } else if (c >= 'a' && c <= 'z') {
        v = c - 'a' + 26;
      } else if (is_digit(c)) {
        v = c - '0' + 52;
      } else if (c == '+') {
        v = 62;
      } else {
        v = 63;
      }
      acc = (acc << 6) | static_cast<std::uint32_t>(v);
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        out.push_back(static_cast<char>((acc >> bits) & 0xFF));
      }
    }
    return Bare(Bytes{std::move(out)});
  }

  // §4.2.8
  std::optional<Bare> boolean() {
    if (empty() || peek() != '?') return std::nullopt;
    ++pos_;
    if (empty()) return std::nullopt;
    const char c = peek();
    ++pos_;
    if (c == '1') return Bare(true);
    if (c == '0') return Bare(false);
    return std::nullopt;
  }

  std::string_view in_;
  std::size_t pos_ = 0;
};

// Field lines combined as HTTP does (RFC 9110 §5.3): joined with ", ".
inline std::string combine(const std::vector<std::string>& lines) {
  std::string out;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    if (i != 0) out += ", ";
    out += lines[i];
  }
  return out;
}

}  // namespace detail

inline std::optional<List> parse_list(std::string_view field) {
  return detail::Parser(field).top_list();
}
inline std::optional<Item> parse_item(std::string_view field) {
  return detail::Parser(field).top_item();
}
inline std::optional<Dictionary> parse_dictionary(std::string_view field) {
  return detail::Parser(field).top_dictionary();
}

}  // namespace sf

#endif  // RATEKEEPER_TESTS_SF_PARSER_HPP_
