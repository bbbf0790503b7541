"""OpenAI's chat-completions request -> a validated :class:`ChatRequest` (no pixels decoded here).

What the artifact can do decides what is accepted, and each refusal names the field and the fix:

* one medium per request (the graphs splice one image or video at the template's placeholder), from an
  ``image_url`` part (or ``video_url`` for video families); where the part sits in the text is ignored;
* ``system``/``developer`` and ``user`` messages; their text parts are joined with newlines into the
  prompt the artifact's single-turn template wraps (a single user text is passed as is, so the server
  answers exactly what ``apet-run --prompt`` answers). Earlier ``assistant`` turns are refused: the
  templates are single-turn;
* ``max_tokens``/``max_completion_tokens``, ``temperature`` (default 0 = greedy, like ``apet-run``;
  OpenAI's default is 1), ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``;
  ``n`` > 1, ``logprobs`` and ``tools`` are refused; other OpenAI fields are accepted and ignored;
* prompt tokens (text + the most visual tokens a request can need) plus ``max_tokens`` must fit the
  artifact's ``max_context`` — checked before queueing, so an oversized request never takes a slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from apet.errors import InputError
from apet.models.prompt import PromptEncoder
from apet.runtime.sampling import GenerationConfig
from apet.serve.errors import ApiError, bad_request

PART_TYPES = {"image_url": "image", "video_url": "video"}
MAX_STOP = 16


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the served artifact."""

    model_id: str
    family: str
    media: str  # "image" | "video"
    max_context: int
    visual_tokens: int  # the most visual tokens one request can put into the prompt


@dataclass(frozen=True)
class MediaPart:
    kind: str  # "image" | "video"
    url: str
    param: str  # where it sat, for messages: messages[0].content[1].image_url.url


@dataclass(frozen=True)
class ChatRequest:
    """What the worker needs (the media part's URL, possibly megabytes of base64, is not kept)."""

    model: str
    prompt: str
    config: GenerationConfig
    prompt_tokens: int  # text + the visual budget: what the context check and the batcher count
    stream: bool = False
    include_usage: bool = False


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})",
                          "send a JSON object with Content-Type: application/json", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise bad_request(f"the request body is a JSON {type(payload).__name__}, not an object",
                          'send {"model": ..., "messages": [...]}', code="invalid_json")
    return payload


def parse_chat(payload: dict[str, Any], facts: ModelFacts, encoder: PromptEncoder,
               default_max_tokens: int) -> tuple[ChatRequest, MediaPart]:
    model = payload.get("model", facts.model_id)
    if model != facts.model_id:
        raise ApiError(404, f"model {model!r} is not served here — this server serves {facts.model_id!r} "
                       "(GET /v1/models)", "model_not_found", "model")
    _refuse_unsupported(payload)
    prompt, media = _messages(payload.get("messages"), facts)
    max_tokens = _max_tokens(payload)
    prompt_tokens = _prompt_tokens(encoder, prompt, facts)
    max_tokens = _fit_context(prompt_tokens, max_tokens, facts, default_max_tokens)
    config = _generation_config(payload, max_tokens)
    stream = _typed(payload, "stream", bool, False)
    options = _typed(payload, "stream_options", dict, None) or {}
    include_usage = bool(options.get("include_usage", False))
    return ChatRequest(facts.model_id, prompt, config, prompt_tokens, stream, include_usage), media


