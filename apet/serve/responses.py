"""Response bodies in OpenAI's shapes, plus ``usage.visual_tokens`` and the ``apet`` extension object.

``apet`` (in a completion, and in a stream's last chunk) tells a deployer what ApET did for this request:
time to first token as the client saw it (queue wait included) and as the pipeline measured it, decode
speed, the visual tokens the LLM saw and which of the vision tower's tokens were kept, the batch it rode
in, and the answer's token ids (for checking against ``apet-run --json``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from apet.runtime.pipeline import Result
from apet.serve.protocol import ModelFacts
from apet.serve.scheduler import Done

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_tokens(result: Result) -> int:
    """Tokens generated, the end-of-sequence token included (it is sampled like any other)."""
    return len(result.token_ids) + (1 if result.finish_reason == "eos" else 0)


def usage(done: Done) -> dict[str, int]:
    stats, new = done.result.stats, completion_tokens(done.result)
    prompt = int(stats.prompt_tokens[done.row])  # stats are per batch, one entry per row
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new,
            "visual_tokens": int(stats.visual_tokens[done.row])}


def apet_extension(done: Done, facts: ModelFacts) -> dict[str, Any]:
    stats = done.result.stats
    return {
        "ttft_ms": round(done.queue_ms + stats.ttft_ms, 3),
        "queue_ms": round(done.queue_ms, 3),
        "pipeline_ttft_ms": round(stats.ttft_ms, 3),
        "vision_ms": round(stats.vision_ms, 3),
        "prefill_ms": round(stats.prefill_ms, 3),
        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 3),
        "visual_tokens": int(stats.visual_tokens[done.row]),
        "keep_index": done.result.keep_index,
        "token_ids": done.result.token_ids,
        "batch": done.batch,
        "backend": stats.backend,
        "family": facts.family,
    }


def completion(request_id: str, done: Done, facts: ModelFacts) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": facts.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.result.text},
                     "finish_reason": FINISH[done.result.finish_reason], "logprobs": None}],
        "usage": usage(done), "apet": apet_extension(done, facts),
    }


def chunk(request_id: str, created: int, facts: ModelFacts, delta: dict[str, Any], finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": facts.model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}


def usage_chunk(request_id: str, created: int, facts: ModelFacts, done: Done) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": facts.model_id,
            "choices": [], "usage": usage(done)}


def models(facts: ModelFacts, created: int, details: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": [model(facts, created, details)]}


def model(facts: ModelFacts, created: int, details: dict[str, Any]) -> dict[str, Any]:
    return {"id": facts.model_id, "object": "model", "created": created, "owned_by": "apet",
            "family": facts.family, "apet": details}
