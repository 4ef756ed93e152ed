"""OpenAI chat-completion requests -> what the runtime runs, and OpenAI's
error JSON for everything refused.

A request holds one user turn, with up to MAX_IMAGES images (its image_url
parts, in order: the runtime's list of images for one prompt, placed at the
text's <image> markers, else first; each family packs several as its
processor does): system messages are put before the question,
earlier assistant turns are refused (no multi-turn chat yet). Supported: messages
with text and image_url parts, stream, max_tokens / max_completion_tokens,
temperature, top_p, stop, seed, response_format (json_object, json_schema),
n = 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class OpenAIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    prompt: str
    image_urls: list[str]  # in the user message's order; empty for text only
    stream: bool
    options: dict[str, Any] = field(default_factory=dict)  # VLMSession.generate keywords
    model: str = ""


_KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens",
          "max_completion_tokens", "temperature", "top_p", "stop", "seed", "response_format",
          "n", "user", "presence_penalty", "frequency_penalty"}


def parse_chat(body: Any, *, default_max_tokens: int, max_tokens_limit: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise OpenAIError(400, f"unsupported parameter {unknown[0]!r}", param=unknown[0])
    if body.get("n", 1) != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n")
    for p in ("presence_penalty", "frequency_penalty"):
        if body.get(p) not in (None, 0, 0.0):
            raise OpenAIError(400, f"{p} is not supported", param=p)
    prompt, image_urls = _messages(body.get("messages"))
    opts: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not \
            1 <= max_tokens <= max_tokens_limit:
        raise OpenAIError(400, f"max_tokens must be an integer in 1..{max_tokens_limit}",
                          param="max_tokens")
    opts["max_new_tokens"] = max_tokens
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if body.get(key) is not None:
            opts[name] = body[key]
    stop = body.get("stop")
    if stop is not None:
        opts["stop"] = [stop] if isinstance(stop, str) else stop
    fmt = body.get("response_format")
    if fmt is not None:
        opts.update(_response_format(fmt))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "stream must be true or false", param="stream")
    return ChatRequest(prompt, image_urls, stream, opts, str(body.get("model") or ""))


# Images one request may hold: each is decoded, preprocessed and encoded.
MAX_IMAGES = 8


def _messages(messages) -> tuple[str, list[str]]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages must be a non-empty list", param="messages")
    system, user, images = [], None, []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                            "assistant"):
            raise OpenAIError(400, f"messages[{i}] needs a role of system, user or assistant",
                              param="messages")
        if m["role"] == "assistant":
            raise OpenAIError(400, "multi-turn conversations are not supported yet: send one "
                              "user message (and optional system messages)", param="messages")
        texts, images = _content(m.get("content"), i)
        if m["role"] in ("system", "developer"):
            if images:
                raise OpenAIError(400, "system messages cannot hold images", param="messages")
            system += texts
            continue
        if user is not None:
            raise OpenAIError(400, "send one user message per request", param="messages")
        user = " ".join(texts)
        if len(images) > MAX_IMAGES:
            raise OpenAIError(400, f"at most {MAX_IMAGES} images per request (got "
                              f"{len(images)})", param="messages")
    if user is None:
        raise OpenAIError(400, "messages need a user message", param="messages")
    prompt = " ".join(system + [user]).strip()
    if not prompt:
        raise OpenAIError(400, "the user message has no text", param="messages")
    return prompt, images


def _content(content, i: int) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise OpenAIError(400, f"messages[{i}].content must be a string or a list of parts",
                          param="messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(url)
        else:
            raise OpenAIError(400, f"messages[{i}] has an unsupported content part "
                              f"(type {kind!r}); text and image_url are supported",
                              param="messages")
    return texts, images


def _response_format(fmt) -> dict:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise OpenAIError(400, "response_format.json_schema.schema must be an object",
                              param="response_format")
        return {"json_schema": schema}
    raise OpenAIError(400, "response_format.type must be text, json_object or json_schema",
                      param="response_format")
