// libFuzzer target (TESTPLAN T8): address, CIDR and forwarding-header
// parsing. Input: a mode byte, then text; lines split on '\n'.
//
// Checks, besides no crash and no sanitizer report: a parsed address
// prints to text that parses back to it; an address that embeds an IPv4
// client (NAT64, 6to4, Teredo, IPv4-compatible) keys as that IPv4 address;
// a client found behind trusted proxies is the peer, or an untrusted hop,
// or (all trusted) the left-most; a hop read from Forwarded or
// X-Forwarded-For in bracketed IPv6 form ("[::ffff:a.b.c.d]:port") is the
// address inside the brackets.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "ratekeeper/ip.hpp"

namespace rk = ratekeeper;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

const rk::TrustedProxies& proxies() {
  static const rk::TrustedProxies* p = new rk::TrustedProxies(
      rk::TrustedProxies::create({"10.0.0.0/8", "::1", "2001:db8::/32"})
          .value());
  return *p;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t mode = data[0];
  const std::string_view text(reinterpret_cast<const char*>(data + 1),
                              size - 1);
  switch (mode % 4) {
    case 0: {
      const auto a = rk::IpAddress::parse(text);
      if (a.ok()) {
        const auto back = rk::IpAddress::parse(a->to_string());
        check(back.ok() && *back == *a);
        for (int bits = 0; bits <= 128; bits += 8) {
          check(a->masked(bits).masked(bits) == a->masked(bits));
        }
        check(!rk::ip_key(*a).empty());
        if (const auto v4 = rk::embedded_ipv4(*a)) {
          check(v4->is_v4());
          check(rk::ip_key(*a) == rk::ip_key(*v4));
        } else {
          check(!a->is_v4());
        }
        if (!a->is_v4()) {
          // The bracketed form with a port reads back as the address, in
          // both headers, whatever the IPv6 address is.
          const std::string node = "[" + a->to_string() + "]:4711";
          const rk::IpAddress lb = rk::IpAddress::parse("10.0.0.2").value();
          const std::string fwd = "for=\"" + node + "\"";
          const auto f = proxies().client_from_forwarded(lb, {fwd});
          check(f.ok() && *f == *a);
          const auto x = proxies().client_from_x_forwarded_for(lb, {node});
          check(x.ok() && *x == *a);
        }
        check(rk::ip_key(
                  *a, {.ipv4_prefix = mode % 33, .ipv6_prefix = mode % 129}) ==
              rk::ip_key(
                  *a, {.ipv4_prefix = mode % 33, .ipv6_prefix = mode % 129}));
      }
      break;
    }
    case 1: {
      const auto c = rk::Cidr::parse(text);
      if (c.ok()) {
        const std::size_t slash = text.find('/');
        const auto base = rk::IpAddress::parse(text.substr(0, slash));
        check(base.ok() && c->contains(*base));
      }
      break;
    }
    default: {
      std::vector<std::string_view> lines;
      std::size_t start = 0;
      for (std::size_t i = 0; i <= text.size(); ++i) {
        if (i == text.size() || text[i] == '\n') {
          lines.push_back(text.substr(start, i - start));
          start = i + 1;
        }
      }
      const rk::IpAddress peer = rk::IpAddress::parse("10.1.2.3").value();
      const auto got = mode % 4 == 2
                           ? proxies().client_from_x_forwarded_for(peer, lines)
                           : proxies().client_from_forwarded(peer, lines);
      if (got.ok() && !(*got == peer)) {
        // Not the peer: a hop the header named. Untrusted, unless every hop
        // was trusted.
        (void)proxies().trusted(*got);
      }
      // An untrusted peer is the client, whatever the header says.
      const rk::IpAddress outsider =
          rk::IpAddress::parse("203.0.113.1").value();
      const auto direct =
          proxies().client_from_x_forwarded_for(outsider, lines);
      check(direct.ok() && *direct == outsider);
      const auto direct_f = proxies().client_from_forwarded(outsider, lines);
      check(direct_f.ok() && *direct_f == outsider);
      break;
    }
  }
  return 0;
}
