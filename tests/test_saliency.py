import numpy as np
import pytest
import torch
from conftest import tiny_generator

from sapf.engine.data import load_dataset
from sapf.engine.privacy import PrivacyLedger
from sapf.engine.saliency import SaliencyQuery, candidate_modules, choose_matrices, noisy_saliency_scores, select_top


@pytest.fixture(scope="module")
def small_data():
    ds = load_dataset("mnist5k", 16, 1)
    return ds.subset(np.arange(0, 5000, 125))  # 40 real digits


def test_candidates_are_the_attention_projections():
    gen = tiny_generator()
    names = candidate_modules(gen.unet)
    assert len(names) % 4 == 0 and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")
                                       for n in names)
    assert {n.split(".")[0] for n in names} == {"down_blocks", "mid_block", "up_blocks"}
    assert len(candidate_modules(gen.unet, "all")) > len(names)


@pytest.mark.parametrize("multiplicity", [1, 4])  # K replicas of the record: averaged before the clip
@pytest.mark.parametrize("score,bound", [("sqnorm", lambda c: c**2), ("norm", lambda c: c)])
def test_one_example_moves_the_scores_by_at_most_the_sensitivity(small_data, score, bound, multiplicity):
    gen = tiny_generator()
    clip = 1e-4  # far below the gradient norm, so the clip binds
    one = small_data.subset([3])
    q = SaliencyQuery(clip=clip, score=score, multiplicity=multiplicity)
    _, scores = noisy_saliency_scores(gen, one, q, 0.0, None, show_progress=False)
    assert np.linalg.norm(scores) <= bound(clip) * (1 + 1e-5)
    if score == "sqnorm":  # the whole-vector clip makes the block scores sum to exactly C²
        assert scores.sum() == pytest.approx(clip**2, rel=1e-4)


ATTENTION_QUERY = SaliencyQuery(clip=1.0, candidates="attention")  # the planted matrix competes with its peers


def test_planted_salient_matrix_ranks_first(small_data):
    gen = tiny_generator()
    planted = "mid_block.attentions.0.to_out.0"
    base_names, base_scores = noisy_saliency_scores(gen, small_data, ATTENTION_QUERY, 0.0, None, False)
    assert base_names[int(np.argmax(base_scores))] != planted  # not first on its own
    attn = gen.unet.mid_block.attentions[0]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = gen.unet(x, torch.tensor([3, 700]), torch.tensor([1, 2])).sample
        # Reparametrise: values ×30, output projection ÷30. The model computes the same function,
        # but to_out.0 now sees a 30× larger input, so its gradient is 30× larger.
        attn.to_v.weight.mul_(30)
        attn.to_v.bias.mul_(30)
        attn.to_out[0].weight.div_(30)
        after = gen.unet(x, torch.tensor([3, 700]), torch.tensor([1, 2])).sample
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    ledger = PrivacyLedger(10.0, 1e-4)
    names, scores = noisy_saliency_scores(gen, small_data, ATTENTION_QUERY, 0.5, ledger, False)
    assert names[int(np.argmax(scores))] == planted
    assert planted in select_top(names, scores, 0.1)
    assert ledger.mechanisms[0].name == "saliency-query" and ledger.mechanisms[0].noise_multiplier == 0.5


def test_selection_noise_is_fresh_and_the_seed_drives_only_public_choices(small_data):
    gen = tiny_generator()
    q = SaliencyQuery(clip=1e-2)
    a = choose_matrices("saliency", gen, small_data, q, 0.3, 2.0, None, seed=5, show_progress=False)
    b = choose_matrices("saliency", gen, small_data, q, 0.3, 2.0, None, seed=5, show_progress=False)
    assert a.scores != b.scores  # the same seed does not repeat the noise
    assert len(a.selected) == round(0.3 * len(a.candidates))
    r1 = choose_matrices("random", gen, None, q, 0.3, 0, None, seed=5)
    r2 = choose_matrices("random", gen, None, q, 0.3, 0, None, seed=5)
    assert r1.selected == r2.selected and len(r1.selected) == len(a.selected)
    d = a.to_dict()
    assert d["sensitivity"] == pytest.approx(1e-4) and d["noise_multiplier"] == 2.0 and d["expected_examples"] == 40
    # A Poisson sample's real size is private: the selection records only the public q·N, whatever was drawn.
    half = choose_matrices("saliency", gen, small_data, SaliencyQuery(clip=1e-2, sample_rate=0.5), 0.3, 2.0, None,
                           seed=5, show_progress=False).to_dict()
    assert half["expected_examples"] == 20 and "examples_used" not in half
