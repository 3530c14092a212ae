"""What the fuzz tests send and what they hold every answer to.

The bodies are mostly the routes' own shapes with any field swapped for a value of another JSON
type (nested junk, numbers past 64 bits or a double, unicode), and sometimes not JSON at all:
random bytes, bytes that are not UTF-8, truncated JSON, NaN and Infinity, which JSON's grammar
lacks. A client's words that the test engine reads as orders ("FAIL AT START", "WAIT …",
tests/fake_engine.py) are never generated: they fail on purpose.

Every answer must be below 500; an error must be in its endpoint's shape (serve_app/errors.py)
with the request id of its `x-request-id` header; and no answer may show the server's insides
(a traceback, a file path, an exception's or a model class's name) unless the request itself
held those words.
"""

import json
import re
from collections import Counter
from typing import Literal
from urllib.parse import urlencode

import httpx
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

Api = Literal["livepeer", "openai", "anthropic"]

STEERING = ("FAIL", "RETRYABLE", "STALL", "NO CHOICES", "WAIT")


def fuzz_settings(examples: int, *, shrink: bool = True) -> settings:
    """Reproducible runs (derandomized, no example database); over HTTP, no shrinking, which would
    replay hundreds of slow requests to minimise one failure (the first failing example is
    reported as it was generated)."""
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if shrink else (Phase.explicit, Phase.generate)
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _plain(text: str) -> bool:
    return not any(word in text.upper() for word in STEERING)


