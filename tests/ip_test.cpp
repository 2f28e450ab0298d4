// Client addresses: parsing, grouping into keys, and forwarding headers
// believed only as far as trusted proxies wrote them (TESTPLAN T10a, T10b).
#include "ratekeeper/ip.hpp"

#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

IpAddress ip(std::string_view s) {
  auto a = IpAddress::parse(s);
  INFO(s);
  REQUIRE(a.ok());
  return *a;
}

std::string random_v4(std::mt19937_64& rng) {
  return absl::StrCat(rng() % 256, ".", rng() % 256, ".", rng() % 256, ".",
                      rng() % 256);
}

std::string random_v6(std::mt19937_64& rng) {
  std::string s;
  for (int i = 0; i < 8; ++i) {
    absl::StrAppend(&s, i == 0 ? "" : ":", absl::Hex(rng() % 65536));
  }
  return s;
}

}  // namespace

TEST_CASE("addresses parse strictly", "[ip]") {
  CHECK(ip("1.2.3.4").is_v4());
  CHECK(ip("1.2.3.4").to_string() == "1.2.3.4");
  CHECK(ip("2001:DB8::1").to_string() == "2001:db8::1");
  CHECK_FALSE(ip("::1").is_v4());
  for (const char* bad :
       {"", " 1.2.3.4", "1.2.3.4 ", "1.2.3", "1.2.3.4.5", "256.1.1.1",
        "01.2.3.4", "1.2.3.04", "0x1.2.3.4", "1.2.3.4/32", "[::1]",
        "fe80::1%eth0", "1::2::3", "12345::", "unknown", "localhost",
        "1.2.3.4:80", "::ffff:1.2.3.256"}) {
    CAPTURE(bad);
    const auto r = IpAddress::parse(bad);
    CHECK_FALSE(r.ok());
    if (!r.ok()) {
      CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    }
  }
  CHECK_FALSE(IpAddress::parse(std::string_view("1.2.3.4\0", 8)).ok());
  CHECK_FALSE(IpAddress::parse(std::string(100, '1')).ok());
}

TEST_CASE(
    "T10b: 10,000 addresses in one /64 share one key; IPv4-mapped "
    "IPv6 is IPv4",
    "[ip][T10b]") {
  const std::uint64_t seed = rk_test::seed_or(0x10B);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  std::set<std::string> keys;
  for (int i = 0; i < 10'000; ++i) {
    // 2001:db8:1:2::/64 with a random interface identifier, in varied text
    // forms (compressed, upper case, leading zeros in groups).
    std::string s =
        absl::StrCat("2001:db8:1:2:", absl::Hex(rng() % 65536), ":",
                     absl::Hex(rng() % 65536), ":", absl::Hex(rng() % 65536),
                     ":", absl::Hex(rng() % 65536));
    if (i % 3 == 0) s = absl::StrCat("2001:0DB8:0001:0002::", absl::Hex(i));
    keys.insert(ip_key(ip(s)));
  }
  REQUIRE(keys.size() == 1);
  CHECK(*keys.begin() == "2001:db8:1:2::/64");
  // The neighbouring /64 is another key; so is every random one.
  CHECK(ip_key(ip("2001:db8:1:3::1")) != *keys.begin());
  std::set<std::string> apart;
  for (int i = 0; i < 1000; ++i) apart.insert(ip_key(ip(random_v6(rng))));
  CHECK(apart.size() > 990);
  // IPv4-mapped forms are the IPv4 address.
  for (int i = 0; i < 1000; ++i) {
    const std::string v4 = random_v4(rng);
    CAPTURE(v4);
    REQUIRE(ip_key(ip("::ffff:" + v4)) == ip_key(ip(v4)));
    REQUIRE(ip_key(ip("::FFFF:" + v4)) == v4);
    REQUIRE(ip("::ffff:" + v4) == ip(v4));
  }
  CHECK(ip_key(ip("::ffff:102:304")) == "1.2.3.4");
  // IPv4 is exact by default; prefixes are configurable.
  CHECK(ip_key(ip("1.2.3.4")) != ip_key(ip("1.2.3.5")));
  const IpKeyOptions wide{.ipv4_prefix = 24, .ipv6_prefix = 48};
  CHECK(wide.validate().ok());
  CHECK(ip_key(ip("1.2.3.4"), wide) == "1.2.3.0/24");
  CHECK(ip_key(ip("1.2.3.200"), wide) == "1.2.3.0/24");
  CHECK(ip_key(ip("2001:db8:1:2::1"), wide) == "2001:db8:1::/48");
  CHECK(ip_key(ip("2001:db8::1"), {.ipv6_prefix = 128}) == "2001:db8::1");
  CHECK_FALSE(IpKeyOptions{.ipv4_prefix = 33}.validate().ok());
  CHECK_FALSE(IpKeyOptions{.ipv6_prefix = -1}.validate().ok());
}

