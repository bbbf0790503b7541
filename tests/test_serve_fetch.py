"""``--allow-fetch`` fetches public addresses only (issue 26, item 9; apet/serve/fetch.py).

No test here connects anywhere but loopback: names resolve from a table (``socket.getaddrinfo`` is
stubbed; numeric hosts are parsed, never looked up), and ``socket.connect`` is guarded — dialling anything
but the loopback hit counter fails the test. One made-up public address (93.184.216.34:80) is routed to
the hit counter, so "a public host" can be fetched for real. The hit counter must see no request for a
refused URL.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import threading
from typing import Any, Iterator

import pytest
from conftest import make_image

from apet.errors import UsageError
from apet.serve.errors import ApiError
from apet.serve.fetch import MAX_REDIRECTS, refusal
from apet.serve.media import MediaLimits, resolve

PUBLIC = "93.184.216.34"
NAMES = {
    "public.example": [PUBLIC], "cdn.public.example": [PUBLIC], "other.example": [PUBLIC],
    "localhost": ["127.0.0.1", "::1"], "intranet.example": ["10.1.2.3"], "router.example": ["192.168.1.1"],
    "metadata.example": ["169.254.169.254"], "mixed.example": [PUBLIC, "172.16.0.9"],
    "v6private.example": ["fd12:3456::1"], "v6linklocal.example": ["fe80::1"], "v6loopback.example": ["::1"],
    "v6mapped.example": ["::ffff:10.0.0.1"], "multicast.example": ["239.1.2.3"], "v6multicast.example": ["ff02::1"],
    "shared.example": ["100.64.0.1"], "zero.example": ["0.0.0.0"], "sixtofour.example": ["2002:7f00:1::1"],
    "nat64.example": ["64:ff9b::a00:1"],
}


def _png() -> bytes:
    buffer = io.BytesIO()
    make_image(3).save(buffer, format="PNG")
    return buffer.getvalue()


class HitCounter:
    """A loopback HTTP server that counts every request by path."""

    def __init__(self) -> None:
        png = _png()
        hits: list[str] = []
        self.hits = hits
        redirects = {"/to-private": "http://intranet.example/cat.png", "/to-metadata":
                     "http://metadata.example/latest/meta-data", "/to-cat": "/cat.png", "/loop": "/loop",
                     "/to-other": "http://other.example/cat.png"}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                if self.path in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.redirects = redirects
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def counter() -> Iterator[HitCounter]:
    server = HitCounter()
    yield server
    server.server.shutdown()


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch, counter: HitCounter) -> list:
    """Stubbed names, guarded dials; returns the list of addresses dialled."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    counter.hits.clear()
    dials: list = []

    def getaddrinfo(host: str, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0):
        if host in NAMES:
            out = []
            for address in NAMES[host]:
                v6 = ipaddress.ip_address(address).version == 6
                out.append((socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                            (address, int(port), 0, 0) if v6 else (address, int(port))))
            return out
        try:  # a numeric host ("127.1", "2130706433", "::1") is parsed, never looked up
            return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: not in the test's table") from None

    def connect(sock: socket.socket, address: Any) -> None:
        dials.append(tuple(address[:2]))
        if tuple(address[:2]) == (PUBLIC, 80):
            address = ("127.0.0.1", counter.port)  # the made-up public host is served by the hit counter
        elif tuple(address[:2]) != ("127.0.0.1", counter.port):
            raise AssertionError(f"the test dialled {address}: only the loopback hit counter may be reached")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return dials


def _limits(**options: Any) -> MediaLimits:
    return MediaLimits(max_bytes=1 << 20, max_image_pixels=1_000_000, allow_fetch=True, fetch_timeout_s=5.0,
                       **options)


def _refused(url: str, limits: MediaLimits) -> ApiError:
    with pytest.raises(ApiError) as info:
        resolve("image", url, limits, "messages[0].content[1].image_url")
    return info.value


def test_a_public_host_is_fetched_from_the_address_that_was_checked(network, counter) -> None:
    media = resolve("image", "http://public.example/cat.png", _limits(), "p")
    assert media.kind == "image" and media.value.size == (300, 200)
    assert counter.hits == ["/cat.png"] and network == [(PUBLIC, 80)]


@pytest.mark.parametrize(("host", "why"), [
    ("127.0.0.1:{port}", "loopback"), ("localhost:{port}", "loopback"), ("[::1]:{port}", "loopback"),
    ("127.1:{port}", "loopback"), ("2130706433:{port}", "loopback"), ("[::ffff:127.0.0.1]:{port}", "loopback"),
    ("0.0.0.0:{port}", "unspecified"), ("zero.example", "unspecified"), ("intranet.example", "private"),
    ("router.example", "private"), ("metadata.example", "link-local"), ("mixed.example", "private"),
    ("v6private.example", "private"), ("v6linklocal.example", "link-local"), ("v6loopback.example", "loopback"),
    ("v6mapped.example", "private"), ("multicast.example", "multicast"), ("v6multicast.example", "multicast"),
    ("shared.example", "not a globally routable"), ("sixtofour.example", "loopback"), ("nat64.example", "private"),
])
def test_non_public_destinations_are_refused_before_any_connection(network, counter, host: str, why: str) -> None:
    error = _refused(f"http://{host.format(port=counter.port)}/cat.png", _limits())
    assert error.status == 403 and error.code == "fetch_refused", error.message
    assert why in error.message and "--allow-fetch-private" in error.message
    assert counter.hits == [] and network == []