texts = st.text(st.characters(codec="utf-8"), max_size=24).filter(_plain)
"""Any Unicode a client can send (no lone surrogates: UTF-8 cannot carry them)."""
big_numbers = st.sampled_from([2**63, 2**64 + 1, 10**40, -(10**40), 1e308, -1e308, 5e-324])
numbers = st.one_of(
    st.integers(-3, 300), st.floats(-1e6, 1e6, allow_nan=False), big_numbers, st.sampled_from([0, 1, 2, 64, 65])
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
"""Any JSON value, nested."""


def either(*good: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: of its own type, or of any other type."""
    return st.one_of(*good, junk)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, in proportion to its weight (`one_of` leans to its first ones)."""
    picks = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(picks) - 1).flatmap(lambda pick: picks[pick])


def families(build) -> st.SearchStrategy:
    """Bodies as a client means them (`build(st.one_of)`: every field of its own type, so that
    many reach the engine), twice as often as bodies with any field of any type (`build(either)`)."""
    return weighted((2, build(st.one_of)), (1, build(either)))


extras = st.dictionaries(texts, junk, max_size=2)
"""Fields the routes do not know."""


def with_extras(bodies: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.builds(lambda body, extra: extra | body, bodies, extras)


def _messages(field, roles: list[str]) -> st.SearchStrategy:
    text_part = st.fixed_dictionaries({"type": st.just("text"), "text": field(texts)})
    other_part = st.fixed_dictionaries(
        {"type": field(st.sampled_from(["image_url", "input_audio", "refusal", "thinking", "video_url", "file", ""]))},
        optional={"image_url": field(st.fixed_dictionaries({"url": field(texts)})), "refusal": junk, "text": junk},
    )
    parts = st.one_of(text_part, text_part, text_part, other_part, junk) if field is either else text_part
    function = st.fixed_dictionaries({"name": field(texts), "arguments": field(texts)})
    tool_call = st.fixed_dictionaries(
        {"id": field(texts), "type": field(st.just("function")), "function": field(function)}
    )
    wrong = {"name": field(texts), "tool_calls": field(st.lists(tool_call, max_size=2)), "tool_call_id": junk}
    message = st.fixed_dictionaries(
        {
            "role": field(st.sampled_from(roles if field is st.one_of else [*roles, "tool", "wizard", ""])),
            "content": field(texts, st.lists(parts, max_size=3), *([st.none()] if field is either else [])),
        },
        optional=wrong if field is either else {},
    )
    return field(st.lists(field(message), min_size=1, max_size=4), *([st.just([])] if field is either else []))


def _llm_body(field) -> st.SearchStrategy[dict]:
    wide = field is either
    return st.fixed_dictionaries(
        {"messages": _messages(field, ["system", "user", "assistant"])},
        optional={
            "model": field(st.sampled_from(["", "fake-a", "a", "fake-b", *(["nope"] if wide else [])])),
            "temperature": field(numbers if wide else st.floats(0, 2)),
            "max_tokens": field(numbers if wide else st.integers(1, 64)),
            "top_p": field(numbers if wide else st.floats(0, 1, exclude_min=True)),
            "top_k": field(numbers if wide else st.sampled_from([-1, 1, 40])),
            "stream": field(st.booleans()),
        },
    )


llm_bodies = with_extras(families(_llm_body))
"""`/llm` bodies: its seven fields (docs/livepeer-contract.md)."""


def _chat_body(field) -> st.SearchStrategy[dict]:
    wide = field is either
    tool = st.fixed_dictionaries(
        {"type": field(st.just("function")), "function": field(st.fixed_dictionaries({"name": field(texts)}))}
    )
    count = numbers if wide else st.integers(1, 64)
    optional = {
        "model": field(st.sampled_from(["fake-a", "a", "fake-b", *(["nope"] if wide else [])])),
        "temperature": field(numbers if wide else st.floats(0, 2)),
        "max_tokens": field(count),
        "n": field(numbers if wide else st.integers(1, 2)),
        "stop": field(texts, st.lists(texts, max_size=3)),
        "seed": field(numbers if wide else st.integers(0, 2**63 - 1)),
        "logprobs": field(st.booleans()),
        "tools": field(st.lists(tool, min_size=1, max_size=2)),
        "tool_choice": field(st.sampled_from(["none", "auto"])),
        "response_format": field(st.fixed_dictionaries({"type": field(st.sampled_from(["text", "json_object"]))})),
    }
    if wide:
        optional |= {
            "max_completion_tokens": field(count),
            "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
            "top_logprobs": field(numbers),
            "logit_bias": field(st.dictionaries(texts, numbers, max_size=2)),
            "tool_choice": field(
                st.sampled_from(["none", "auto", "required"]), st.fixed_dictionaries({"function": junk})
            ),
            "structured_outputs": junk,
            "user": junk,
        }
    streamed = st.fixed_dictionaries(
        {"stream": st.just(True)}, optional={"stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
    )
    return st.builds(
        lambda body, stream: body | stream,
        st.fixed_dictionaries(
            {"messages": _messages(field, ["system", "developer", "user", "assistant"])}, optional=optional
        ),
        st.one_of(st.just({}), streamed, st.fixed_dictionaries({"stream": field(st.booleans())})),
    )


chat_bodies = with_extras(families(_chat_body))
"""`/v1/chat/completions` bodies: OpenAI's common fields, vLLM's structured outputs."""


def _completion_body(field) -> st.SearchStrategy[dict]:
    wide = field is either
    token_ids = st.lists(st.integers(0, 49151) if not wide else numbers, min_size=1, max_size=4)
    prompt = field(
        texts, st.lists(texts, min_size=1, max_size=2), token_ids, st.lists(token_ids, min_size=1, max_size=2)
    )
    count = numbers if wide else st.integers(1, 64)
    optional = {
        "model": field(st.sampled_from(["fake-a", "a", *(["nope"] if wide else [])])),
        "max_tokens": field(count),
        "n": field(numbers if wide else st.integers(1, 2)),
        "echo": field(st.booleans()),
        "logprobs": field(numbers if wide else st.integers(0, 2)),
        "stop": field(texts, st.lists(texts, max_size=3)),
        "stream": field(st.booleans()),
        "suffix": field(texts),
    }
    if wide:
        optional |= {"prompt_embeds": junk, "stream_options": junk, "user": junk}
    return st.fixed_dictionaries({"prompt": prompt}, optional=optional)


completion_bodies = with_extras(families(_completion_body))
"""`/v1/completions` bodies: a prompt of text or token ids, alone or in a batch."""


def _messages_body(field) -> st.SearchStrategy[dict]:
    wide = field is either
    return st.fixed_dictionaries(
        {
            "model": field(st.sampled_from(["fake-a", "a", *(["nope"] if wide else [])])),
            "messages": _messages(field, ["user", "assistant"]),
            "max_tokens": field(numbers if wide else st.integers(1, 64)),
        },
        optional={
            "system": field(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}))),
            "temperature": field(numbers if wide else st.floats(0, 1)),
            "stop_sequences": field(st.lists(texts, max_size=2)),
            "stream": field(st.booleans()),
            "top_k": field(numbers if wide else st.integers(1, 40)),
        },
    )


messages_bodies = with_extras(families(_messages_body))
"""Anthropic `/v1/messages` bodies: a conversation, `max_tokens`, a system prompt."""


def _responses_body(field) -> st.SearchStrategy[dict]:
    wide = field is either
    return st.fixed_dictionaries(
        {"input": field(texts, _messages(field, ["system", "developer", "user", "assistant"]))},
        optional={
            "model": field(st.sampled_from(["fake-a", "a", *(["nope"] if wide else [])])),
            "instructions": field(texts),
            "max_output_tokens": field(numbers if wide else st.integers(1, 64)),
            "temperature": field(numbers if wide else st.floats(0, 2)),
            "stream": field(st.booleans()),
            "store": field(st.booleans()),
            "previous_response_id": field(texts),
        },
    )


