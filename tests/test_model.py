"""CRFormer forward/backward on tiny sizes: shapes, switches, gradients, and that it learns."""

import pytest
import torch

from crformer.config import load_config
from crformer.data.tokenizer import SentenceTokenizer
from crformer.errors import UserError
from crformer.models import build_model
from crformer.models.decoder import CalibrationLayer, CrossAttentionLayer
from crformer.models.losses import crformer_loss, reconstruction_loss
from crformer.ops import BACKENDS
from tests.helpers import TINY_MODEL, skip_unless_backend_runs

SENTENCES = ["the red square", "the circle left of the blue star", "the leftmost small shape"]


def tiny_cfg(*extra):
    return load_config(None, TINY_MODEL + list(extra))


@pytest.fixture(scope="module")
def tokens():
    ids, mask = SentenceTokenizer("minilm", 20)(SENTENCES)
    return ids, mask


@pytest.mark.parametrize("nq,calibration,lrm,stride", [(1, True, True, 2), (16, True, True, 4), (16, False, True, 1),
                                                       (16, True, False, 2), (1, False, False, 4)])
def test_forward_backward_shapes(nq, calibration, lrm, stride, tokens):
    torch.manual_seed(0)
    cfg = tiny_cfg(f"model.num_queries={nq}", f"model.calibration={calibration}", f"model.lrm={lrm}",
                   f"model.mask_stride={stride}")
    model = build_model(cfg).train()
    assert any(isinstance(m, CalibrationLayer) for m in model.modules()) == calibration
    ids, mask = tokens
    images = torch.randn(3, 3, 32, 32)
    out = model(images, ids, mask)
    side = 32 // stride
    assert out["pred_masks"].shape == (3, side, side)
    # auxiliary masks skip the outline refinement: always at stride 4
    assert [a.shape for a in out["aux_masks"]] == [(3, 8, 8)] * (cfg["model"]["num_decoder_layers"] - 1)
    assert (out["rec"] is not None) == lrm
    if lrm:
        assert out["rec"].shape == (3, 20, model.text_encoder.dim)
    terms = crformer_loss(out, (torch.rand(3, 32, 32) > 0.5).float(), cfg["loss"])
    assert ("rec" in terms) == lrm
    terms["total"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith("text_encoder.") for n, _ in trainable)  # frozen by default
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    model.eval()
    with torch.no_grad():
        ev = model(images, ids, mask)
    assert set(ev) == {"pred_masks", "lang", "lang_mask"}


