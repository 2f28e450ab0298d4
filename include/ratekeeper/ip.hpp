// ratekeeper/ip.hpp: client addresses as limit keys, and who to believe.
//
// Defines:
//   IpAddress       an IPv4 or IPv6 address; IPv4 is held as IPv4-mapped
//                   IPv6, so "::ffff:1.2.3.4" and "1.2.3.4" are one address.
//   IpKeyOptions    how addresses group into keys: IPv4 exact (/32) and IPv6
//                   by /64 (one customer's network) by default; an IPv6
//                   address that embeds one IPv4 client's address (NAT64,
//                   6to4, Teredo) by that IPv4 address.
//   embedded_ipv4   the IPv4 address such an IPv6 address stands for.
//   ip_key          the key text of an address under those options.
//   Cidr            an address range, "10.0.0.0/8" or "2001:db8::/32".
//   TrustedProxies  the proxies whose forwarding headers are believed, and
//                   the client address read from X-Forwarded-For or
//                   Forwarded (RFC 7239): the right-most hop that is not a
//                   trusted proxy.
//
//   auto proxies = ratekeeper::TrustedProxies::create({"10.0.0.0/8"}).value();
//   absl::StatusOr<IpAddress> client =
//       proxies.client_from_x_forwarded_for(peer, {xff_header});
//   if (!client.ok()) return reply_400(client.status().message());
//   std::string key = ratekeeper::ip_key(*client);
//
// Anything that is not an address is an error (absl::Status), never a shared
// "unknown" key that one client could exhaust for everyone.
#ifndef RATEKEEPER_IP_HPP_
#define RATEKEEPER_IP_HPP_

#include <arpa/inet.h>
#include <netinet/in.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

// IpAddress: 16 bytes in network order; IPv4 as ::ffff:a.b.c.d.
class IpAddress {
 public:
  // The unspecified IPv6 address "::".
  constexpr IpAddress() = default;

  static IpAddress from_bytes(const std::array<std::uint8_t, 16>& b) {
    IpAddress a;
    a.bytes_ = b;
    return a;
  }
  static IpAddress from_v4(std::uint32_t host_order) {
    IpAddress a;
    a.bytes_[10] = 0xFF;
    a.bytes_[11] = 0xFF;
    for (int i = 0; i < 4; ++i) {
      a.bytes_[static_cast<std::size_t>(15 - i)] =
          static_cast<std::uint8_t>(host_order >> (8 * i));
    }
    return a;
  }

  // parse
  //
  // A literal address: dotted-quad IPv4 (four decimal parts, no leading
  // zeros, which some parsers read as octal) or RFC 4291 IPv6 text,
  // IPv4-embedded forms included. No brackets, port, zone ("%eth0") or
  // surrounding space: kInvalidArgument, quoting the input.
  static absl::StatusOr<IpAddress> parse(std::string_view text) {
    char buf[64];
    if (text.empty() || text.size() >= sizeof(buf) ||
        text.find('\0') != std::string_view::npos) {
      return bad(text);
    }
    std::memcpy(buf, text.data(), text.size());
    buf[text.size()] = '\0';
    IpAddress a;
    if (text.find(':') == std::string_view::npos) {
      in_addr v4{};
      if (inet_pton(AF_INET, buf, &v4) != 1) return bad(text);
      a.bytes_[10] = 0xFF;
      a.bytes_[11] = 0xFF;
      std::memcpy(&a.bytes_[12], &v4, 4);
      return a;
    }
    in6_addr v6{};
    if (inet_pton(AF_INET6, buf, &v6) != 1) return bad(text);
    std::memcpy(a.bytes_.data(), &v6, 16);
    return a;
  }

  // IPv4, or IPv4-mapped IPv6 (the same thing here).
  bool is_v4() const noexcept {
    for (std::size_t i = 0; i < 10; ++i) {
      if (bytes_[i] != 0) return false;
    }
    return bytes_[10] == 0xFF && bytes_[11] == 0xFF;
  }

  const std::array<std::uint8_t, 16>& bytes() const noexcept { return bytes_; }

  // The address with all but its first `bits` (of 128) cleared.
  IpAddress masked(int bits) const noexcept {
    IpAddress out = *this;
    for (std::size_t i = 0; i < 16; ++i) {
      const int keep = bits - static_cast<int>(i) * 8;
      if (keep >= 8) continue;
      out.bytes_[i] = static_cast<std::uint8_t>(
          keep <= 0 ? 0 : out.bytes_[i] & (0xFF << (8 - keep)));
    }
    return out;
  }

