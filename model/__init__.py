"""The Llama runner: checkpoint loading, Llama 3.2 prompts, streamed generation with a kept KV cache.

Importing this package is cheap: torch and transformers load inside the functions that need them.
"""

from model.errors import ContextError, LlamaChatError, ModelError
from model.prompt import encode_chat, render_chat

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
# CPU weight modes (model.quant); auto picks one for the device (model.device.pick_quantize)
QUANTIZE_MODES = ("auto", "bf16", "int8", "int4", "int4-fast")

__all__ = ["DEFAULT_MODEL", "QUANTIZE_MODES", "ContextError", "LlamaChatError", "ModelError", "encode_chat",
           "render_chat"]
