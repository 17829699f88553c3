"""Every loss variant against a plain, token-by-token reference written here from the published formulas.

The reference shares no code with kubeforge.losses: loops over rows and tokens, Python lists, the
formulas of docs/algorithms.md. Values and gradients agree to 1e-6 (float64).
"""

import math

import pytest
import torch
from kubeforge.algorithm import Algorithm
from kubeforge.losses import LOSSES, LossSettings, Normalisers, check_settings, policy_loss

SPANS = [(2, 7), (3, 5), (1, 7), (4, 6)]  # each row's response tokens: lengths 5, 2, 6, 2
EPS = {  # (low, high): wide enough that the batch has tokens on both sides of every clip
    "grpo": (0.2, 0.2),
    "dr_grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "gspo": (0.05, 0.05),
    "cispo": (1.0, 0.2),
    "sft": (0.0, 0.0),
}


def make_batch(seed=0, spread=0.3, per_token=False):
    g = torch.Generator().manual_seed(seed)
    rows, length = len(SPANS), 7
    logprobs = (-torch.rand(rows, length, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # Behaviour logprobs near the new ones so that some ratios fall inside the clip range, some outside.
    behaviour = logprobs.detach() + torch.randn(rows, length, generator=g, dtype=torch.float64) * spread
    ref = logprobs.detach() + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.2
    shape = (rows, length) if per_token else (rows,)
    advantages = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for row, (start, end) in enumerate(SPANS):
        mask[row, start:end] = True
    behaviour[~mask] = -math.inf  # whatever sits outside the response must not matter
    ref[~mask] = math.nan
    return logprobs, behaviour, advantages, mask, ref


def reference_loss(name, logprobs, behaviour, advantages, mask, ref=None, *, kl_coef=0.0, kl="k3", tis_cap=0.0):
    """The loss from its definition, one sequence and one token at a time."""
    low, high = EPS[name]
    rows = [[t for t in range(mask.shape[1]) if mask[r, t]] for r in range(mask.shape[0])]
    sums = []  # per row: the sum of its token terms
    # with TIS the ratio's "old" policy is the trainer's own weights before the step
    old = logprobs.detach() if tis_cap else behaviour
    for r, tokens in enumerate(rows):
        # GSPO: s = (prod_t p / q)^(1/|y|), one clipped ratio for the whole sequence
        s = torch.exp(sum(logprobs[r, t] - old[r, t] for t in tokens) / len(tokens))
        terms = []
        for t in tokens:
            a = advantages[r, t] if advantages.dim() == 2 else advantages[r]
            if name == "sft":
                term = -logprobs[r, t]
            else:
                if name != "gspo":
                    ratio = torch.exp(logprobs[r, t] - old[r, t])
                elif advantages.dim() == 1 and not tis_cap:
                    ratio = s
                else:  # GSPO-token, s_t = sg(s) * p_t / sg(p_t): per-token advantages, per-token TIS weights
                    ratio = s.detach() * torch.exp(logprobs[r, t] - logprobs[r, t].detach())
                clipped = torch.clamp(ratio, 1 - low, 1 + high)
                if name == "cispo":
                    term = -clipped.detach() * a * logprobs[r, t]
                else:
                    term = -torch.minimum(ratio * a, clipped * a)
                if tis_cap:
                    term = term * min(math.exp(logprobs[r, t].item() - behaviour[r, t].item()), tis_cap)
                if ref is not None:
                    d = ref[r, t] - logprobs[r, t]
                    term = term + kl_coef * (-d if kl == "k1" else torch.exp(d) - d - 1)
            terms.append(term)
        sums.append(sum(terms))
    n_tokens = sum(len(tokens) for tokens in rows)
    if name in ("grpo", "gspo"):  # token mean per sequence, then mean over sequences
        return sum(s / len(tokens) for s, tokens in zip(sums, rows, strict=True)) / len(rows)
    if name == "dr_grpo":  # a constant: the longest response times the sequences
        return sum(sums) / (max(len(tokens) for tokens in rows) * len(rows))
    return sum(sums) / n_tokens  # dapo, cispo, sft: every token of the batch weighs the same


def settings(name, **kw):
    low, high = EPS[name]
    return LossSettings(loss=name, clip_eps_low=low, clip_eps_high=high, **kw)


def loss_and_grad(name, batch, ref=None, **kw):
    logprobs, behaviour, advantages, mask, _ = batch
    loss, metrics = policy_loss(logprobs, behaviour, advantages, mask, ref, settings=settings(name, **kw))
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss, grad, metrics


def reference_and_grad(name, batch, ref=None, **kw):
    logprobs, behaviour, advantages, mask, _ = batch
    expected = reference_loss(name, logprobs, behaviour, advantages, mask, ref, **kw)
    (grad,) = torch.autograd.grad(expected, logprobs)
    return expected, grad


@pytest.mark.parametrize("per_token", [False, True], ids=["sequence-advantages", "token-advantages"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_each_variant_matches_its_definition(name, per_token):
    batch = make_batch(per_token=per_token)
    loss, grad, metrics = loss_and_grad(name, batch)
    expected, expected_grad = reference_and_grad(name, batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    assert grad[~batch[3]].abs().max() == 0
    if name != "sft":  # the batch exercises both sides of the clip
        assert 0 < metrics["clip_fraction"].item() < 1, name


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "sft"])
@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_kl_penalty_with_either_estimator(name, kl):
    batch = make_batch(seed=1)
    ref = batch[4]
    loss, grad, metrics = loss_and_grad(name, batch, ref, kl_coef=0.05, kl_estimator=kl)
    expected, expected_grad = reference_and_grad(name, batch, ref, kl_coef=0.05, kl=kl)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    # the metric is the estimator's token mean, whatever the variant's own average
    logprobs, mask = batch[0].detach(), batch[3]
    d = (ref - logprobs)[mask]
    per_token = -d if kl == "k1" else torch.exp(d) - d - 1
    assert metrics["kl"].item() == pytest.approx(per_token.mean().item(), abs=1e-9)


def test_k3_is_never_negative_and_k1_can_be():
    logprobs, _, advantages, mask, ref = make_batch(seed=2)
    both = {
        kl: policy_loss(logprobs, logprobs.detach(), advantages, mask, ref, settings=LossSettings(kl_estimator=kl))
        for kl in ("k1", "k3")
    }
    d = (ref - logprobs.detach())[mask]
    assert (torch.exp(d) - d - 1 >= 0).all() and (-d < 0).any()
    assert both["k3"][1]["kl"].item() > 0
    assert both["k1"][1]["kl"].item() == pytest.approx((-d).mean().item())


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "sft"])
def test_truncated_importance_sampling(name):
    batch = make_batch(seed=3, spread=0.8)  # wide mismatch: some weights hit the cap
    cap = 1.5
    loss, grad, metrics = loss_and_grad(name, batch, tis_cap=cap)
    expected, expected_grad = reference_and_grad(name, batch, tis_cap=cap)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    logprobs, behaviour, _, mask, _ = batch
    weights = torch.exp(logprobs.detach() - behaviour)[mask]
    assert metrics["tis_clip_fraction"].item() == pytest.approx((weights > cap).double().mean().item())
    assert 0 < metrics["tis_clip_fraction"].item() < 1
    # The trainer-vs-old ratio is 1 (one update per batch): the clip never removes a gradient.
    assert metrics["clip_fraction"].item() == 0


def test_dapo_with_tis_is_the_truncated_policy_gradient():
    logprobs, behaviour, advantages, mask, _ = make_batch(seed=4, spread=0.8)
    _, grad, _ = loss_and_grad("dapo", (logprobs, behaviour, advantages, mask, None), tis_cap=2.0)
    weight = torch.exp(logprobs.detach() - behaviour).clamp(max=2.0)
    expected = torch.where(mask, -advantages[:, None] * weight / mask.sum(), 0.0)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    logprobs, behaviour, advantages, mask, _ = make_batch(seed=5, spread=0.8)
    loss, grad, metrics = loss_and_grad("cispo", (logprobs, behaviour, advantages, mask, None))
    low, high = EPS["cispo"]
    ratio = torch.exp(logprobs.detach() - behaviour)
    # d/dlogp of -sg(clip(r)) A logp / N: the clipped weight, never 0, and no d clip(r) / dlogp term
    expected = torch.where(mask, -ratio.clamp(1 - low, 1 + high) * advantages[:, None] / mask.sum(), 0.0)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    capped = mask & (ratio > 1 + high)
    assert capped.any() and (grad[capped] != 0).all()
    assert metrics["clip_fraction"].item() == pytest.approx(capped.sum().item() / mask.sum().item())


def test_gspo_ratio_is_one_per_sequence():
    logprobs, behaviour, advantages, mask, _ = make_batch(seed=6, spread=0.05)
    _, grad, _ = loss_and_grad("gspo", (logprobs, behaviour, advantages, mask, None))
    low, high = EPS["gspo"]
    for r, (start, end) in enumerate(SPANS):
        n = end - start
        s = math.exp((logprobs[r, start:end].detach() - behaviour[r, start:end]).sum().item() / n)
        a = advantages[r].item()
        inside = (1 - low <= s <= 1 + high) or (s < 1 - low and a > 0) or (s > 1 + high and a < 0)
        # d/dlogp_t of -s A / |y|, averaged over the 4 sequences: every token of a row gets the same
        want = -s * a / n / len(SPANS) if inside else 0.0
        assert grad[r, start:end].tolist() == pytest.approx([want] * n, abs=1e-12), r


def test_sft_ignores_advantages_and_behaviour():
    logprobs, behaviour, advantages, mask, _ = make_batch(seed=7)
    sft = LossSettings(loss="sft")
    loss, _ = policy_loss(logprobs, behaviour, advantages, mask, settings=sft)
    other, _ = policy_loss(logprobs, torch.zeros_like(behaviour), -advantages * 5, mask, settings=sft)
    assert loss.item() == other.item() == pytest.approx(-logprobs[mask].mean().item())
    # a KL penalty or TIS does not apply to supervised batches either
    with_ref, metrics = policy_loss(logprobs, behaviour, advantages, mask, logprobs.detach() - 1,
                                   settings=LossSettings(loss="sft", kl_coef=1.0, tis_cap=1.1))  # fmt: skip
    assert with_ref.item() == loss.item() and "kl" not in metrics


@pytest.mark.parametrize("name", list(LOSSES))
def test_shards_with_batch_wide_normalisers_add_up_to_the_whole_batch(name):
    """Data parallelism: rows split across ranks (and micro-batches), each normalised by the whole batch."""
    logprobs, behaviour, advantages, mask, ref = make_batch(seed=8)
    s = settings(name, kl_coef=0.1, tis_cap=1.2)
    whole, whole_metrics = policy_loss(logprobs, behaviour, advantages, mask, ref, settings=s)
    norm = Normalisers.of(mask)
    shards = [
        policy_loss(logprobs[r], behaviour[r], advantages[r], mask[r], ref[r], settings=s, norm=norm)
        for r in ([0, 2], [1], [3])
    ]
    assert sum(loss for loss, _ in shards).item() == pytest.approx(whole.item(), abs=1e-12)
    for key, value in whole_metrics.items():
        assert sum(m[key] for _, m in shards).item() == pytest.approx(value.item(), abs=1e-12), key


def test_default_clip_ranges_are_the_papers():
    assert (LOSSES["grpo"].clip_eps_low, LOSSES["grpo"].clip_eps_high) == (0.2, 0.2)
    assert (LOSSES["dapo"].clip_eps_low, LOSSES["dapo"].clip_eps_high) == (0.2, 0.28)
    assert (LOSSES["gspo"].clip_eps_low, LOSSES["gspo"].clip_eps_high) == (3e-4, 4e-4)


def test_dapo_with_symmetric_clip_is_the_previous_token_level_loss():
    """apps/grpo/tiny.yaml keeps its numbers: `loss: dapo` with clipEpsHigh 0.2 is what the trainer computed before."""
    logprobs, behaviour, advantages, mask, _ = make_batch(seed=9)
    loss, _ = policy_loss(logprobs, behaviour, advantages, mask, settings=LossSettings(loss="dapo", clip_eps_high=0.2))
    ratio = torch.exp(logprobs - behaviour)[mask]
    a = advantages[:, None].expand_as(logprobs)[mask]
    before = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a).sum() / mask.sum()
    assert loss.item() == pytest.approx(before.item(), abs=1e-12)


