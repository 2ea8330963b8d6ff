"""crformer.models.layers: the folded decoder attention equals the plain one (float64); the norms
stay fp32 under CPU bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from crformer.config import load_config
from crformer.data.tokenizer import SentenceTokenizer
from crformer.models import build_model
from crformer.models.layers import GroupNorm, LayerNorm, MultiHeadAttention
from crformer.ops import BACKENDS
from tests.helpers import TINY_MODEL, skip_unless_backend_runs


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():  # non-zero biases too: the folding has to cancel / carry them
        p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("B,M,N,d_q,d_kv,d_attn,H,pos", [(2, 16, 37, 32, 32, 32, 4, "shared"),
                                                          (3, 5, 100, 24, 40, 48, 8, "batch"),
                                                          (1, 1, 9, 16, 16, 16, 1, None),
                                                          (2, 7, 64, 48, 96, 96, 3, "shared")])
def test_folded_keys_equal_the_plain_attention(backend, B, M, N, d_q, d_kv, d_attn, H, pos):
    skip_unless_backend_runs(backend, "cpu", native=True)  # float64 CPU tensors
    torch.manual_seed(B * 1000 + N)
    mha = MultiHeadAttention(d_q, d_kv, d_attn, H, attn_backend=backend).double()
    _randomise(mha, N)
    q = torch.randn(B, M, d_q, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, N, d_kv, dtype=torch.float64, requires_grad=True)
    pos_shape = {None: None, "shared": (N, d_kv), "batch": (B, N, d_kv)}[pos]
    key_pos = None if pos is None else torch.randn(pos_shape, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, N) > 0.4  # non-prefix pattern
    mask[0, :] = False  # a fully masked row: output = out_proj bias only, in both forms
    if B > 1:  # and at least one row with a valid key, so the folded softmax path is exercised
        mask[-1, 0] = True
    outs, grads = [], []
    inputs = [q, memory] + ([] if key_pos is None else [key_pos])
    for fold in (False, True):
        mha.fold_decoder_attention = fold
        out = mha(q, memory, key_padding_mask=mask, key_pos=key_pos)
        g_out = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
        params = inputs + list(mha.parameters())
        gs = torch.autograd.grad(out, params, g_out, allow_unused=True)
        outs.append(out.detach())
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    names = ["q", "memory", "key_pos"][:len(inputs)] + [n for n, _ in mha.named_parameters()]
    for name, g1, g0 in zip(names, grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-9, msg=name)


def test_folded_attention_takes_no_separate_values():
    mha = MultiHeadAttention(16, 16, 16, 2, fold_decoder_attention=True)
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="separate value"):
        mha(x, x, x)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_model_with_folded_decoder_attention_matches_the_plain_model(amp):
    """Also under CPU bf16 autocast, where the memory (fp32 after the pixel decoder's norms) and
    the folded queries (bf16) differ in dtype: the fold casts the memory as the projections would."""
    ids, mask = SentenceTokenizer("minilm", 20)(["the red square", "the circle left of the blue star"])
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = build_model(load_config(None, TINY_MODEL)).eval()
    folded = build_model(load_config(None, TINY_MODEL + ["model.fold_decoder_attention=true"])).eval()
    folded.load_state_dict(plain.state_dict())  # same parameters: checkpoints load either way
    assert all(layer.cross.attn.fold_decoder_attention for layer in folded.decoder.layers)
    tol = 1e-2 if amp else 1e-4  # bf16: the two forms round at different places (seen: 2e-3 of logits ~0.3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        torch.testing.assert_close(folded(images, ids, mask)["pred_masks"].float(),
                                   plain(images, ids, mask)["pred_masks"].float(), rtol=0, atol=tol)


def _norm_case(kind: str, seed: int):
    """A norm with random affine parameters and bf16 input / output-gradient, as under autocast."""
    g = torch.Generator().manual_seed(seed)
    if kind == "layer":
        norm, shape = LayerNorm(96), (4096, 96)
    else:
        norm, shape = GroupNorm(8, 48), (32, 48, 16, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
    x = (torch.randn(shape, generator=g) * 3 + 1).bfloat16()
    grad_out = torch.randn(shape, generator=g).bfloat16()
    return norm, x, grad_out


def _reference_norm(kind: str, norm, x, w, b):
    """The same norm in float64 with parameters ``w``, ``b`` (plain torch.nn.functional, no autocast)."""
    if kind == "layer":
        return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)
    return F.group_norm(x, norm.num_groups, w, b, norm.eps)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["layer", "group"])
def test_norms_compute_in_fp32_under_cpu_autocast(kind, threads):
    # CPU autocast runs nn.LayerNorm / nn.GroupNorm in bf16; their weight/bias gradients (sums over
    # the whole batch) then miss the float64 value by 4-10 % here, and differ with the thread count.
    norm, x, grad_out = _norm_case(kind, seed=threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(xx)
        assert y.dtype == torch.float32
        y.backward(grad_out.float())
    finally:
        torch.set_num_threads(saved)
    xr = x.double().requires_grad_()
    w = norm.weight.detach().double().requires_grad_()
    b = norm.bias.detach().double().requires_grad_()
    y_ref = _reference_norm(kind, norm, xr, w, b)
    y_ref.backward(grad_out.double())
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(y, y_ref) < 1e-6
    assert rel(xx.grad, xr.grad) < 4e-3  # x's gradient is stored in x's dtype, bf16 (rounding 2^-9)
    assert rel(norm.weight.grad, w.grad) < 1e-5
    assert rel(norm.bias.grad, b.grad) < 1e-5


def test_every_norm_of_the_model_is_fp32():
    # timm's Swin (norm_layer), the text encoder (converted in place) and our own modules alike.
    model = build_model(load_config(None, TINY_MODEL + ["model.text_finetune=true"]))
    kinds = {type(m) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    assert kinds == {LayerNorm, GroupNorm}
