"""Reading Server-Sent Events the way the Livepeer gateway does: `data:` lines, JSON until
`[DONE]`."""

import json


def events(body: str) -> list[str]:
    """The `data:` payloads, in order; every event must be one data line and a blank line. SSE
    comments (`: keep-alive`) are skipped, as the gateway skips every line but `data:` ones."""
    blocks = body.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    payloads = []
    for block in blocks[:-1]:
        if block.startswith(":"):
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        payloads.append(block.removeprefix("data: "))
    return payloads


def json_chunks(body: str) -> list[dict]:
    payloads = events(body)
    assert payloads[-1] == "[DONE]", "the stream must end with data: [DONE]"
    return [json.loads(p) for p in payloads[:-1]]