TEST_CASE("CIDR ranges", "[ip]") {
  const auto ten = Cidr::parse("10.0.0.0/8").value();
  CHECK(ten.contains(ip("10.255.0.1")));
  CHECK(ten.contains(ip("::ffff:10.1.1.1")));
  CHECK_FALSE(ten.contains(ip("11.0.0.1")));
  const auto v6 = Cidr::parse("2001:db8::/32").value();
  CHECK(v6.contains(ip("2001:db8:ffff::1")));
  CHECK_FALSE(v6.contains(ip("2001:db9::1")));
  CHECK(Cidr::parse("1.2.3.4").value().contains(ip("1.2.3.4")));
  CHECK_FALSE(Cidr::parse("1.2.3.4").value().contains(ip("1.2.3.5")));
  CHECK(Cidr::parse("0.0.0.0/0").value().contains(ip("8.8.8.8")));
  CHECK_FALSE(Cidr::parse("0.0.0.0/0").value().contains(ip("::1")));
  for (const char* bad : {"10.0.0.0/33", "10.0.0.0/", "10.0.0.0/08",
                          "10.0.0.1/8", "::/129", "x/8", "10.0.0.0/8/8"}) {
    CAPTURE(bad);
    CHECK_FALSE(Cidr::parse(bad).ok());
  }
  const auto typo = Cidr::parse("10.0.0.1/8");
  CHECK(std::string(typo.status().message()).find("10.0.0.0/8") !=
        std::string::npos);
}

TEST_CASE("X-Forwarded-For: the right-most untrusted hop", "[ip]") {
  const auto proxies =
      TrustedProxies::create({"10.0.0.0/8", "2001:db8:ffff::/48"}).value();
  const IpAddress lb = ip("10.0.0.2");
  SECTION("an untrusted peer is the client, whatever it sends") {
    CHECK(proxies.client_from_x_forwarded_for(ip("203.0.113.9"), {"1.1.1.1"})
              .value() == ip("203.0.113.9"));
    CHECK(proxies.client_from_x_forwarded_for(ip("203.0.113.9"), {"garbage"})
              .value() == ip("203.0.113.9"));
  }
  SECTION("through trusted proxies to the first untrusted hop") {
    CHECK(proxies.client_from_x_forwarded_for(lb, {"198.51.100.7"}).value() ==
          ip("198.51.100.7"));
    CHECK(proxies
              .client_from_x_forwarded_for(lb,
                                           {"6.6.6.6, 198.51.100.7, 10.1.1.1"})
              .value() == ip("198.51.100.7"));
    // Several field lines are one list, in order.
    CHECK(proxies
              .client_from_x_forwarded_for(
                  lb, {"6.6.6.6, 198.51.100.7", "10.1.1.1"})
              .value() == ip("198.51.100.7"));
    // Ports, brackets, IPv6, spaces and empty members.
    CHECK(proxies.client_from_x_forwarded_for(lb, {"198.51.100.7:4711"})
              .value() == ip("198.51.100.7"));
    CHECK(proxies.client_from_x_forwarded_for(lb, {"[2001:db8::5]:443, "})
              .value() == ip("2001:db8::5"));
    CHECK(
        proxies.client_from_x_forwarded_for(lb, {" 2001:db8::5 ,,"}).value() ==
        ip("2001:db8::5"));
  }
  SECTION("no header: the trusted peer itself; all trusted: the left-most") {
    CHECK(proxies.client_from_x_forwarded_for(lb, {}).value() == lb);
    CHECK(proxies.client_from_x_forwarded_for(lb, {"10.9.9.9, 10.1.1.1"})
              .value() == ip("10.9.9.9"));
  }
  SECTION("a malformed hop to believe is an error; left of it is not read") {
    for (const char* bad : {"nonsense", "1.2.3.4:99999", "[1.2.3.4]:80",
                            "1.2.3.4:", "[::1", "unknown", "01.2.3.4"}) {
      CAPTURE(bad);
      const auto r = proxies.client_from_x_forwarded_for(lb, {bad});
      REQUIRE_FALSE(r.ok());
      CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
      CHECK(std::string(r.status().message()).find("X-Forwarded-For") !=
            std::string::npos);
    }
    CHECK(proxies.client_from_x_forwarded_for(lb, {"nonsense, 8.8.8.8"})
              .value() == ip("8.8.8.8"));
  }
}