  // "1.2.3.4" for IPv4, RFC 5952 text ("2001:db8::1") for IPv6.
  std::string to_string() const {
    char buf[INET6_ADDRSTRLEN];
    const char* r = is_v4()
                        ? inet_ntop(AF_INET, &bytes_[12], buf, sizeof(buf))
                        : inet_ntop(AF_INET6, bytes_.data(), buf, sizeof(buf));
    return r == nullptr ? std::string() : std::string(r);
  }

  friend bool operator==(const IpAddress&, const IpAddress&) = default;

 private:
  static absl::Status bad(std::string_view text) {
    return absl::InvalidArgumentError(
        absl::StrCat("not an IP address: \"",
                     absl::CHexEscape(detail::av(text.substr(0, 80))), "\""));
  }

  std::array<std::uint8_t, 16> bytes_{};
};

// IpKeyOptions: the prefix that groups addresses into one key. IPv6 hands a
// customer a /64 (or more): keyed exactly, one client could rotate through
// 2^64 addresses, each with a fresh limit.
//
//   embedded_ipv4       an IPv6 address that stands for one IPv4 client (see
//                       embedded_ipv4()) is keyed as that IPv4 address, not
//                       by its /64, which every such client shares (a
//                       NAT64's 64:ff9b::/96 holds the whole IPv4 Internet).
//   local_nat64_prefix  the RFC 6052 prefix length your translators use
//                       inside the local-use prefix 64:ff9b:1::/48 (RFC
//                       8215 leaves it to the operator): 48, 56, 64 or 96.
struct IpKeyOptions {
  int ipv4_prefix = 32;  // 0..32
  int ipv6_prefix = 64;  // 0..128
  bool embedded_ipv4 = true;
  int local_nat64_prefix = 96;

  absl::Status validate() const {
    if (ipv4_prefix < 0 || ipv4_prefix > 32 || ipv6_prefix < 0 ||
        ipv6_prefix > 128) {
      return absl::InvalidArgumentError(absl::StrCat(
          "IpKeyOptions: prefixes must be within 0..32 (IPv4) and 0..128 "
          "(IPv6), got ",
          ipv4_prefix, " and ", ipv6_prefix));
    }
    if (local_nat64_prefix != 48 && local_nat64_prefix != 56 &&
        local_nat64_prefix != 64 && local_nat64_prefix != 96) {
      return absl::InvalidArgumentError(absl::StrCat(
          "IpKeyOptions: local_nat64_prefix must be 48, 56, 64 or 96 (RFC "
          "6052 lengths within 64:ff9b:1::/48), got ",
          local_nat64_prefix));
    }
    return absl::OkStatus();
  }
};

namespace detail {

// The IPv4 address held by an RFC 6052 IPv4-embedded IPv6 address whose
// prefix is `prefix_bits` long (32, 40, 48, 56, 64 or 96): its four octets
// follow the prefix, skipping bits 64..71 (the "u" octet).
inline std::uint32_t rfc6052_ipv4(const std::array<std::uint8_t, 16>& b,
                                  int prefix_bits) noexcept {
  std::uint32_t v4 = 0;
  std::size_t at = static_cast<std::size_t>(prefix_bits / 8);
  for (int k = 0; k < 4; ++k, ++at) {
    if (at == 8) ++at;
    v4 = (v4 << 8) | b[at];
  }
  return v4;
}

inline std::uint32_t low32(const std::array<std::uint8_t, 16>& b) noexcept {
  return static_cast<std::uint32_t>(b[12]) << 24 |
         static_cast<std::uint32_t>(b[13]) << 16 |
         static_cast<std::uint32_t>(b[14]) << 8 | b[15];
}

}  // namespace detail

