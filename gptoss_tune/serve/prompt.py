"""A chat-completions request -> harmony prompt tokens, with the renderer training uses."""

from __future__ import annotations

from openai_harmony import RenderConversationConfig, Role

from gptoss_tune.data.harmony import to_harmony_conversation
from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError
from gptoss_tune.serve.openai_schema import ApiError, ChatCompletionRequest


def _echoed(messages: list) -> list:
    """Accept our own response messages sent back as history: they carry the chain of thought twice
    (`reasoning` and `reasoning_content`, as clients of vLLM expect); keep one when both agree."""
    out = []
    for m in messages:
        if (
            isinstance(m, dict)
            and m.get("role") == "assistant"
            and m.get("reasoning") is not None
            and m.get("reasoning") == m.get("reasoning_content")
        ):
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
        out.append(m)
    return out


def tools_offered(req: ChatCompletionRequest) -> bool:
    """Whether the model is shown the request's tools (tool_choice 'none' hides them, so it cannot call them)."""
    return bool(req.tools) and req.tool_choice != "none"


def render_prompt(req: ChatCompletionRequest) -> list[int]:
    """The request's messages as harmony prompt tokens (gptoss_tune.data.harmony, the renderer training
    uses), ending with `<|start|>assistant`."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if tools_offered(req) else None
    try:
        conv = to_harmony_conversation(_echoed(req.messages), tools=tools, reasoning_effort=req.reasoning_effort)
    except UserError as e:
        raise ApiError(400, str(e), param="messages") from None
    # The converter already applied harmony's analysis-dropping rule; keep the renderer from redoing it.
    config = RenderConversationConfig(auto_drop_analysis=False)
    return list(harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT, config))
