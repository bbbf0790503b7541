"""Fetching an ``http(s)`` media URL on a client's behalf (``--allow-fetch``) without becoming a proxy into
the server's own network.

A server that fetches what a request names can be pointed at its own ``/metrics``, a cloud metadata
service (169.254.169.254) or anything on the private network behind it: server-side request forgery. So,
unless ``--allow-fetch-private``:

- the host is resolved first and every address it resolves to must be globally routable: loopback,
  private, link-local, multicast, shared (100.64/10), reserved and unspecified addresses are refused, in
  IPv4 and IPv6, including IPv4 addresses embedded in IPv6 (``::ffff:127.0.0.1``, 6to4, Teredo, NAT64);
- the connection goes to the address that was checked, not to a second resolution of the name, so a DNS
  answer that changes between check and connect (rebinding) cannot redirect it;
- redirects are followed here, one hop at a time, each hop checked like the first (at most
  ``MAX_REDIRECTS``).

``--allowed-media-domains a.com,b.org`` further limits hosts to those domains and their subdomains. No
proxy settings are honoured: the server connects directly (docs/serve.md).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Union
from urllib.parse import urljoin, urlsplit

from apet.serve.errors import ApiError, bad_request

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float = 10.0
    allow_private: bool = False
    allowed_domains: tuple[str, ...] = ()  # lower case, no dots at either end; empty: any host


def refusal(ip: IPAddress) -> str | None:
    """Why an address is not fetched from (None: it is globally routable)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            why = refusal(inner)
            if why is not None:
                return f"{why} ({inner} inside {ip})"
            if ip.ipv4_mapped is not None or ip in _NAT64:
                return None  # the IPv4 address is where the packets go
    for name, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                       ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if test:
            return f"a {name} address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def domain_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """Exact host or a subdomain of one of ``domains`` (``a.com`` admits ``img.a.com``, not ``evila.com``)."""
    return not domains or any(host == d or host.endswith("." + d) for d in domains)


def fetch(url: str, policy: FetchPolicy, param: str) -> tuple[str, bytes]:
    """``(media type, bytes)`` of ``url``, following at most MAX_REDIRECTS redirects, each checked."""
    for _ in range(MAX_REDIRECTS + 1):
        response, connection = _get(url, policy, param)
        try:
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise _failed(url, f"HTTP {response.status} without a Location", param)
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise _failed(url, f"HTTP {response.status} {response.reason}", param)
            data = response.read(policy.max_bytes + 1)
            mime = (response.headers.get_content_type() or "").lower()
        except (OSError, http.client.HTTPException) as exc:
            raise _failed(url, str(exc) or type(exc).__name__, param) from exc
        finally:
            connection.close()
        if len(data) > policy.max_bytes:
            raise ApiError(413, f"{url} is larger than the server's --max-body-mb {policy.max_bytes / (1 << 20):g} "
                           "MiB — downscale it, or restart apet-serve with a larger --max-body-mb",
                           "media_too_large", param)
        return mime, data
    raise bad_request(f"{param}: more than {MAX_REDIRECTS} redirects", "send the final URL, or the file inline "
                      "as a data URL", param=param, code="fetch_failed")


def _failed(url: str, why: str, param: str) -> ApiError:
    return bad_request(f"cannot fetch {url} ({why})", "check the URL, or send the file inline as a data URL",
                       param=param, code="fetch_failed")


def _refused(url: str, why: str, fix: str, param: str) -> ApiError:
    return ApiError(403, f"{param}: {url} is not fetched: {why} — {fix}", "fetch_refused", param)


def _host(url: str, policy: FetchPolicy, param: str) -> tuple[str, str, int, str]:
    """scheme, host (IDNA, lower case), port and request target of a URL this server may fetch."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = (parts.hostname or "").rstrip(".")
        host = host.encode("idna").decode("ascii").lower() if host and not host.isascii() else host.lower()
    except (ValueError, UnicodeError) as exc:
        raise bad_request(f"{param} is not a valid URL ({exc})", "send an http(s) URL or a data URL",
                          param=param, code="invalid_url") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise _refused(url, "only http(s) URLs with a host are fetched", "send an http(s) URL or a data URL", param)
    if not domain_allowed(host, policy.allowed_domains):
        raise _refused(url, f"{host} is not in --allowed-media-domains {','.join(policy.allowed_domains)}",
                       "host the image on one of those domains, or send it inline as a data URL", param)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, target


def _addresses(url: str, host: str, port: int, policy: FetchPolicy, param: str) -> list[tuple[int, tuple]]:
    """The (family, socket address) pairs to try, in the resolver's order: every address the host resolves
    to is checked, so a name with one public and one private address is refused rather than half-trusted."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise _failed(url, f"cannot resolve {host}: {exc}", param) from exc
    if not found:
        raise _failed(url, f"{host} resolves to no address", param)
    if not policy.allow_private:
        for _, _, _, _, sockaddr in found:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            why = refusal(ip)
            if why is not None:
                raise _refused(url, f"{host} resolves to {ip}, {why}",
                               "this server fetches only public addresses; send the image inline as a data URL, "
                               "or start apet-serve with --allow-fetch-private (only where every client is "
                               "trusted)", param)
    return [(family, sockaddr) for family, _, _, _, sockaddr in found]


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand; the Host header still names the host."""

    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def _dial(self) -> socket.socket:
        """The first checked address that answers (as socket.create_connection, without resolving again)."""
        error: OSError | None = None
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error or OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._dial()


class _PinnedTLS(_Pinned):
    """TLS to the checked address; the certificate is verified against the host name (SNI too)."""

    default_port = 443

    def connect(self) -> None:
        self.sock = ssl.create_default_context().wrap_socket(self._dial(), server_hostname=self.host)


def _get(url: str, policy: FetchPolicy, param: str) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    scheme, host, port, target = _host(url, policy, param)
    addresses = _addresses(url, host, port, policy, param)
    kind = _PinnedTLS if scheme == "https" else _Pinned
    connection = kind(host, port, addresses, policy.timeout_s)
    try:
        connection.request("GET", target, headers={"User-Agent": "apet-serve", "Accept": "image/*, video/*"})
        return connection.getresponse(), connection
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise _failed(url, str(exc) or type(exc).__name__, param) from exc
