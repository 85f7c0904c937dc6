import math

import pytest
import torch

from trl_star_dss.loss import deep_token_betas, deep_token_loss, full_kl, sft_loss, star_dss_loss


def batch(seed=0, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 4
    ref_logps = -torch.rand(B, T, generator=g) * 4
    weights = torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :9] = torch.tensor([False, True, True, False, True, True, True, True, True])  # two segments
    return logps, ref_logps, weights, mask


def naive_kl(logp, ref, estimator):
    r = ref - logp
    return {"k1": -r, "k2": 0.5 * r * r, "k3": math.exp(r) - r - 1}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kl_coef", [0.5, 2.0])
def test_star_dss_loss_against_per_token_loop(estimator, kl_coef):
    logps, ref_logps, weights, mask = batch()
    expected = torch.zeros_like(logps)
    for b in range(logps.size(0)):
        for t in range(logps.size(1)):
            if mask[b, t]:
                lp, rp, w = logps[b, t].item(), ref_logps[b, t].item(), weights[b, t].item()
                expected[b, t] = w * -lp + (1 - w) * kl_coef * naive_kl(lp, rp, estimator)
    got = star_dss_loss(logps, ref_logps, weights, mask, kl_coef, estimator, reduction="none")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        star_dss_loss(logps, ref_logps, weights, mask, kl_coef, estimator, "sum"), expected.sum()
    )
    mean = star_dss_loss(logps, ref_logps, weights, mask, kl_coef, estimator)
    torch.testing.assert_close(mean, expected.sum() / mask.sum())


def test_weights_one_is_cross_entropy_and_zero_is_kl():
    logps, ref_logps, _, mask = batch(1)
    ones, zeros = torch.ones_like(logps), torch.zeros_like(logps)
    torch.testing.assert_close(star_dss_loss(logps, ref_logps, ones, mask), sft_loss(logps, mask))
    kl = 0.5 * (ref_logps - logps) ** 2
    torch.testing.assert_close(star_dss_loss(logps, ref_logps, zeros, mask, kl_coef=0.5), 0.5 * kl[mask].mean())


def test_no_trained_tokens_gives_zero_not_nan():
    logps, ref_logps, weights, mask = batch()
    none = torch.zeros_like(mask)
    assert star_dss_loss(logps, ref_logps, weights, none).item() == 0.0
    assert deep_token_loss(logps, ref_logps, none).item() == 0.0


def test_bad_arguments_are_named():
    logps, ref_logps, weights, mask = batch()
    with pytest.raises(ValueError, match=r"kl_estimator='k4' is not known"):
        star_dss_loss(logps, ref_logps, weights, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"kl_estimator='full' needs the whole vocabulary.*pass `kl=`"):
        star_dss_loss(logps, ref_logps, weights, mask, kl_estimator="full")
    with pytest.raises(ValueError, match=r"reduction='avg' is not known"):
        star_dss_loss(logps, ref_logps, weights, mask, reduction="avg")


def test_deep_token_betas_restart_at_each_segment():
    mask = torch.tensor([[False, True, True, True, True, True, True, True, False, True, True]])
    expected = [0.1, 0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1, 0.5, 2]  # outside the mask the value is unused
    torch.testing.assert_close(deep_token_betas(mask), torch.tensor([expected]))


def test_deep_token_loss_against_per_token_loop():
    logps, ref_logps, _, mask = batch(2, T=14)
    expected = torch.zeros_like(logps)
    for b in range(logps.size(0)):
        t = 0
        for i in range(logps.size(1)):
            t = t + 1 if mask[b, i] else 0
            if mask[b, i]:
                beta = 0.5 if t == 1 else 2.0 if t <= 5 else 0.1
                x = beta * (logps[b, i] - ref_logps[b, i]).item()
                expected[b, i] = -(2 / beta) * math.log(1 / (1 + math.exp(-x)))
    torch.testing.assert_close(deep_token_loss(logps, ref_logps, mask, "none"), expected)
    torch.testing.assert_close(deep_token_loss(logps, ref_logps, mask), expected.sum() / mask.sum())


def test_full_kl_matches_dense_computation_and_gradients():
    torch.manual_seed(0)
    B, T, H, V = 2, 7, 8, 50
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(B, T, H), torch.randn(V, H)
    mask = torch.rand(B, T) > 0.3
    logp = torch.log_softmax(hidden @ weight.T, -1)
    ref_logp = torch.log_softmax(ref_hidden @ ref_weight.T, -1)
    dense = (logp.exp() * (logp - ref_logp)).sum(-1) * mask
    labels = torch.randint(0, V, (B, T))
    label_logps = logp.gather(-1, labels[..., None]).squeeze(-1) * mask
    chunked, logps = full_kl(hidden, weight, ref_hidden, ref_weight, labels, mask, chunk_size=3)
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(logps, label_logps)
    grads = torch.autograd.grad((chunked + logps).sum(), (hidden, weight))
    torch.testing.assert_close(grads, torch.autograd.grad((dense + label_logps).sum(), (hidden, weight)))
    # Used as `kl=`, the full KL replaces the token estimator in the STAR loss.
    weights = torch.full((B, T), 0.25)
    loss = star_dss_loss(logps, None, weights, mask, kl_coef=0.5, kl=chunked, reduction="sum")
    torch.testing.assert_close(loss, ((0.25 * -logps + 0.75 * 0.5 * dense) * mask).sum())


@pytest.mark.gpu
def test_bf16_output_head_keeps_float32_logits_on_cuda():
    """On CUDA a bf16 output layer multiplies into float32 (`torch.mm(..., out_dtype=float32)`), never rounding the
    logits to bf16 first (docs/method.md, "The loss and the reference"); the CPU path upcasts instead."""
    from trl_star_dss.heads import OutputHead

    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(64, 16, generator=generator, device="cuda").bfloat16()
    hidden = torch.randn(5, 16, generator=generator, device="cuda").bfloat16()
    logits = OutputHead(weight).logits(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ weight.float().T, rtol=1e-3, atol=1e-3)
