"""Reading one tensor of a GGUF file by walking its header (model.gguf), checked against gguf's own reader."""

from __future__ import annotations

import numpy as np
import pytest

from model.gguf import read_f32_tensor


def test_a_tensor_reads_as_ggufs_reader_reads_it_and_a_missing_one_is_none(smollm2_gguf_file):
    from gguf import GGUFReader

    (expected,) = [t for t in GGUFReader(str(smollm2_gguf_file)).tensors if t.name == "output_norm.weight"]
    got = read_f32_tensor(smollm2_gguf_file, "output_norm.weight")
    assert got.dtype == np.float32 and np.array_equal(got, np.asarray(expected.data, dtype=np.float32).reshape(-1))
    assert read_f32_tensor(smollm2_gguf_file, "rope_freqs.weight") is None  # SmolLM2 has no Llama 3 rope scaling
    with pytest.raises(ValueError, match="GGML type"):
        read_f32_tensor(smollm2_gguf_file, "token_embd.weight")  # quantized, not float32


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(ValueError, match="not a GGUF"):
        read_f32_tensor(path, "rope_freqs.weight")