def test_a_redirect_to_a_private_address_is_refused(network, counter) -> None:
    for path in ("/to-private", "/to-metadata"):
        error = _refused(f"http://public.example{path}", _limits())
        assert error.code == "fetch_refused" and NAMES[counter.redirects[path].split("/")[2]][0] in error.message
    assert counter.hits == ["/to-private", "/to-metadata"] and network == [(PUBLIC, 80)] * 2


def test_a_redirect_to_the_hit_counter_itself_is_refused(network, counter, monkeypatch) -> None:
    counter.redirects["/to-loopback"] = f"http://127.0.0.1:{counter.port}/cat.png"
    try:
        assert _refused("http://public.example/to-loopback", _limits()).code == "fetch_refused"
    finally:
        del counter.redirects["/to-loopback"]
    assert counter.hits == ["/to-loopback"]  # never /cat.png


def test_redirects_are_followed_and_bounded(network, counter) -> None:
    assert resolve("image", "http://public.example/to-cat", _limits(), "p").kind == "image"
    assert counter.hits == ["/to-cat", "/cat.png"]
    counter.hits.clear()
    error = _refused("http://public.example/loop", _limits())
    assert error.code == "fetch_failed" and "redirects" in error.message
    assert counter.hits == ["/loop"] * (MAX_REDIRECTS + 1)


def test_allowed_media_domains(network, counter) -> None:
    limits = _limits(allowed_media_domains=("public.example",))
    assert resolve("image", "http://cdn.public.example/cat.png", limits, "p").kind == "image"
    assert resolve("image", "http://PUBLIC.example./cat.png", limits, "p").kind == "image"
    assert counter.hits == ["/cat.png"] * 2
    for url in ("http://other.example/cat.png", "http://evilpublic.example/cat.png", f"http://{PUBLIC}/cat.png"):
        error = _refused(url, limits)
        assert error.code == "fetch_refused" and "--allowed-media-domains public.example" in error.message
    error = _refused("http://public.example/to-other", limits)  # a redirect off the list
    assert "other.example is not in --allowed-media-domains" in error.message
    assert counter.hits == ["/cat.png"] * 2 + ["/to-other"]


def test_allow_fetch_private_reaches_loopback(network, counter) -> None:
    media = resolve("image", f"http://localhost:{counter.port}/cat.png", _limits(allow_fetch_private=True), "p")
    assert media.kind == "image" and counter.hits == ["/cat.png"]
    assert network == [("127.0.0.1", counter.port)]


def test_refusal_by_address() -> None:
    public = ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8", "64:ff9b::808:808"]
    assert [refusal(ipaddress.ip_address(a)) for a in public] == [None] * len(public)
    refused = {"127.0.0.2": "loopback", "10.255.0.1": "private", "172.31.0.1": "private", "192.168.0.1": "private",
               "169.254.0.1": "link-local", "224.0.0.251": "multicast", "240.0.0.1": "reserved",
               "255.255.255.255": "", "198.18.0.1": "private", "::": "unspecified", "fe80::1": "link-local",
               "fc00::1": "private", "ff05::2": "multicast", "::ffff:169.254.169.254": "link-local",
               "2001:db8::1": "private", "2001:0:4136:e378:8000:63bf:3fff:fdd2": ""}
    for address, why in refused.items():
        reason = refusal(ipaddress.ip_address(address))
        assert reason is not None and why in reason, (address, reason)


def test_config_validates_the_fetch_options(tmp_path) -> None:
    from apet.serve.config import ServeConfig

    with pytest.raises(UsageError, match="--allow-fetch-private applies"):
        ServeConfig(tmp_path, allow_fetch_private=True)
    with pytest.raises(UsageError, match="--allowed-media-domains applies"):
        ServeConfig(tmp_path, allowed_media_domains=("a.com",))
    config = ServeConfig(tmp_path, allow_fetch=True, allowed_media_domains=("Images.Example.COM.", " b.org"))
    assert config.allowed_media_domains == ("images.example.com", "b.org")
    for bad in ("http://a.com", "a.com:80", "*.a.com", "a..com"):
        with pytest.raises(UsageError, match="not a host name"):
            ServeConfig(tmp_path, allow_fetch=True, allowed_media_domains=(bad,))


def test_https_goes_through_tls_to_the_checked_address(network, counter) -> None:
    """The hit counter speaks plain HTTP, so the TLS handshake to it fails: a clean fetch_failed, after
    dialling only the checked loopback address (with --allow-fetch-private)."""
    error = _refused(f"https://localhost:{counter.port}/cat.png", _limits(allow_fetch_private=True))
    assert error.status == 400 and error.code == "fetch_failed", error.message
    assert network == [("127.0.0.1", counter.port)] and counter.hits == []
