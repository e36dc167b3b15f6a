"""The sampler's repetition penalty, on real logits rows."""

from __future__ import annotations

import pytest
import torch

from model.sampling import Sampling, next_token, penalize


def test_the_penalty_divides_positive_and_multiplies_negative_logits_of_recent_ids_once():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    out = penalize(logits, [0, 1, 1, 1, 4], 2.0)  # an id seen three times is penalised once, as llama.cpp does
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -4.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # the model's row is left as it was
    assert penalize(logits, [0, 3], 1.0) is logits and penalize(logits, [], 1.3) is logits


def test_greedy_picks_change_only_through_the_penalty():
    logits = torch.tensor([1.0, 5.0, 4.0])
    assert next_token(logits, Sampling(temperature=0.0), None, recent=[1]) == 1  # no penalty set
    assert next_token(logits, Sampling(temperature=0.0, repetition_penalty=1.5), None, recent=[1]) == 2
    assert next_token(logits, Sampling(temperature=0.0, repetition_penalty=1.5), None, recent=[0]) == 1


def test_checkpoint_defaults_and_limits():
    assert Sampling().resolved({}).repetition_penalty == 1.0
    assert Sampling().resolved({"repetition_penalty": 1.2}).repetition_penalty == 1.2
    assert Sampling(repetition_penalty=1.05).resolved({"repetition_penalty": 1.2}).repetition_penalty == 1.05
    for bad in (0.0, -1.0, 2.5):
        with pytest.raises(ValueError, match="repetition_penalty"):
            Sampling(repetition_penalty=bad).validate()


@pytest.mark.parametrize("spread", [4.0, 0.001])  # a nucleus of a few ids; one wider than NUCLEUS_PROBE
def test_top_p_samples_exactly_the_nucleus_in_proportion(spread):
    from model.sampling import NUCLEUS_PROBE

    torch.manual_seed(0)
    logits = torch.randn(32000) * spread
    s = Sampling(temperature=1.0, top_p=0.5)
    probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
    size = int((torch.cumsum(probs, -1) - probs <= 0.5).sum())  # the nucleus, from a full sort
    assert (size < NUCLEUS_PROBE) == (spread == 4.0)
    g = torch.Generator().manual_seed(1)
    picks = torch.tensor([next_token(logits, s, g) for _ in range(2000)])
    assert set(picks.tolist()) <= set(order[:size].tolist())  # nothing outside the nucleus
    if size < 20:  # each id as often as its share of the nucleus
        share = probs[:size] / probs[:size].sum()
        seen = torch.stack([(picks == i).float().mean() for i in order[:size]])
        assert (seen - share).abs().max() < 0.04
