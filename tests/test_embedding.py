"""VocabParallelEmbedding / ParallelLMHead on 1, 2, 4 gloo ranks against nn.Embedding / nn.Linear
(vocab sizes that do not divide by TP), tied weights, the local logit shard, and loading through
tp_layers.load_weights from a safetensors file."""

from __future__ import annotations

import pytest
import torch
from mp_harness import run_ranks
from torch import nn

HIDDEN = 24


def _full(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, HIDDEN, generator=g), torch.randn(vocab, generator=g)


def _ids(vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(7))
    ids[0, :2] = torch.tensor([0, vocab - 1])  # both ends of the vocab
    return ids


def _embedding_body(rank: int, ws: int, vocab: int) -> dict:
    from tp_layers import TPContext
    from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding

    tp = TPContext.from_group()
    w, b = _full(vocab)
    emb = VocabParallelEmbedding(vocab, HIDDEN, tp=tp, params_dtype=torch.float32)
    emb.weight_loader(emb.weight, w)
    head = ParallelLMHead(vocab, HIDDEN, bias=True, tp=tp, params_dtype=torch.float32)
    head.weight_loader(head.weight, w)
    head.weight_loader(head.bias, b)
    local = ParallelLMHead(vocab, HIDDEN, tp=tp, params_dtype=torch.float32, gather_output=False)
    local.weight_loader(local.weight, w)
    tied = ParallelLMHead(vocab, HIDDEN, tp=tp, params_dtype=torch.float32).tie_weights(emb)
    assert emb.num_embeddings_padded % (64 * ws) == 0
    assert emb.weight.shape == (emb.num_embeddings_padded // ws, HIDDEN)
    assert tied.weight is emb.weight and "weight" not in dict(tied.named_parameters())
    ids = _ids(vocab)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    ref_emb = nn.Embedding(vocab, HIDDEN).requires_grad_(False)
    ref_emb.weight.copy_(w)
    ref_head = nn.Linear(HIDDEN, vocab).requires_grad_(False)
    ref_head.weight.copy_(w)
    ref_head.bias.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), ref_emb(ids), rtol=0, atol=0)
        logits = head(x)
        assert logits.shape == (3, 5, vocab)
        torch.testing.assert_close(logits, ref_head(x), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(tied(x), x @ w.T, rtol=1e-6, atol=1e-5)
        shard = local(x)
    per = local.num_embeddings_per_partition
    lo, n = rank * per, local.num_valid_local
    assert shard.shape == (3, 5, per)
    torch.testing.assert_close(shard[..., :n], (x @ w.T)[..., lo : lo + n], rtol=1e-6, atol=1e-5)
    assert bool(torch.isneginf(shard[..., n:]).all())
    return {"valid": n, "padded": emb.num_embeddings_padded}


@pytest.mark.parametrize("ws", [1, 2, 4])
@pytest.mark.parametrize("vocab", [100, 257])
def test_matches_unsharded(ws: int, vocab: int) -> None:
    out = run_ranks(ws, _embedding_body, vocab)
    assert sum(o["valid"] for o in out) == vocab  # every row on exactly one rank
    assert out[0]["padded"] == -(-vocab // (64 * ws)) * 64 * ws


class _Tiny(nn.Module):
    def __init__(self, embed: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.head = head


def _load_body(rank: int, ws: int, path: str) -> None:
    from safetensors.torch import load_file

    import tp_layers
    from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding

    tp = tp_layers.TPContext.from_group()
    full = load_file(f"{path}/model.safetensors")
    emb = VocabParallelEmbedding(100, HIDDEN, tp=tp, params_dtype=torch.float32, device="meta")
    head = ParallelLMHead(100, HIDDEN, bias=True, tp=tp, params_dtype=torch.float32, device="meta")
    model = _Tiny(emb, head)
    rep = tp_layers.load_weights(model, path)
    assert sorted(rep.loaded) == ["embed.weight", "head.bias", "head.weight"]
    ids = _ids(100)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.embed(ids), full["embed.weight"].float()[ids])
        want = x @ full["head.weight"].float().T + full["head.bias"].float()
        torch.testing.assert_close(model.head(x), want, rtol=1e-6, atol=1e-5)
    per = emb.num_embeddings_per_partition
    assert rep.bytes_read < 2 * 100 * HIDDEN * 2 + 100 * 2 or ws == 1
    assert emb.weight.shape[0] == per
    # a wrong shape fails before anything changes, naming the tensor
    bad = VocabParallelEmbedding(99, HIDDEN, tp=tp, params_dtype=torch.float32, device="meta")
    with pytest.raises(tp_layers.CheckpointError, match=r"embed.weight: .*shape \[100, 24\]"):
        tp_layers.load_weights(_Tiny(bad, nn.Identity()), path, strict=False)


@pytest.mark.parametrize("ws", [1, 2])
def test_load_weights_reads_own_rows(tmp_path, ws: int) -> None:
    from safetensors.torch import save_file

    w, b = _full(100, seed=5)
    tensors = {
        "embed.weight": w.to(torch.bfloat16),  # stored bf16, model fp32: cast on load
        "head.weight": (w * 2).to(torch.bfloat16),
        "head.bias": b.to(torch.bfloat16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    run_ranks(ws, _load_body, str(tmp_path))


def test_bad_arguments() -> None:
    from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding, pad_vocab_size

    assert pad_vocab_size(49152, 2) == 49152 and pad_vocab_size(100, 4) == 256
    with pytest.raises(ValueError, match="num_embeddings and embedding_dim must be positive"):
        VocabParallelEmbedding(0, 8)
    emb = VocabParallelEmbedding(10, 8)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        emb(torch.zeros(2))
    with pytest.raises(ValueError, match=r"checkpoint shape \[11, 8\]"):
        emb.weight_loader(emb.weight, torch.zeros(11, 8))
    with pytest.raises(ValueError, match="same vocab"):
        ParallelLMHead(11, 8).tie_weights(emb)
    with pytest.raises(ValueError, match="input last dim must be embedding_dim = 8"):
        ParallelLMHead(10, 8)(torch.zeros(2, 7))