# -- fields -----------------------------------------------------------------------------------------
def _typed(payload: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = payload.get(name)
    if value is None:
        return default
    numeric = kind in (int, float) or kind == (int, float)
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        wanted = kind.__name__ if isinstance(kind, type) else "number"
        raise bad_request(f"{name} must be a {wanted}, got {type(value).__name__}", f"pass {name} as a {wanted}",
                          param=name, code="invalid_type")
    return value


def _refuse_unsupported(payload: dict[str, Any]) -> None:
    if _typed(payload, "n", int, 1) != 1:
        raise bad_request("n > 1 is not supported", "send one request per answer", param="n")
    if payload.get("logprobs"):
        raise bad_request("logprobs are not supported", "leave logprobs out", param="logprobs")
    if payload.get("tools") or payload.get("functions"):
        raise bad_request("tools/function calling are not supported", "leave tools out", param="tools")
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise bad_request(f"response_format {fmt.get('type')!r} is not supported", "leave response_format out",
                          param="response_format")


def _messages(messages: Any, facts: ModelFacts) -> tuple[str, MediaPart]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", 'send [{"role": "user", "content": [...]}]',
                          param="messages")
    texts: list[str] = []
    media: list[MediaPart] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} is not an object", 'send {"role": ..., "content": ...}', param=where)
        role = message.get("role")
        if role in ("assistant", "tool", "function"):
            raise bad_request(f"{where} is an {role!r} turn: multi-turn conversations are not supported (the "
                              "artifact's prompt template is single-turn)",
                              "send the question and one image in a single user message", param=f"{where}.role")
        if role not in ("system", "developer", "user"):
            raise bad_request(f"{where}.role {role!r} is unknown", "use system, developer or user",
                              param=f"{where}.role")
        _content(message.get("content"), where, role, texts, media)
    if not media:
        kind = facts.media
        raise bad_request(f"the request has no {kind}: this model answers about one {kind} per request",
                          f'add a content part {{"type": "{kind}_url", "{kind}_url": {{"url": '
                          f'"data:{kind}/...;base64,..."}}}} to the user message', param="messages",
                          code="missing_media")
    if len(media) > 1:
        raise bad_request(f"the request has {len(media)} media parts; this artifact takes one {facts.media} per "
                          "request", f"send one {facts.media} (one request per {facts.media})", param=media[1].param)
    if media[0].kind != facts.media:
        raise bad_request(f"{media[0].param} is a {media[0].kind}, but {facts.family} takes a {facts.media}",
                          f"send a {facts.media}_url part", param=media[0].param, code="unsupported_media_type")
    if not texts:
        raise bad_request("the request has no text", 'add {"type": "text", "text": "your question"}',
                          param="messages", code="missing_text")
    return "\n".join(texts), media[0]


def _content(content: Any, where: str, role: str, texts: list[str], media: list[MediaPart]) -> None:
    if isinstance(content, str):
        texts.append(content)
        return
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "see the OpenAI chat format",
                          param=f"{where}.content")
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", "send the text as a string", param=f"{at}.text")
            texts.append(part["text"])
        elif kind in PART_TYPES:
            if role != "user":
                raise bad_request(f"{at} is a {kind} part in a {role} message", "put media in the user message",
                                  param=at)
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at}.{kind}.url is missing", f'send {{"type": "{kind}", "{kind}": {{"url": '
                                  '"data:...;base64,..."}}', param=f"{at}.{kind}.url")
            media.append(MediaPart(PART_TYPES[kind], url, f"{at}.{kind}.url"))
        else:
            raise bad_request(f"{at}.type {kind!r} is not supported", "use text, image_url or video_url parts",
                              param=f"{at}.type")


def _max_tokens(payload: dict[str, Any]) -> int | None:
    name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    value = _typed(payload, name, int, None)
    if value is not None and value < 1:
        raise bad_request(f"{name}={value} must be at least 1", f"pass {name} >= 1", param=name)
    return value


def _prompt_tokens(encoder: PromptEncoder, prompt: str, facts: ModelFacts) -> int:
    try:
        before, after = encoder.split(prompt)
    except InputError as exc:
        raise bad_request(exc.what, exc.fix or "fix the prompt", param="messages", code="invalid_prompt") from exc
    return len(before) + len(after) + facts.visual_tokens


def _fit_context(prompt_tokens: int, max_tokens: int | None, facts: ModelFacts, default: int) -> int:
    room = facts.max_context - prompt_tokens
    if room < 1:
        raise bad_request(f"the prompt needs {prompt_tokens} tokens (incl. up to {facts.visual_tokens} visual), "
                          f"leaving no room in the artifact's max_context {facts.max_context}",
                          "shorten the prompt, or re-export the artifact with a larger --max-context",
                          param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return min(default, room)
    if max_tokens > room:
        raise bad_request(f"the prompt needs {prompt_tokens} tokens (incl. up to {facts.visual_tokens} visual) "
                          f"and max_tokens asks for {max_tokens} more: {prompt_tokens + max_tokens} is over the "
                          f"artifact's max_context {facts.max_context}",
                          f"lower max_tokens to {room} or less, shorten the prompt, or re-export the artifact "
                          "with a larger --max-context", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _generation_config(payload: dict[str, Any], max_tokens: int) -> GenerationConfig:
    temperature = float(_typed(payload, "temperature", (int, float), 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature={temperature} is outside [0, 2]", "0 is greedy", param="temperature")
    top_p = float(_typed(payload, "top_p", (int, float), 1.0))
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p={top_p} is outside (0, 1]", "1 disables nucleus sampling", param="top_p")
    seed = _typed(payload, "seed", int, None)
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise bad_request(f"seed={seed} is outside [0, 2^63)", "pass a non-negative integer seed", param="seed")
    stop = payload.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them",
                          'e.g. "stop": ["\\n"]', param="stop")
    return GenerationConfig(max_tokens, temperature, top_p, seed, tuple(stops))
