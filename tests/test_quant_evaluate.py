"""``quant.evaluate_perplexity``: windowed perplexity against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quant.evaluate import evaluate_perplexity, window_spans

V = 7


class Bigram(nn.Module):
    """logits[t] = table[ids[t]]: the prediction ignores every earlier token."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


class PrefixCount(nn.Module):
    """logits[t] = [number of tokens seen in the window up to t, 0, 0, ...]: depends on where
    the window starts (the context a window sees)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        out = torch.zeros(b, s, V)
        out[..., 0] = torch.arange(1, s + 1, dtype=torch.float32)
        return out


class NoVocab(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float()


def _log_softmax(row: list[float], j: int) -> float:
    return row[j] - math.log(sum(math.exp(v) for v in row))


def test_window_spans_score_each_target_once():
    assert window_spans(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert window_spans(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, w, s in [(10, 4, 1), (33, 8, 3), (5, 16, 16), (17, 4, 4)]:
        targets = [t for _, e, f in window_spans(n, w, s) for t in range(f, e)]
        assert len(targets) == len(set(targets))
        if s < w:  # overlapping windows score every target but the first token
            assert targets == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 5)
    with pytest.raises(ValueError, match="window"):
        window_spans(10, 1, 1)


def test_bigram_perplexity_matches_hand_computation():
    model = Bigram()
    ids = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]
    table = model.table.detach().tolist()
    # non-overlapping windows of 4: targets 1, 2, 3 | 5, 6, 7 | 9
    targets = [1, 2, 3, 5, 6, 7, 9]
    nll = -sum(_log_softmax(table[ids[t - 1]], ids[t]) for t in targets)
    r = evaluate_perplexity(model, torch.tensor(ids), window=4)
    assert r.tokens == 7 and r.windows == 3
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / 7), rel=1e-5)
    # overlapping windows: every target once; a bigram's score does not depend on context
    all_nll = -sum(_log_softmax(table[ids[t - 1]], ids[t]) for t in range(1, 10))
    r2 = evaluate_perplexity(model, ids, window=4, stride=1)
    assert r2.tokens == 9
    assert r2.ppl == pytest.approx(math.exp(all_nll / 9), rel=1e-5)


def test_context_dependent_model_sees_only_its_window():
    # logits (c, 0, ..., 0) where c = position in window + 1: target token 0 gets
    # log p = c - log(e^c + V - 1), any other token -log(e^c + V - 1)
    ids = [0, 2, 0, 0, 5, 0]
    r = evaluate_perplexity(PrefixCount(), ids, window=3, stride=2)

    # spans: (0,3,1) targets 1,2 from positions 0,1 (c=1,2); (2,5,3) targets 3,4 from window
    # positions 0,1 (c=1,2); (4,6,5) target 5 from window position 0 (c=1)
    def lp(c: int, tok: int) -> float:
        return (c if tok == 0 else 0.0) - math.log(math.exp(c) + V - 1)

    hand = -(lp(1, 2) + lp(2, 0) + lp(1, 0) + lp(2, 5) + lp(1, 0))
    assert r.tokens == 5 and r.windows == 3
    assert r.nll == pytest.approx(hand, rel=1e-6)


def test_tokenizer_and_bad_inputs():
    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            return {"input_ids": torch.tensor([[ord(c) % V for c in text]])}

    text = "hello world"
    ids = [ord(c) % V for c in text]
    assert evaluate_perplexity(Bigram(), text, tokenizer=Tok(), window=4).nll == pytest.approx(
        evaluate_perplexity(Bigram(), ids, window=4).nll
    )
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_perplexity(Bigram(), text)
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate_perplexity(Bigram(), [1])
    with pytest.raises(FileNotFoundError, match="model directory"):
        evaluate_perplexity("/nonexistent/dir", ids)
    with pytest.raises(ValueError, match="logits"):
        evaluate_perplexity(NoVocab(), ids)
