"""The server's knobs and limits, validated once at start-up (every limit is a flag whose name the
4xx messages quote, so a refused client learns what to change)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from apet.contracts.io import DECODE_ATTENTION
from apet.errors import UsageError, check_range
from apet.media.images import MAX_PIXELS
from apet.runtime.backends.ort_options import graph_rewrites

API_KEY_ENV = "APET_API_KEY"  # --api-key's default: a key in the environment stays out of ps and shell history


@dataclass(frozen=True)
class ServeConfig:
    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    device: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads
    max_batch: int = 1  # requests decoded together (<= the artifact's max_batch)
    batch_wait_ms: float = 5.0  # how long a batch waits for company once its first request is taken
    max_queue: int = 64  # requests waiting (not running) before new ones get 503
    max_body_mb: float = 20.0
    max_image_pixels: int = 16_000_000
    default_max_tokens: int = 256  # when a request gives no max_tokens (clipped to the context left)
    allow_fetch: bool = False  # http(s) image URLs: off, the device may be offline or must not call out
    fetch_timeout_s: float = 10.0
    allow_fetch_private: bool = False  # with allow_fetch: loopback/private/link-local hosts too (trusted clients)
    allowed_media_domains: tuple[str, ...] = ()  # with allow_fetch: only these hosts and their subdomains
    model_name: str | None = None  # the id clients send as "model" (default: from the artifact)
    # clients send it as "Authorization: Bearer KEY" on /v1/...; None: no key asked (/health and /metrics never ask)
    api_key: str | None = field(default=None, repr=False)
    # the ONNX Runtime backend's forms, as apet-run takes them (docs/architecture.md)
    cuda_graphs: bool = True  # on CUDA: decode, vision and the prompt replayed as CUDA graphs
    decode_attention: str = "auto"  # a --kv-cache static artifact: auto | gqa | graph
    ort_rewrites: str = "default"  # the optional in-memory graph rewrites (ort_options.GRAPH_REWRITES)

    def __post_init__(self) -> None:
        check_range("--port", self.port, 0, 65535)
        check_range("--max-batch", self.max_batch, 1, 1024)
        check_range("--batch-wait-ms", self.batch_wait_ms, 0.0, 10_000.0)
        check_range("--max-queue", self.max_queue, 1, 1_000_000)
        check_range("--max-body-mb", self.max_body_mb, 0.001, 4096.0)
        check_range("--max-image-pixels", self.max_image_pixels, 1, MAX_PIXELS,
                    fix=f"pass at most {MAX_PIXELS:,} (the decoder's own decompression-bomb limit)")
        check_range("--default-max-tokens", self.default_max_tokens, 1, 1_000_000)
        check_range("--fetch-timeout", self.fetch_timeout_s, 0.1, 600.0)
        if (self.allow_fetch_private or self.allowed_media_domains) and not self.allow_fetch:
            flag = "--allow-fetch-private" if self.allow_fetch_private else "--allowed-media-domains"
            raise UsageError(f"{flag} applies to fetched URLs, which are off", "add --allow-fetch, or leave "
                             f"{flag} out")
        object.__setattr__(self, "allowed_media_domains", media_domains(self.allowed_media_domains))
        if self.decode_attention not in DECODE_ATTENTION:
            raise UsageError(f"--decode-attention {self.decode_attention!r} is not one of "
                             f"{', '.join(DECODE_ATTENTION)}", "pass auto (gqa on CUDA for fp16 op-attention "
                             "artifacts), gqa or graph")
        try:
            graph_rewrites(self.ort_rewrites)
        except ValueError as err:
            raise UsageError(f"--ort-rewrites: {err}", "pass default, none, or a comma list of the known names") \
                from err
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise UsageError(f"--api-key (or {API_KEY_ENV}) is empty or has spaces around it",
                             "pass the key itself, or leave it out to serve without one")
        if self.model_name is not None and not self.model_name.strip():
            raise UsageError("--served-model-name is empty", "pass a name, or leave it out to use the artifact's")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def media_domains(domains: "tuple[str, ...] | str") -> tuple[str, ...]:
    """``--allowed-media-domains a.com,B.org.`` -> ("a.com", "b.org"): host names only (no scheme, port, path
    or wildcard: a domain admits its subdomains already)."""
    items = domains.split(",") if isinstance(domains, str) else domains
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name = item.strip(".").lower()
        if not name.isascii():
            name = name.encode("idna").decode("ascii")
        if not name or any(c in name for c in "/:*@ ") or ".." in name:
            raise UsageError(f"--allowed-media-domains entry {item!r} is not a host name",
                             "list domains like images.example.com,cdn.example.org (subdomains are included)")
        out.append(name)
    return tuple(out)
