"""Which network addresses an image URL may make us connect to: the one place for that rule.

A server that fetches the URLs its clients name is a client of whatever address they pick: its own loopback
services, the private network behind it, the cloud metadata address. `MediaPolicy` decides, for every
connection a download opens (the first one and every redirect hop's), from the host name urllib3 is about to
connect to and the addresses that name resolves to:

* `urls`: http(s) URLs at all (False: data: URLs only, nothing is ever fetched);
* `domains`: an allow-list of host names (`example.com` exactly, `*.example.com` for its subdomains); empty:
  any name;
* the resolved address must be public (`ipaddress`' is_global, minus multicast, with the IPv4 address inside
  IPv4-mapped, 6to4, Teredo and NAT64 addresses checked too); `private=True` also lets private, shared (CGNAT),
  loopback and unique-local addresses through, for a trusted network; link-local (169.254.0.0/16, where
  cloud metadata lives, and fe80::/10), unspecified (0.0.0.0, ::), multicast, broadcast and reserved
  addresses stay refused even then;
* `redirects`: hops followed at most (0: a redirect is a failed fetch).

The name is resolved once, checked, and the socket is connected to the checked address itself
(`connect`), so a second resolution (DNS rebinding between a check and the connect) cannot swap it. Decimal,
hex and short IPv4 forms (`2130706433`, `0x7f000001`, `127.1`) resolve to the address they mean and are
judged by it.

`TRUSTED` is the policy of the command line's own inputs (predict, chat): whoever types the URL owns the
machine, so every address is allowed and the environment's proxies are used. The server builds its policy
from its flags (`from_args`): public addresses only by default. Under a restricting policy environment
proxies and .netrc are not used (a proxy would resolve the name where the check cannot see it).

A refusal is a `FetchError`, like any failed download: the server answers every one of them with the same
message (so it cannot be used to tell a closed port from an open one) and logs the detail.
"""
import ipaddress
import socket
from dataclasses import dataclass
from typing import Tuple

from llava_errors import LlavaError

MAX_REDIRECTS = 5


class FetchError(LlavaError):
    """An image URL that could not be fetched: refused by the policy, or the download failed (DNS, connection,
    time-out, HTTP status, redirects). The message has the detail, for the command line and the server's log."""


# Networks whose addresses hold other addresses (an IPv4 address inside an IPv6 one): judged by the inner one.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# Refused even with private=True: nothing a trusted image server lives on, and 169.254.169.254 is the cloud
# metadata service (credentials).
_NEVER = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "fe80::/10", "ff00::/8")]


def _inner(ip):
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo's client, NAT64), or None."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _normal_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


@dataclass(frozen=True)
class MediaPolicy:
    urls: bool = True              # http(s) image URLs at all
    private: bool = False          # private and loopback addresses too
    domains: Tuple[str, ...] = ()  # allowed host names; () = any
    redirects: int = MAX_REDIRECTS
    any_address: bool = False      # no address check at all (the command line's own inputs)

    @classmethod
    def from_args(cls, allow_urls=True, allow_private=False, domains=None, redirects=MAX_REDIRECTS):
        names = []
        for entry in domains or ():
            for name in str(entry).split(","):
                if name.strip():
                    names.append(_normal_host(name))
        if redirects < 0:
            raise LlavaError(f"--media_redirects must be >= 0, got {redirects}")
        return cls(urls=bool(allow_urls), private=bool(allow_private), domains=tuple(names), redirects=redirects)

    @property
    def restricted(self):
        return not self.any_address

    def describe(self):
        """One line for the server's start-up message."""
        if not self.urls:
            return "image URLs off (data: URLs only)"
        where = "any address" if self.any_address else \
            "public and private addresses" if self.private else "public addresses only"
        names = f", hosts {', '.join(self.domains)}" if self.domains else ""
        return f"image URLs: {where}{names}, {self.redirects} redirects at most"

    # ------------------------------------------------------------------ the rule
    def host_allowed(self, host: str) -> bool:
        if not self.domains:
            return True
        host = _normal_host(host)
        for entry in self.domains:
            if entry.startswith("*."):
                if host.endswith(entry[1:]) and host != entry[2:]:
                    return True
            elif host == entry:
                return True
        return False

    def address_allowed(self, address: str) -> bool:
        if self.any_address:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        inner = _inner(ip)
        candidates = [ip] if inner is None else [ip, inner]
        for one in candidates:
            if any(one in net for net in _NEVER if net.version == one.version) or one.is_multicast:
                return False
        check = candidates[-1]
        if check.is_global:
            return True
        return self.private and (check.is_private or check.is_loopback or check in _SHARED)

    def addresses(self, host: str, port: int):
        """getaddrinfo's (family, type, proto, sockaddr) for host:port that the policy allows; FetchError
        naming what was refused when none is."""
        if not self.host_allowed(host):
            raise FetchError(f"host '{host}' is not in --allowed_media_domains")
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise FetchError(f"cannot resolve host '{host}' ({e})") from None
        allowed = [(fam, kind, proto, addr) for fam, kind, proto, _, addr in infos if self.address_allowed(addr[0])]
        if not allowed:
            found = ", ".join(sorted({addr[0] for *_, addr in infos}))
            if self.private:
                raise FetchError(f"host '{host}' resolves to {found}: a link-local, multicast or reserved address")
            raise FetchError(f"host '{host}' resolves to {found}: not a public address (--allow_private_media "
                             f"lets private and loopback addresses through)")
        return allowed

    def connect(self, host: str, port: int, timeout=None, source_address=None, socket_options=None):
        """A socket connected to one of host's allowed addresses, the very address that was checked (no second
        resolution); FetchError when the policy refuses them all, OSError when none answers."""
        error = None
        for family, kind, proto, addr in self.addresses(host, port):
            sock = None
            try:
                sock = socket.socket(family, kind, proto)
                for level, option, value in socket_options or ():
                    sock.setsockopt(level, option, value)
                if timeout is not None:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(addr)
                return sock
            except OSError as e:
                error = e
                if sock is not None:
                    sock.close()
        raise error if error is not None else OSError(f"no address to connect to for {host}")


_SHARED = ipaddress.ip_network("100.64.0.0/10")      # carrier-grade NAT: neither global nor "private" to Python

TRUSTED = MediaPolicy(private=True, any_address=True)