// embedded_ipv4
//
// The IPv4 address of the client an IPv6 address stands for, or nullopt
// when it stands for none:
//   ::ffff:a.b.c.d    IPv4-mapped (RFC 4291 §2.5.5.2): the address itself
//   64:ff9b::/96      NAT64's well-known prefix (RFC 6052 §2.1): the last
//                     32 bits
//   64:ff9b:1::/48    the local-use translation prefix (RFC 8215), with the
//                     RFC 6052 §2.2 layout of `o.local_nat64_prefix`
//   ::a.b.c.d         IPv4-compatible (RFC 4291 §2.5.5.1, deprecated),
//                     except :: and ::1
//   2002::/16         6to4 (RFC 3056 §2): 2002:V4ADDR::/48, bits 16..47
//   2001::/32         Teredo (RFC 4380 §4): the client's public IPv4 is the
//                     last 32 bits, each inverted (XOR 0xffffffff)
// Each of these is reachable only through that IPv4 address (the reply
// goes back through it), so the IPv4 is the client's identity.
inline std::optional<IpAddress> embedded_ipv4(const IpAddress& a,
                                              const IpKeyOptions& o = {}) {
  const std::array<std::uint8_t, 16>& b = a.bytes();
  if (a.is_v4()) return a;
  auto zero = [&b](std::size_t from, std::size_t to) {
    for (std::size_t i = from; i < to; ++i) {
      if (b[i] != 0) return false;
    }
    return true;
  };
  if (b[0] == 0x00 && b[1] == 0x64 && b[2] == 0xff && b[3] == 0x9b) {
    if (zero(4, 12)) return IpAddress::from_v4(detail::low32(b));
    if (b[4] == 0x00 && b[5] == 0x01) {
      const int p = o.local_nat64_prefix;
      if (p != 48 && p != 56 && p != 64 && p != 96) return std::nullopt;
      return IpAddress::from_v4(detail::rfc6052_ipv4(b, p));
    }
    return std::nullopt;
  }
  if (zero(0, 12)) {
    const std::uint32_t v4 = detail::low32(b);
    if (v4 <= 1) return std::nullopt;  // :: and ::1
    return IpAddress::from_v4(v4);
  }
  if (b[0] == 0x20 && b[1] == 0x02) {
    return IpAddress::from_v4(static_cast<std::uint32_t>(b[2]) << 24 |
                              static_cast<std::uint32_t>(b[3]) << 16 |
                              static_cast<std::uint32_t>(b[4]) << 8 | b[5]);
  }
  if (b[0] == 0x20 && b[1] == 0x01 && b[2] == 0x00 && b[3] == 0x00) {
    return IpAddress::from_v4(detail::low32(b) ^ 0xFFFF'FFFFu);
  }
  return std::nullopt;
}

// ip_key
//
// The key of an address's group: "1.2.3.4" (IPv4 at /32), "1.2.3.0/24",
// "2001:db8:1:2::/64". An IPv6 address that stands for one IPv4 client
// (embedded_ipv4(): NAT64, 6to4, Teredo, IPv4-compatible) is keyed as that
// IPv4 address, unless `o.embedded_ipv4` is false. Prefixes are clamped to
// their valid range.
inline std::string ip_key(const IpAddress& a, const IpKeyOptions& o = {}) {
  std::optional<IpAddress> v4;
  if (a.is_v4()) {
    v4 = a;
  } else if (o.embedded_ipv4) {
    v4 = embedded_ipv4(a, o);
  }
  if (v4) {
    const int p = o.ipv4_prefix < 0    ? 0
                  : o.ipv4_prefix > 32 ? 32
                                       : o.ipv4_prefix;
    std::string s = v4->masked(96 + p).to_string();
    if (p != 32) absl::StrAppend(&s, "/", p);
    return s;
  }
  const int p = o.ipv6_prefix < 0     ? 0
                : o.ipv6_prefix > 128 ? 128
                                      : o.ipv6_prefix;
  std::string s = a.masked(p).to_string();
  if (p != 128) absl::StrAppend(&s, "/", p);
  return s;
}

// Cidr: an address and a prefix length (of 128; an IPv4 prefix is held as
// 96 + its length).
class Cidr {
 public:
  // parse
  //
  // "10.0.0.0/8", "2001:db8::/32", or a bare address (all its bits). Bits
  // set past the prefix are an error ("10.0.0.1/8" is likely a typo).
  static absl::StatusOr<Cidr> parse(std::string_view text) {
    const std::size_t slash = text.find('/');
    absl::StatusOr<IpAddress> a = IpAddress::parse(text.substr(0, slash));
    if (!a.ok()) return a.status();
    const int max = a->is_v4() ? 32 : 128;
    int bits = max;
    if (slash != std::string_view::npos) {
      const std::string_view p = text.substr(slash + 1);
      if (p.empty() || p.size() > 3) return bad(text);
      bits = 0;
      for (const char c : p) {
        if (c < '0' || c > '9') return bad(text);
        bits = bits * 10 + (c - '0');
      }
      if (bits > max || (p.size() > 1 && p[0] == '0')) return bad(text);
    }
    Cidr c;
    c.bits_ = a->is_v4() ? 96 + bits : bits;
    c.base_ = a->masked(c.bits_);
    if (!(c.base_ == *a)) {
      return absl::InvalidArgumentError(
          absl::StrCat("CIDR \"", absl::CHexEscape(detail::av(text)),
                       "\" has bits set past its prefix; did you mean ",
                       c.base_.to_string(), "/", bits, "?"));
    }
    return c;
  }

  bool contains(const IpAddress& a) const noexcept {
    return a.masked(bits_) == base_;
  }

 private:
  static absl::Status bad(std::string_view text) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a CIDR range: \"",
                     absl::CHexEscape(detail::av(text.substr(0, 80))), "\""));
  }

  IpAddress base_;
  int bits_ = 128;
};

