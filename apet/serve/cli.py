"""``apet-serve DIR`` / ``apet serve DIR``: arguments only (import-light: the HTTP stack loads on run)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from apet.contracts.io import DECODE_ATTENTION
from apet.serve.config import API_KEY_ENV, ServeConfig, media_domains


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeConfig(Path("."))
    p.add_argument("artifact", type=Path, help="directory written by apet-export (and apet-build)")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port to listen on")
    p.add_argument("--backend", default=d.backend, choices=("auto", "onnxruntime", "tensorrt", "torch"),
                   help="auto: TensorRT engines when built and a GPU is present, else ONNX Runtime")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda for tensorrt, else cpu)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="decode up to N queued requests together (<= the artifact's max_batch; greedy answers "
                        "are the same as with 1)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="with --max-batch > 1: how long the first request of a batch waits for company")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="waiting requests before new ones are answered 503 with Retry-After")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="largest request body")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest image (width x height)")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="answer length when a request gives no max_tokens (clipped to the context left)")
    p.add_argument("--allow-fetch", action="store_true",
                   help="fetch http(s) image URLs (off: only inline data URLs are read)")
    p.add_argument("--allow-fetch-private", action="store_true",
                   help="with --allow-fetch: also fetch from loopback, private, link-local and other non-public "
                        "addresses (off: refused, so clients cannot reach the server's own network; trusted "
                        "clients only)")
    p.add_argument("--allowed-media-domains", default="", metavar="DOMAINS",
                   help="with --allow-fetch: fetch only from these comma-separated hosts and their subdomains "
                        "(e.g. images.example.com,cdn.example.org)")
    p.add_argument("--fetch-timeout", type=float, default=d.fetch_timeout_s, help="seconds, with --allow-fetch")
    p.add_argument("--served-model-name", help="the model id clients send (default: from the artifact)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"answer /v1/... only to clients that send 'Authorization: Bearer KEY' (default: the "
                        f"{API_KEY_ENV} environment variable, which unlike this flag does not show in ps; unset: "
                        "no key); /health and /metrics never ask")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="onnxruntime on CUDA: run without CUDA graphs (see apet-run --no-cuda-graphs)")
    p.add_argument("--decode-attention", default=d.decode_attention, choices=DECODE_ATTENTION,
                   help="onnxruntime, --kv-cache static artifact (see apet-run --decode-attention)")
    p.add_argument("--ort-rewrites", default=d.ort_rewrites,
                   help="onnxruntime: the optional graph rewrites, e.g. default,share-weights (one copy of the LLM "
                        "weights for the prefill and the decode sessions; see apet-run --ort-rewrites)")


def run(args: argparse.Namespace) -> int:
    from apet.serve.server import serve

    # the flag if given (an empty one is refused), else the environment's key (empty there = unset)
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    serve(ServeConfig(artifact=args.artifact, host=args.host, port=args.port, backend=args.backend,
                      device=args.device, threads=args.threads, max_batch=args.max_batch,
                      batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_body_mb=args.max_body_mb,
                      max_image_pixels=args.max_image_pixels, default_max_tokens=args.default_max_tokens,
                      allow_fetch=args.allow_fetch, fetch_timeout_s=args.fetch_timeout,
                      allow_fetch_private=args.allow_fetch_private,
                      allowed_media_domains=media_domains(args.allowed_media_domains),
                      model_name=args.served_model_name, api_key=api_key,
                      cuda_graphs=not args.no_cuda_graphs,
                      decode_attention=args.decode_attention, ort_rewrites=args.ort_rewrites))
    return 0
