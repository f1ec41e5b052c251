"""Engine results -> OpenAI response shapes, for the body and the stream's chunks alike.

One module per shape family, a `Renderer` subclass each, picked once per request by the
route: app/render/completions.py (`CompletionRenderer`), app/render/chat.py (`ChatRenderer`);
app/render/common.py holds what both share (token strings, the ids whose text a response
shows, usage, the `diagnostics` object, the request's id and `created`). No I/O: the caller
looks the token texts up. SSE framing is app/streaming.py's.
"""

from app.render.chat import ChatRenderer
from app.render.common import Renderer, RenderOptions
from app.render.completions import CompletionRenderer

__all__ = ["ChatRenderer", "CompletionRenderer", "RenderOptions", "Renderer"]
