"""A model's stream on a script, for unit tests of what the ingress does with it: vLLM's chunk
JSON (as `request_policy.for_engine` asks for it: usage on every chunk, then the usage-only chunk),
`ModelError`s, exceptions, and a stall that lasts until the test or a cancellation ends it."""

import asyncio
import json

from serve_app.apis.model_call import ModelCall
from serve_app.models.outputs import ModelError

PROMPT_TOKENS = 5


def chunk(
    content: str | None = None,
    finish: str | None = None,
    completion: int = 0,
    *,
    role: bool = False,
    choices: bool = True,
    usage: bool = True,
) -> str:
    """One vLLM chat chunk's JSON, as the model replica hands it on."""
    delta: dict = {"content": content} if content is not None else {}
    if role:
        delta = {"role": "assistant", "content": ""}
    payload: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    payload["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []
    if usage:
        payload["usage"] = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion,
        }
    return json.dumps(payload)


def answer_script(*words: str, finish: str | None = "stop") -> list[str]:
    """vLLM's stream for an answer of these words: the role chunk, one chunk per word, the
    finishing chunk (unless `finish` is None), then the usage-only chunk."""
    script = [chunk(role=True)]
    script += [chunk(word, None, index + 1) for index, word in enumerate(words)]
    if finish is not None:
        script.append(chunk("", finish, len(words)))
    script.append(chunk(completion=len(words), choices=False))
    return script


class Stall:
    """A script item: the stream waits here until `resume` is set (or forever)."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.resume = asyncio.Event()


class ScriptedStream:
    """A `ModelStream`: yields its items; an exception item is raised, a `Stall` waits."""

    def __init__(self, items: list) -> None:
        self._items = list(items)
        self.cancelled = 0
        self.taken = 0

    def __aiter__(self) -> "ScriptedStream":
        return self

    async def __anext__(self):
        while self._items:
            item = self._items.pop(0)
            if isinstance(item, Stall):
                item.reached.set()
                await item.resume.wait()
                continue
            self.taken += 1
            if isinstance(item, BaseException):
                raise item
            return item
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled += 1


def model_call(script: list, headers: dict[str, str] | None = None) -> ModelCall:
    """The call as `ModelCalls.start` returns it: the first output already read."""
    first, *rest = script
    assert not isinstance(first, (ModelError, BaseException, Stall)), "the first output decides the status"
    return ModelCall(first=first, rest=ScriptedStream(rest), headers=headers or {})