TEST_CASE("Forwarded (RFC 7239)", "[ip]") {
  const auto proxies = TrustedProxies::create({"10.0.0.0/8"}).value();
  const IpAddress lb = ip("10.0.0.2");
  CHECK(proxies
            .client_from_forwarded(
                lb, {"for=192.0.2.60;proto=http;by=203.0.113.43"})
            .value() == ip("192.0.2.60"));
  CHECK(proxies
            .client_from_forwarded(
                lb, {"for=6.6.6.6, For=\"[2001:db8:cafe::17]:4711\""})
            .value() == ip("2001:db8:cafe::17"));
  CHECK(proxies
            .client_from_forwarded(lb, {"for=198.51.100.1;by=\"a,b\", "
                                        "for=10.3.3.3"})
            .value() == ip("198.51.100.1"));
  CHECK(
      proxies.client_from_forwarded(lb, {"for=\"198.51.100.1:80\""}).value() ==
      ip("198.51.100.1"));
  for (const char* bad :
       {"for=unknown", "for=_hidden", "proto=https", "for=\"[::1]",
        "for=1.2.3.4;for=5.6.7.8", "for", "for=\"1.2.3.4"}) {
    CAPTURE(bad);
    const auto r = proxies.client_from_forwarded(lb, {bad});
    REQUIRE_FALSE(r.ok());
    CHECK(std::string(r.status().message()).find("Forwarded") !=
          std::string::npos);
  }
}