responses_bodies = with_extras(families(_responses_body))
"""`/v1/responses` bodies: an input as text or messages, and the fields that need stored state."""

tokenize_bodies = with_extras(
    families(
        lambda field: st.one_of(
            st.fixed_dictionaries(
                {"prompt": field(texts)}, optional={"add_special_tokens": field(st.booleans()), "model": field(texts)}
            ),
            st.fixed_dictionaries(
                {"messages": _messages(field, ["system", "user", "assistant"])},
                optional={"add_generation_prompt": field(st.booleans())},
            ),
            st.fixed_dictionaries({"tokens": field(st.lists(st.integers(0, 49151), max_size=4), numbers)}),
        )
    )
)
"""`/tokenize` bodies (a prompt, or messages) and `/detokenize` ones (token ids)."""


# The admin routes' bodies and queries.

ADMIN_KEY_NAME = "fake-admin"
"""The config's admin key of the app the admin routes are fuzzed on (tests/conftest.py)."""
KNOWN_NAMES = ["acme", "beta", "k.1", "a" * 100, "fake", ADMIN_KEY_NAME]
"""Names that keys and tenants are made with, and then changed, rotated or deleted by; and the
config's keys, which no change may take."""
names = st.one_of(st.sampled_from(KNOWN_NAMES), st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True))
path_names = st.one_of(names, st.sampled_from(["a" * 101, "x/y", "%2F", "ü"]), texts).filter(
    lambda name: name not in ("", ".", "..")
)
"""Any string in a path but those a URL cannot hold as a segment."""
BUDGETS = ("tokens_per_day", "tokens_per_month", "spend_per_day", "spend_per_month")


def _limits(field) -> st.SearchStrategy:
    count = numbers if field is either else st.integers(1, 10**6)
    budgets = {name: field(count) for name in BUDGETS}
    optional = {name: field(count) for name in ("requests_per_minute", "tokens_per_minute", "concurrent_requests")}
    soft = field(st.fixed_dictionaries({}, optional=budgets))
    return field(st.fixed_dictionaries({}, optional=optional | budgets | {"soft": soft}))


def _key_fields(field) -> dict[str, st.SearchStrategy]:
    wide = field is either
    times = ["2030-01-01T00:00:00Z", "2099-12-31"]
    times += ["2020-01-01", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "soon"] if wide else []
    return {
        "tenant": field(names, st.none()),
        "models": field(st.lists(field(st.sampled_from(["*", "fake-a", "fake*", *(["nope"] if wide else [])])))),
        "scopes": field(st.lists(field(st.sampled_from(["chat", "admin", *(["root"] if wide else [])])), min_size=1)),
        "expires_at": field(st.sampled_from(times), *([numbers] if wide else [])),
        "limits": _limits(field),
        "metadata": field(st.dictionaries(texts, field(texts), max_size=3)),
    }


new_key = with_extras(
    families(lambda field: st.fixed_dictionaries({"name": field(names)}, optional=_key_fields(field)))
)
key_change = with_extras(
    families(lambda field: st.fixed_dictionaries({}, optional=_key_fields(field) | {"disabled": field(st.booleans())}))
)
rotation = families(lambda field: field(st.fixed_dictionaries({}, optional={"grace_s": field(st.integers(0, 60))})))
new_tenant = with_extras(
    families(
        lambda field: st.fixed_dictionaries(
            {"name": field(names)},
            optional={"limits": _limits(field), "metadata": field(st.dictionaries(texts, texts))},
        )
    )
)
tenant_change = with_extras(
    families(
        lambda field: st.fixed_dictionaries(
            {}, optional={"limits": _limits(field), "disabled": field(st.booleans()), "metadata": junk}
        )
    )
)
query_values = st.one_of(
    texts,
    numbers.map(str),
    st.sampled_from(["2026-01-01", "0001-01-01T00:00:00+14:00", "nan", "1e400", "-1", "key,tenant,model,day", "csv"]),
    st.sampled_from(["-99999999999999999999999", "99999999999999999999", "0", "1001", "٣", "fake", "fake-a"]),
)
usage_query = st.dictionaries(
    st.sampled_from(["since", "until", "key", "tenant", "model", "group_by", "format", "other"]),
    query_values,
    max_size=4,
).map(urlencode)
raw_queries = st.sampled_from(["since=%FF%FE", "key=%00", "group_by=%E2%80%AE", "limit=%FF", "since=&until="])
audit_query = st.one_of(st.dictionaries(st.just("limit"), query_values).map(urlencode), raw_queries)


