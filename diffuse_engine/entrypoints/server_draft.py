"""Whole-draft streaming (``"diffusing": true`` with ``"stream": true``): a chunk per denoising step whose text is
the whole current draft, replacing the previous chunk's, in the OpenAI chunk format.

Each chunk's ``choices[0].text`` (completions) or ``choices[0].delta.content`` (chat) is the draft: the canvas
decoded with every still-masked position shown as :data:`DRAFT_MASK`. Its ``draft`` field says what the text
stands for::

    {"replace": true, "step": 3, "block": 0, "tokens": [...], "committed": [true, false, ...], "revised": [4]}

``tokens``: the canvas (the mask id where masked; the whole ``max_tokens``); ``committed``: per position, whether
it holds a token (False: still masked); ``revised``: the positions a revision policy (``revision``: ``remdm``,
``wino``, ``edit``) changed in this step. The last chunk carries the final answer (ending at EOS, cut before a
stop string) and the ``finish_reason``; drafts before it are the raw canvas. With ``stream_canvas`` too, each
chunk also carries its ``canvas`` object.
"""

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .server_input import bool_field
from .server_stream import FINISH_REASONS, canvas_json, chunker, include_usage

if TYPE_CHECKING:
    from .async_engine import CanvasSnapshot, StreamOutput

DRAFT_MASK = "░"


def draft_text(tokens: list[int], mask_id: int, tokenizer: Any) -> str:
    """The canvas as text: runs of tokens decoded together (a character split over byte tokens stays whole),
    each masked position as :data:`DRAFT_MASK`. Without a tokenizer only the placeholders show."""
    pieces: list[str] = []
    run: list[int] = []
    for token in [*tokens, None]:
        if token is not None and token != mask_id:
            run.append(token)
            continue
        if run and tokenizer is not None:
            pieces.append(tokenizer.decode(run))
        run = []
        if token is not None:
            pieces.append(DRAFT_MASK)
    return "".join(pieces)


def draft_json(canvas: "CanvasSnapshot") -> dict[str, Any]:
    """The ``draft`` field of a chunk (see the module docstring)."""
    masked = set(canvas.masked)
    return {"replace": True, "step": canvas.step, "block": canvas.block, "tokens": canvas.tokens,
            "committed": [i not in masked for i in range(len(canvas.tokens))],
            "revised": sorted({position for position, _, _ in canvas.revised})}


async def draft_events(server: Any, agen: AsyncIterator["StreamOutput"], first: "StreamOutput", rid: str,
                       chat: bool, body: dict[str, Any], params: Any) -> AsyncIterator[str]:
    """The chunks of a ``diffusing`` stream of ``server`` (an :class:`OpenAIServer`; its requests stream a canvas
    snapshot per step; run inside :func:`.server_stream.guarded`)."""
    mask_id, show_canvas = server.engine.engine.model_config.mask_token_id, bool_field(body, "stream_canvas")
    event, choice = chunker(server, rid, chat)
    if chat:
        yield event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None, "logprobs": None})
    out = first
    while True:
        draft = {"draft": draft_json(out.canvas)} if out.canvas is not None else {}
        if draft and show_canvas:
            draft["canvas"] = canvas_json(out.canvas)
        if out.finished:
            server.record(out)
            finish = FINISH_REASONS.get(out.finish_reason, out.finish_reason)
            yield event(choice(out.text, finish), nfe=out.output.nfe, **draft)
            if include_usage(body):
                yield event(None, usage=server.usage(out))
            return
        if draft:
            yield event(choice(draft_text(out.canvas.tokens, mask_id, server.tokenizer), None), **draft)
        out = await agen.__anext__()