TEST_CASE(
    "T10a: 10,000 spoofed requests from an untrusted peer never "
    "escape its key",
    "[ip][T10a]") {
  const std::uint64_t seed = rk_test::seed_or(0x10A);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const auto proxies =
      TrustedProxies::create({"10.0.0.0/8", "192.168.0.0/16", "::1"}).value();
  const IpAddress attacker = ip("203.0.113.66");
  const std::string attacker_key = ip_key(attacker);
  const IpAddress lb = ip("10.0.0.1");
  int via_proxy = 0;
  for (int i = 0; i < 10'000; ++i) {
    // What a client can write: random addresses (often trusted ones, to
    // look like a proxy), ports, garbage, many hops, several lines.
    std::vector<std::string> lines;
    const int nlines = 1 + static_cast<int>(rng() % 3);
    for (int l = 0; l < nlines; ++l) {
      std::string line;
      const int hops = 1 + static_cast<int>(rng() % 4);
      for (int h = 0; h < hops; ++h) {
        if (h) line += rng() % 2 ? ", " : ",";
        switch (rng() % 6) {
          case 0:
            line += random_v4(rng);
            break;
          case 1:
            line += "10." + std::to_string(rng() % 256) + ".0.1";
            break;
          case 2:
            line += "[" + random_v6(rng) + "]:80";
            break;
          case 3:
            line += "::1";
            break;
          case 4:
            line += "for=" + random_v4(rng);
            break;
          default:
            line += "\"x\\\",y";
            break;
        }
      }
      lines.push_back(line);
    }
    std::vector<std::string_view> views(lines.begin(), lines.end());
    // Straight from the attacker: its own address, whatever it wrote.
    const auto x = proxies.client_from_x_forwarded_for(attacker, views);
    REQUIRE(x.ok());
    REQUIRE(ip_key(*x) == attacker_key);
    const auto f = proxies.client_from_forwarded(attacker, views);
    REQUIRE(f.ok());
    REQUIRE(ip_key(*f) == attacker_key);
    // Through our load balancer, which appends the address it saw: still
    // the attacker's, however many trusted-looking hops it forged.
    std::vector<std::string_view> via = views;
    via.push_back("203.0.113.66");
    const auto p = proxies.client_from_x_forwarded_for(lb, via);
    REQUIRE(p.ok());
    REQUIRE(ip_key(*p) == attacker_key);
    std::vector<std::string_view> fwd = views;
    fwd.push_back("for=203.0.113.66;proto=https");
    const auto q = proxies.client_from_forwarded(lb, fwd);
    REQUIRE(q.ok());
    REQUIRE(ip_key(*q) == attacker_key);
    ++via_proxy;
  }
  CHECK(via_proxy == 10'000);
}

TEST_CASE("Forwarded and X-Forwarded-For accept an IPv4-mapped IPv6 hop",
          "[i14][ip]") {
  // A dual-stack proxy writes every IPv4 client as ::ffff:a.b.c.d, in
  // brackets with a port (RFC 7239 §6: an IPv6 node is a bracketed
  // IP-literal).
  const auto proxies = TrustedProxies::create({"10.0.0.0/8"}).value();
  const IpAddress lb = ip("10.0.0.2");
  CHECK(proxies.client_from_forwarded(lb, {"for=\"[::ffff:192.0.2.7]:4711\""})
            .value() == ip("192.0.2.7"));
  CHECK(proxies.client_from_forwarded(lb, {"for=\"[::ffff:192.0.2.7]\""})
            .value() == ip("192.0.2.7"));
  CHECK(proxies.client_from_forwarded(lb, {"for=\"[::FFFF:c000:207]:80\""})
            .value() == ip("192.0.2.7"));
  CHECK(proxies.client_from_x_forwarded_for(lb, {"[::ffff:192.0.2.7]:4711"})
            .value() == ip("192.0.2.7"));
  CHECK(proxies.client_from_x_forwarded_for(lb, {"::ffff:192.0.2.7"}).value() ==
        ip("192.0.2.7"));
  // The key is the IPv4 client's, whichever form the proxy wrote.
  CHECK(
      ip_key(proxies.client_from_forwarded(lb, {"for=\"[::ffff:192.0.2.7]:1\""})
                 .value()) == "192.0.2.7");
  // Still refused: a dotted quad in brackets is no IP-literal, and a mapped
  // trusted proxy is still trusted (its left neighbour is read).
  for (const char* bad : {"for=\"[192.0.2.7]:4711\"", "for=\"[192.0.2.7]\"",
                          "for=\"[::ffff:192.0.2.256]:1\""}) {
    CAPTURE(bad);
    CHECK_FALSE(proxies.client_from_forwarded(lb, {bad}).ok());
  }
  CHECK(proxies
            .client_from_forwarded(
                lb, {"for=198.51.100.9, for=\"[::ffff:10.1.1.1]:80\""})
            .value() == ip("198.51.100.9"));
}

TEST_CASE("IPv6 addresses that embed an IPv4 client are keyed by it",
          "[i14][ip]") {
  // RFC 6052 §2.4's table: 192.0.2.33 embedded under each prefix length.
  const struct {
    const char* prefix;
    int bits;
    const char* address;
  } rfc6052[] = {
      {"2001:db8::", 32, "2001:db8:c000:221::"},
      {"2001:db8:100::", 40, "2001:db8:1c0:2:21::"},
      {"2001:db8:122::", 48, "2001:db8:122:c000:2:2100::"},
      {"2001:db8:122:300::", 56, "2001:db8:122:3c0:0:221::"},
      {"2001:db8:122:344::", 64, "2001:db8:122:344:c0:2:2100:0"},
      {"2001:db8:122:344::", 96, "2001:db8:122:344::192.0.2.33"},
  };
  // The well-known prefix (RFC 6052 §2.1, the /96 layout).
  CHECK(embedded_ipv4(ip("64:ff9b::192.0.2.33")) == ip("192.0.2.33"));
  CHECK(ip_key(ip("64:ff9b::c000:221")) == "192.0.2.33");
  CHECK(ip_key(ip("64:ff9b::c000:222")) == "192.0.2.34");
  // The local-use prefix 64:ff9b:1::/48 (RFC 8215) with the operator's
  // layout: the table's addresses under 64:ff9b:1 instead of 2001:db8:122.
  const struct {
    int bits;
    const char* address;
  } local[] = {
      {48, "64:ff9b:1:c000:2:2100::"},
      {56, "64:ff9b:1:3c0:0:221::"},
      {64, "64:ff9b:1:344:c0:2:2100:0"},
      {96, "64:ff9b:1:344::192.0.2.33"},
  };
  for (const auto& l : local) {
    CAPTURE(l.address);
    const IpKeyOptions o{.local_nat64_prefix = l.bits};
    REQUIRE(o.validate().ok());
    CHECK(embedded_ipv4(ip(l.address), o) == ip("192.0.2.33"));
    CHECK(ip_key(ip(l.address), o) == "192.0.2.33");
  }
  CHECK(ip_key(ip("64:ff9b:1:344::192.0.2.33")) == "192.0.2.33");  // /96
  CHECK_FALSE(IpKeyOptions{.local_nat64_prefix = 40}.validate().ok());
  // A network-specific prefix (2001:db8::/32 here) is an ordinary IPv6
  // network: nothing says it translates, so it keeps its /64 key.
  for (const auto& r : rfc6052) {
    CAPTURE(r.address);
    CHECK_FALSE(embedded_ipv4(ip(r.address)).has_value());
  }
  // IPv4-compatible (RFC 4291 §2.5.5.1), not :: nor ::1.
  CHECK(ip_key(ip("::192.0.2.33")) == "192.0.2.33");
  CHECK_FALSE(embedded_ipv4(ip("::")).has_value());
  CHECK_FALSE(embedded_ipv4(ip("::1")).has_value());
  CHECK(ip_key(ip("::1")) == "::/64");
  // 6to4 (RFC 3056 §2): 2002:V4ADDR::/48; V4ADDR 192.1.2.3 is c001:0203.
  CHECK(ip_key(ip("2002:c001:203::1")) == "192.1.2.3");
  CHECK(ip_key(ip("2002:c001:203:ffff:1:2:3:4")) == "192.1.2.3");
  // Teredo (RFC 4380 §4): 2001:0:<server>:<flags>:<port ^ ffff>:<client ^
  // ffffffff>. Server 65.54.227.120, port 40000, client 192.0.2.45: the
  // client's bits inverted by hand, c000:022d ^ ffff:ffff = 3fff:fdd2.
  const IpAddress teredo = ip("2001:0:4136:e378:8000:63bf:3fff:fdd2");
  CHECK(embedded_ipv4(teredo) == ip("192.0.2.45"));
  CHECK(ip_key(teredo) == "192.0.2.45");
  // Two Teredo clients behind one server were one /64 key before.
  CHECK(ip_key(ip("2001:0:4136:e378:8000:63bf:3fff:fdd3")) == "192.0.2.44");
  // The IPv4 prefix applies to them too; the option turns it off.
  CHECK(ip_key(teredo, {.ipv4_prefix = 24}) == "192.0.2.0/24");
  CHECK(ip_key(teredo, {.embedded_ipv4 = false}) == "2001:0:4136:e378::/64");
  CHECK(ip_key(ip("64:ff9b::1.2.3.4"), {.embedded_ipv4 = false}) ==
        "64:ff9b::/64");
  // Ordinary IPv6 stays keyed by /64.
  CHECK_FALSE(embedded_ipv4(ip("2001:db8:1:2::1")).has_value());
  CHECK_FALSE(embedded_ipv4(ip("2001:1::1")).has_value());  // not Teredo
  CHECK_FALSE(embedded_ipv4(ip("64:ff9b:2::1")).has_value());
}

TEST_CASE("10,000 IPv4 clients behind NAT64, 6to4 and Teredo stay apart",
          "[i14][ip]") {
  const std::uint64_t seed = rk_test::seed_or(0x1414);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  std::set<std::string> keys;
  std::set<std::uint32_t> clients;
  for (int i = 0; i < 10'000; ++i) {
    const auto v4 = static_cast<std::uint32_t>(rng());
    clients.insert(v4);
    const std::string dotted = absl::StrCat(
        v4 >> 24, ".", (v4 >> 16) & 255, ".", (v4 >> 8) & 255, ".", v4 & 255);
    const std::string hi = absl::StrCat(absl::Hex(v4 >> 16));
    const std::string lo = absl::StrCat(absl::Hex(v4 & 0xFFFF));
    const std::string inv_hi = absl::StrCat(absl::Hex((~v4) >> 16));
    const std::string inv_lo = absl::StrCat(absl::Hex((~v4) & 0xFFFF));
    // The same client in each form keys as its IPv4 address.
    const std::string forms[] = {
        "64:ff9b::" + dotted,
        absl::StrCat("64:ff9b::", hi, ":", lo),
        absl::StrCat("2002:", hi, ":", lo, "::1"),
        absl::StrCat("2001:0:4136:e378:8000:63bf:", inv_hi, ":", inv_lo),
        "::ffff:" + dotted,
    };
    for (const std::string& f : forms) {
      CAPTURE(f);
      REQUIRE(ip_key(ip(f)) == ip_key(ip(dotted)));
    }
    keys.insert(ip_key(ip(forms[0])));
  }
  CHECK(keys.size() == clients.size());
}