def test_mask_refinement_starts_as_plain_upsampling(tokens):
    """At initialisation the stride-2 head equals the stride-4 mask upsampled (zero residual), and
    a bad mask_stride is a one-line config error."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("model.mask_stride=2")).eval()
    ids, mask = tokens
    images = torch.randn(3, 3, 32, 32)
    captured = {}
    model.mask_head.refine.register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    with torch.no_grad():
        fine = model(images, ids, mask)["pred_masks"]
    assert torch.count_nonzero(captured["out"]) == 0
    coarse_up = captured["inp"][:, -1]  # the upsampled stride-4 logits are the last input channel
    torch.testing.assert_close(fine, coarse_up)
    with pytest.raises(UserError, match="mask_stride"):
        build_model(tiny_cfg("model.mask_stride=3"))


@pytest.mark.parametrize("strides", [[16, 8, 4], [32, 8], [4, 4, 8, 16]])
def test_memory_strides_choose_the_decoder_memories(strides, tokens):
    """Layer j attends to the memory at strides[j mod len]; each memory has that stride's size."""
    torch.manual_seed(0)
    cfg = tiny_cfg(f"model.memory_strides={strides}", f"model.num_decoder_layers={len(strides)}")
    model = build_model(cfg).train()
    sizes = []
    for layer in model.decoder.layers:
        layer.cross.register_forward_hook(lambda m, i, o: sizes.append(i[1].shape[1]))
    ids, mask = tokens
    out = model(torch.randn(3, 3, 32, 32), ids, mask)
    assert sizes == [(32 // s) ** 2 for s in strides]
    terms = crformer_loss(out, (torch.rand(3, 32, 32) > 0.5).float(), cfg["loss"])
    terms["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(UserError, match="memory_strides"):
        build_model(tiny_cfg("model.memory_strides=[64]"))


@pytest.mark.parametrize("fold", [False, True])
def test_value_positions_put_the_memory_positions_in_the_values(fold):
    """With ``value_positions`` a decoder cross-attention reads memory + positions as values as well as
    keys (float64, plain and folded): the same output as a plain layer given memory + positions and no
    key positions, and not the plain layer's output with the positions on the keys only."""
    torch.manual_seed(3)
    layers = [CrossAttentionLayer(24, 3, fold_decoder_attention=fold, value_positions=v).double() for v in (True, False)]
    layers[1].load_state_dict(layers[0].state_dict())
    q, memory, pos = torch.randn(2, 5, 24), torch.randn(2, 37, 24), torch.randn(37, 24)
    q, memory, pos, query_pos = (t.double() for t in (q, memory, pos, torch.randn(5, 24)))
    out = layers[0](q, memory, query_pos=query_pos, key_pos=pos)
    torch.testing.assert_close(out, layers[1](q, memory + pos, query_pos=query_pos), rtol=1e-12, atol=1e-12)
    assert (out - layers[1](q, memory, query_pos=query_pos, key_pos=pos)).abs().max() > 1e-3
    model = build_model(tiny_cfg("model.value_positions=true"))
    assert all(layer.cross.value_positions for layer in model.decoder.layers)
    assert not any(layer.cross.value_positions for layer in build_model(tiny_cfg()).decoder.layers)


def test_few_steps_on_a_fixed_batch_lower_the_loss(tokens):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    ids, mask = tokens
    images = torch.randn(3, 3, 32, 32)
    target = torch.zeros(3, 32, 32)
    target[0, 4:12, 4:12] = 1
    target[1, 16:28, 2:10] = 1
    target[2, 20:30, 20:30] = 1
    losses = []
    for _ in range(15):
        terms = crformer_loss(model(images, ids, mask), target, cfg["loss"])
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(terms["total"].item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "reference"])
def test_backends_agree_in_the_whole_model(backend, tokens):
    """Every registered backend that runs natively on CPU (on CPU tensors; triton interpreted: tests/kernels)."""
    skip_unless_backend_runs(backend, "cpu", native=True)
    torch.manual_seed(0)
    ids, mask = tokens
    images = torch.randn(3, 3, 32, 32)
    outs = {}
    for name in ("reference", backend):
        torch.manual_seed(1)
        model = build_model(tiny_cfg(f"model.attn_backend={name}")).eval()
        with torch.no_grad():
            outs[name] = model(images, ids, mask)["pred_masks"]
    torch.testing.assert_close(outs[backend], outs["reference"], rtol=1e-4, atol=1e-4)


def test_text_encoder_finetune_layers():
    cfg = tiny_cfg("model.text_finetune=true", "model.text_trainable_layers=2")
    model = build_model(cfg)
    enc = model.text_encoder.bert
    n = len(enc.encoder.layer)
    assert all(p.requires_grad for p in enc.encoder.layer[n - 1].parameters())
    assert not any(p.requires_grad for p in enc.encoder.layer[0].parameters())
    assert not any(p.requires_grad for p in enc.embeddings.parameters())


def test_frozen_text_cache_matches_direct_encoding(tokens):
    model = build_model(tiny_cfg()).eval()
    ids, mask = tokens
    first = model.text_encoder(ids, mask)
    direct = model.text_encoder._encode(ids, mask)
    torch.testing.assert_close(first, direct, rtol=1e-5, atol=1e-5)
    again = model.text_encoder(ids[[2, 0]], mask[[2, 0]])  # served from the cache
    torch.testing.assert_close(again, first[[2, 0]])


def test_prepared_text_mask_gives_the_padding_mask_result(tokens):
    """The 4-D mask handed to BERT (no ``mask.all()`` host read) gives what transformers' own 2-D
    padding mask gives, on every real token, in float64."""
    enc = build_model(tiny_cfg()).text_encoder.double().eval()
    if not enc.prepared_mask:
        pytest.skip("this transformers' BERT does not build its masks with create_bidirectional_mask")
    ids, mask = tokens
    assert not mask.all()  # padded rows, or the two paths would not differ
    prepared = enc._encode(ids, mask)
    plain = enc.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(prepared[mask], plain[mask], rtol=1e-12, atol=1e-12)
    # Switched to eager attention after building (which would add a bool mask to the scores), the
    # encoder goes back to the 2-D mask and still gives the same features.
    enc.bert.set_attn_implementation("eager")
    assert not enc.prepared_mask
    torch.testing.assert_close(enc._encode(ids, mask)[mask], plain[mask], rtol=1e-10, atol=1e-10)


def test_reconstruction_loss_ignores_padding_and_empty_rows():
    target = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    rec = target.clone()
    rec[0, 2:] = -target[0, 2:]  # padding positions are wrong on purpose
    rec[1] = torch.randn(5, 8)  # a row with no valid token
    loss = reconstruction_loss(rec, target, mask, sentence_weight=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    rec[0, 0] = -target[0, 0]
    assert reconstruction_loss(rec, target, mask).item() == pytest.approx(1.0, abs=1e-5)  # (2 + 0) / 2 tokens


def test_best_query_loss_is_the_smallest_per_query_mask_loss():
    """Per sample the minimum over queries of the plain mask loss, then the batch mean; a query that
    equals the target wins, and crformer_loss adds the term only when loss.query_weight > 0."""
    from crformer.models.losses import best_query_loss, dice_loss, mask_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 8, 8, generator=g, dtype=torch.float64)
    target = (torch.rand(3, 8, 8, generator=g) > 0.5).double()
    per = torch.tensor([[mask_loss(logits[b, q][None], target[b][None]).item() for q in range(5)] for b in range(3)])
    per_dice = torch.stack([torch.stack([dice_loss(logits[b, q][None], target[b][None]) for q in range(5)])
                            for b in range(3)])
    unreduced = dice_loss(logits, target[:, None].expand_as(logits), reduction="none")  # the choice's Dice term
    assert unreduced.shape == (3, 5) and torch.allclose(unreduced, per_dice, rtol=1e-12, atol=0)
    assert best_query_loss(logits, target).item() == pytest.approx(per.min(dim=1).values.mean().item(), rel=1e-6)
    perfect = logits.clone()
    perfect[1, 2] = target[1] * 40 - 20  # sample 1's third query is its target: its loss is ~0
    assert best_query_loss(perfect, target).item() == pytest.approx((per[0].min() + per[2].min()).item() / 3, rel=1e-5)
    # Masks coarser than the target: chosen at their own size, scored at the target's; only the
    # chosen query gets a gradient.
    big = target.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 16×16, each 8×8 cell a 2×2 block
    coarse = perfect.clone().requires_grad_()
    loss = best_query_loss(coarse, big)
    chosen = [int(per[0].argmin()), 2, int(per[2].argmin())]
    full = [mask_loss(coarse[b, q][None], big[b][None]) for b, q in enumerate(chosen)]
    assert loss.item() == pytest.approx(sum(f.item() for f in full) / 3, rel=1e-6)
    loss.backward()
    assert [int(q) for q in coarse.grad.flatten(2).abs().sum(2).nonzero()[:, 1]] == chosen

    cfg = load_config(None, ["loss.query_weight=0"])["loss"]
    outputs = {"pred_masks": logits[:, 0], "aux_masks": [], "query_masks": logits}
    assert "query" not in crformer_loss(outputs, target, cfg)
    with_query = crformer_loss(outputs, target, {**cfg, "query_weight": 0.5})
    plain = crformer_loss(outputs, target, cfg)
    assert with_query["total"].item() == pytest.approx(plain["total"].item() + 0.5 * with_query["query"].item())


def test_per_query_masks_are_computed_only_when_asked(data_cache, tmp_path):
    """The trainer asks for the per-query masks only when loss.query_weight > 0, so a step without
    the term does not compute them."""
    from crformer import train

    ids, mask = SentenceTokenizer("minilm", 20)(["the red square", "the leftmost circle"])
    for weight in (0.0, 0.5):
        cfg = load_config(None, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path / str(weight)}",
                                              f"loss.query_weight={weight}"])
        model = train.Trainer(cfg).model.train()
        out = model(torch.randn(2, 3, 32, 32), ids, mask)
        assert ("query_masks" in out) == (weight > 0)
        if weight:
            assert out["query_masks"].shape[:2] == (2, cfg["model"]["num_queries"])