def not_json() -> st.SearchStrategy[bytes]:
    """Bytes no JSON parser should take, or JSON that only a lax one would."""
    return st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=1, max_size=16).map(lambda raw: b'{"messages": "' + raw + b'"}'),
        st.sampled_from([b"", b"{", b"[", b"null", b'{"messages": NaN}', b'{"temperature": Infinity}', b"\xff\xfe{}"]),
        st.sampled_from([b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}']),
        st.sampled_from([b'{"messages": [{"role": "user", "content": "\\ud800"}]}']),
        st.builds(lambda value, cut: json.dumps(value).encode()[:cut], junk, st.integers(1, 40)),
    )


def encoded(bodies: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Most bodies as JSON (unicode kept as it is, so that an answer that quotes it can be told
    from one that leaks), the rest not JSON or not an object."""
    as_json = bodies.map(lambda body: json.dumps(body, ensure_ascii=False).encode())
    other = st.one_of(not_json(), junk.map(lambda body: json.dumps(body).encode()))
    return weighted((8, as_json), (2, other))


Answer = tuple[str, int]


class Tally:
    """The count of answers by endpoint and status, for the run's closing line."""

    def __init__(self) -> None:
        self.counts: Counter[Answer] = Counter()

    def add(self, endpoint: str, response: httpx.Response) -> None:
        self.counts[endpoint, response.status_code] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        by_endpoint: dict[str, dict[int, int]] = {}
        for (endpoint, status), count in sorted(self.counts.items()):
            by_endpoint.setdefault(endpoint, {})[status] = count
        statuses = Counter[int]()
        for (_, status), count in self.counts.items():
            statuses[status] += count
        lines = [f"fuzz: {self.total()} requests, by status {dict(sorted(statuses.items()))}"]
        lines += [f"  {endpoint}: {counts}" for endpoint, counts in by_endpoint.items()]
        return "\n".join(lines)


TRACES = [
    re.compile(pattern)
    for pattern in (
        r"Traceback",
        r'File "',
        r"line \d+, in ",
        r"(?:/[\w.-]+)+\.py\b",
        r"site-packages",
        r"\b(?:vllm|ray|serve_app|pydantic|pydantic_core|starlette|fastapi|cluster)\.[a-z_]+",
        r"\bobject at 0x[0-9a-f]+",
        r"__\w+__",
    )
]
"""A traceback, a path to a module, a module's name, an object's repr, dunder names: in no
answer at all."""
NAMES = [
    re.compile(pattern)
    for pattern in (
        r"(?<![\\\w])[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b",
        r"\b\w+(?:Error|Exception)\b",
        r"function-(?:wrap|after|before|plain)\[",
    )
]
"""A class's name (CamelCase: `RayTaskError`, `ValidationError`, `ChatCompletionUserMessageParam`,
`ValidatorIterator`) and pydantic's names for its validators: in no error's message (a success
carries the server's random secrets and ids, which may read as CamelCase)."""


def leaks(answer: str, sent: str, patterns: list[re.Pattern] = TRACES + NAMES) -> list[str]:
    """What in the answer looks like the server's insides and was not in the request."""
    return [match for pattern in patterns for match in pattern.findall(answer) if match not in sent]


def check_error(response: httpx.Response, api: Api, sent: bytes) -> None:
    """An error answer: the endpoint's shape, its request id, and nothing internal in its text."""
    body = response.json()
    if api == "livepeer":
        assert set(body) == {"detail"} and set(body["detail"]) == {"msg", "request_id"}, body
        message, request_id = body["detail"]["msg"], body["detail"]["request_id"]
    elif api == "anthropic":
        assert set(body) == {"type", "error", "request_id"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["type"], body
        message, request_id = body["error"]["message"], body["request_id"]
    else:
        assert set(body) == {"error", "request_id"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] == response.status_code and body["error"]["type"], body
        message, request_id = body["error"]["message"], body["request_id"]
    assert isinstance(message, str) and message, body
    assert request_id == response.headers["x-request-id"], body
    found = leaks(message, sent.decode("utf-8", "replace"))
    assert not found, (found, message)


def check_answer(response: httpx.Response, api: Api, sent: bytes = b"") -> None:
    """Any answer: never a server error; errors checked as errors; a success's text (JSON or a
    stream) holds nothing internal either."""
    assert response.status_code < 500, (response.status_code, response.text[:2000], sent[:2000])
    if response.status_code >= 400:
        check_error(response, api, sent)
        return
    found = leaks(response.text, sent.decode("utf-8", "replace"), TRACES)
    assert not found, (found, response.text[:2000])