namespace detail {

inline bool is_ows(char c) { return c == ' ' || c == '\t'; }

inline std::string_view trim_ows(std::string_view s) {
  while (!s.empty() && is_ows(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ows(s.back())) s.remove_suffix(1);
  return s;
}

// "1.2.3.4", "1.2.3.4:80", "[2001:db8::1]", "[2001:db8::1]:443", or a bare
// IPv6 "2001:db8::1": the address without the port.
inline absl::StatusOr<IpAddress> parse_node(std::string_view s) {
  auto port_ok = [](std::string_view p) {
    if (p.empty() || p.size() > 5) return false;
    std::uint32_t v = 0;
    for (const char c : p) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + static_cast<std::uint32_t>(c - '0');
    }
    return v <= 65535;
  };
  if (!s.empty() && s.front() == '[') {
    const std::size_t close = s.find(']');
    if (close == std::string_view::npos) return IpAddress::parse(s);
    const std::string_view rest = s.substr(close + 1);
    if (!rest.empty() && (rest.front() != ':' || !port_ok(rest.substr(1)))) {
      return IpAddress::parse(s);  // the error quotes the whole node
    }
    const std::string_view inside = s.substr(1, close - 1);
    // Brackets hold IPv6 text (RFC 3986 IP-literal): "[::ffff:192.0.2.7]"
    // (an IPv4 client behind a dual-stack proxy) is one; "[1.2.3.4]" is not.
    if (inside.find(':') == std::string_view::npos) return IpAddress::parse(s);
    return IpAddress::parse(inside);
  }
  const std::size_t colon = s.find(':');
  if (colon != std::string_view::npos &&
      s.find(':', colon + 1) == std::string_view::npos) {
    // One colon: IPv4 with a port.
    if (!port_ok(s.substr(colon + 1))) return IpAddress::parse(s);
    absl::StatusOr<IpAddress> a = IpAddress::parse(s.substr(0, colon));
    if (a.ok() && !a->is_v4()) return IpAddress::parse(s);
    return a;
  }
  return IpAddress::parse(s);
}

// Splits `s` on `delim` outside quoted strings (a comma-separated header
// line into elements, an element into its ';' parameters). False on an
// unterminated quote.
inline bool split_outside_quotes(
    std::string_view s, char delim,
    absl::InlinedVector<std::string_view, 8>& out) {
  std::size_t start = 0;
  bool quoted = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (quoted) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        quoted = false;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == delim) {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  }
  if (quoted) return false;
  out.push_back(s.substr(start));
  return true;
}

// The node of a Forwarded element's "for" parameter, unquoted.
inline absl::StatusOr<std::string> forwarded_for(std::string_view element) {
  std::string found;
  bool have = false;
  absl::InlinedVector<std::string_view, 8> pairs;
  if (!split_outside_quotes(element, ';', pairs)) {
    return absl::InvalidArgumentError("Forwarded: unterminated quote");
  }
  for (const std::string_view raw : pairs) {
    const std::string_view pair = trim_ows(raw);
    if (pair.empty()) continue;
    const std::size_t eq = pair.find('=');
    if (eq == std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("Forwarded: a parameter without '=': \"",
                       absl::CHexEscape(detail::av(pair.substr(0, 80))), "\""));
    }
    const std::string_view name = pair.substr(0, eq);
    if (name.size() != 3 || (name[0] | 0x20) != 'f' ||
        (name[1] | 0x20) != 'o' || (name[2] | 0x20) != 'r') {
      continue;
    }
    if (have) {
      return absl::InvalidArgumentError(
          "Forwarded: two \"for\" parameters in one element");
    }
    have = true;
    std::string_view v = pair.substr(eq + 1);
    if (!v.empty() && v.front() == '"') {
      if (v.size() < 2 || v.back() != '"') {
        return absl::InvalidArgumentError("Forwarded: unterminated quote");
      }
      v = v.substr(1, v.size() - 2);
      for (std::size_t k = 0; k < v.size(); ++k) {
        if (v[k] == '\\' && k + 1 < v.size()) ++k;
        found.push_back(v[k]);
      }
    } else {
      found.assign(v);
    }
  }
  if (!have) {
    return absl::InvalidArgumentError(
        "Forwarded: an element without \"for\": the hop is unknown");
  }
  return found;
}

}  // namespace detail