@pytest.mark.parametrize(
    "algorithm, message",
    [
        ({"loss": "ppo"}, "spec.algorithm.loss: got 'ppo'; expected one of 'grpo', 'dr_grpo', 'dapo', 'gspo'"),
        ({"klEstimator": "k2"}, "spec.algorithm.klEstimator: got 'k2'; expected one of 'k1', 'k3'"),
    ],
)
def test_names_the_registries_lack_are_refused_at_start_naming_the_field(algorithm, message):
    # The schema holds plain names (it may not import torch); the trainer checks them when it starts.
    # Wrong types and ranges are the schema's to refuse: tests/test_algorithm_config.py.
    with pytest.raises(ValueError, match=message):
        check_settings(Algorithm.model_validate(algorithm))


def test_the_variant_decides_whether_advantages_are_scaled_by_the_std():
    # apps/grpo asks the variant (group_advantages(..., scale_by_std=...)), never compares its name.
    assert {name for name, v in LOSSES.items() if not v.scale_advantages_by_std} == {"dr_grpo"}


def test_settings_pick_the_variant_and_its_defaults():
    s = Algorithm.model_validate({"loss": "gspo", "klCoef": 0.01, "klEstimator": "k1", "tisCap": 2})
    assert (s.loss, s.kl_coef, s.kl_estimator, s.tis_cap) == ("gspo", 0.01, "k1", 2.0)
    assert s.clip_eps_low is None  # the variant's own default applies
    assert s.loss_settings("sft").loss == "sft" and s.loss_settings().loss == "gspo"
    with pytest.raises(ValueError, match="spec.algorithm.loss: got 'ppo'"):
        policy_loss(*make_batch()[:4], settings=LossSettings(loss="ppo"))