// TrustedProxies: the address ranges of your own proxies and load
// balancers. A forwarding header is only as true as the hop that wrote it:
// a client writes whatever it likes, each trusted proxy appends the address
// it saw. So the client is the right-most hop that is not a trusted proxy,
// walking from the peer that connected leftwards through the header.
//
// Thread safety: immutable after create(); all members are const.
class TrustedProxies {
 public:
  // No proxy trusted: the client is always the connecting peer.
  TrustedProxies() = default;

  // create
  //
  // From CIDR ranges ("10.0.0.0/8", "::1"). kInvalidArgument naming the
  // first that does not parse.
  static absl::StatusOr<TrustedProxies> create(
      std::span<const std::string_view> cidrs) {
    TrustedProxies t;
    for (const std::string_view c : cidrs) {
      absl::StatusOr<Cidr> r = Cidr::parse(c);
      if (!r.ok()) return r.status();
      t.ranges_.push_back(*r);
    }
    return t;
  }
  static absl::StatusOr<TrustedProxies> create(
      std::initializer_list<std::string_view> cidrs) {
    return create(
        std::span<const std::string_view>(cidrs.begin(), cidrs.size()));
  }

  bool trusted(const IpAddress& a) const noexcept {
    for (const Cidr& c : ranges_) {
      if (c.contains(a)) return true;
    }
    return false;
  }

  // client_from_x_forwarded_for
  //
  // The client behind `peer` given the X-Forwarded-For field lines in the
  // order received ("client, proxy1, proxy2"). An untrusted peer is the
  // client, whatever the header says. Elements are addresses, optionally
  // with a port ("1.2.3.4:80", "[2001:db8::1]:443"). kInvalidArgument when
  // the hop to believe is not an address; hops left of it are never read.
  absl::StatusOr<IpAddress> client_from_x_forwarded_for(
      const IpAddress& peer, std::span<const std::string_view> lines) const {
    return walk(peer, lines, "X-Forwarded-For",
                [](std::string_view e) -> absl::StatusOr<IpAddress> {
                  return detail::parse_node(e);
                });
  }
  absl::StatusOr<IpAddress> client_from_x_forwarded_for(
      const IpAddress& peer,
      std::initializer_list<std::string_view> lines) const {
    return client_from_x_forwarded_for(
        peer, std::span<const std::string_view>(lines.begin(), lines.size()));
  }

  // client_from_forwarded
  //
  // As above for RFC 7239 Forwarded lines ("for=192.0.2.60;proto=https,
  // for=\"[2001:db8::17]:4711\""). A hop to believe whose "for" is
  // "unknown", obfuscated ("_hidden") or absent is kInvalidArgument: the
  // client cannot be told apart from others.
  absl::StatusOr<IpAddress> client_from_forwarded(
      const IpAddress& peer, std::span<const std::string_view> lines) const {
    return walk(peer, lines, "Forwarded",
                [](std::string_view e) -> absl::StatusOr<IpAddress> {
                  absl::StatusOr<std::string> node = detail::forwarded_for(e);
                  if (!node.ok()) return node.status();
                  return detail::parse_node(*node);
                });
  }
  absl::StatusOr<IpAddress> client_from_forwarded(
      const IpAddress& peer,
      std::initializer_list<std::string_view> lines) const {
    return client_from_forwarded(
        peer, std::span<const std::string_view>(lines.begin(), lines.size()));
  }

 private:
  template <class ParseHop>
  absl::StatusOr<IpAddress> walk(const IpAddress& peer,
                                 std::span<const std::string_view> lines,
                                 std::string_view header,
                                 const ParseHop& parse_hop) const {
    IpAddress hop = peer;
    if (!trusted(hop)) return hop;
    absl::InlinedVector<std::string_view, 8> elems;
    for (std::size_t l = lines.size(); l-- > 0;) {
      elems.clear();
      if (!detail::split_outside_quotes(lines[l], ',', elems)) {
        return absl::InvalidArgumentError(
            absl::StrCat(detail::av(header), ": unterminated quoted string"));
      }
      for (std::size_t e = elems.size(); e-- > 0;) {
        const std::string_view el = detail::trim_ows(elems[e]);
        if (el.empty()) continue;  // "a, , b": empty list members are legal
        absl::StatusOr<IpAddress> a = parse_hop(el);
        if (!a.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(
              detail::av(header),
              ": the client hop is not an address: ", a.status().message()));
        }
        hop = *a;
        if (!trusted(hop)) return hop;
      }
    }
    // Every hop is one of ours: the left-most is as far as we can see.
    return hop;
  }

  std::vector<Cidr> ranges_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_IP_HPP_
