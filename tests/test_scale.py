"""scale/ as a specification: the OP reward and our data on TRL (trl_opgrpo.py) and on verl (verl_reward.py,
to_verl_parquet.py) give the numbers that reward.score_answers gives, and the paper's recipe maps onto TRL's knobs.
CPU only: TRL runs 2 RL steps of the tiny random model with the real MiniLM; verl itself is not installed."""

import os
import subprocess
import sys

import pytest
import torch
from test_reward import (
    REF,
    SITUATION,
    BagOfWords,
)  # test_reward.py's stand-in embedder and hand-made reference

import harness.cli
import harness.data
import opgrpo_min as om
import reward
from scale import prompt_messages, to_verl_parquet, trl_opgrpo, verl_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "data", "train.jsonl")


@pytest.fixture(scope="module")
def items():
    return harness.data.load_situations(TRAIN)


def totals(answers, references, embedder, **options):
    return [b.total for b in reward.score_answers(answers, references, embedder, **options)]


def layouts(s):
    """Answers to situation s in layouts where the authors' code and a careless port differ: the reference answer,
    its perspective lines indented (one perspective for the split), and its core block after a preamble (not the
    strict layout: the whole text is embedded)."""
    ref = om.reference_answer(s)
    lines = reward.split_perspectives(reward.similarity_text(ref))
    return [
        ref,
        ref.replace("\n" + lines[1], "\n  " + lines[1]),
        "Sure, here it is.\n" + lines[0] + "\n" + ref,
    ]


# ================================================================ the scripts as programs
def test_scale_modules_import_without_loading_anything():
    code = (
        "import sys, scale.trl_opgrpo, scale.verl_reward, scale.to_verl_parquet as t;"
        "assert 'trl' not in sys.modules and 'sentence_transformers' not in sys.modules;"
        "assert scale.verl_reward._EMBEDDER is None"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_trl_script_help_runs_as_a_file_and_lists_the_paper_knobs():
    out = subprocess.run(
        [sys.executable, "scale/trl_opgrpo.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for flag in (
        "--group-size",
        "--beta",
        "--clip-eps",
        "--dual-clip",
        "--updates-per-step",
        "--sft-steps",
    ):
        assert flag in out.stdout


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--group-size", "1"], "--group-size 1: out of range, must satisfy v >= 2"),
        (["--dual-clip", "1.1"], "--dual-clip 1.1"),
        (["--model", "./no/such/dir"], "--model ./no/such/dir: no such file"),
    ],
)
def test_trl_script_bad_input_is_one_line_error(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        harness.cli.run_cli(trl_opgrpo.main, argv)
    message = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert words in message and "\n" not in message.strip()


# ================================================================ the paper's recipe as GRPOConfig
def test_grpo_config_holds_the_paper_recipe_by_default(tmp_path):
    pytest.importorskip("trl")
    a = trl_opgrpo.parse_args(["--out", str(tmp_path)])
    c = trl_opgrpo.grpo_config(
        a, world_size=1
    )  # a test process is one process; accelerate sets WORLD_SIZE
    assert (c.num_generations, c.generation_batch_size, c.max_completion_length) == (10, 10240, 800)
    assert (c.temperature, c.top_p, c.top_k) == (1.0, 1.0, 0)
    assert (c.epsilon, c.epsilon_high, c.delta, c.beta) == (0.2, 0.2, 3.0, 0.001)
    assert (c.loss_type, c.scale_rewards, c.num_iterations) == ("dapo", "group", 1)
    assert (c.learning_rate, c.lr_scheduler_type, c.weight_decay, c.max_grad_norm) == (
        1e-6,
        "constant",
        0.01,
        1.0,
    )
    # 4 updates per batch of rollouts: TRL splits a generation into steps_per_generation micro-steps, and
    # gradient_accumulation_steps of them make one optimizer step
    assert c.steps_per_generation == 4 * c.gradient_accumulation_steps
    assert c.per_device_train_batch_size * c.gradient_accumulation_steps == 10240 // 4
    assert c.max_steps == 150 * 4


def test_grpo_config_refuses_a_batch_that_does_not_split_into_the_updates():
    pytest.importorskip("trl")
    a = trl_opgrpo.parse_args(
        ["--prompts-per-step", "3", "--group-size", "2", "--updates-per-step", "4"]
    )
    with pytest.raises(ValueError, match="--updates-per-step 4"):
        trl_opgrpo.grpo_config(a, world_size=1)


@pytest.mark.reveals("grpo_loss")
def test_trl_ratio_cap_delta_is_the_recipes_dual_clip():
    """TRL's two-sided loss, -min(min(r, delta) A, clip(r, 1-e, 1+e) A), equals opgrpo_min's clip plus dual clip
    (for A < 0 the loss is capped at c |A|) whenever delta = c > 1 + e; checked on ratios on both sides of c."""
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5), torch.randn(6, 5)
    old[:2, :2] = logp[:2, :2] - 2.0  # ratio e^2 = 7.4 > c = 3, for A = -1 and for A = +1
    adv, mask = torch.tensor([-1.0, 1.0, -0.5, 0.5, -2.0, 2.0]), torch.ones(6, 5)
    logp.requires_grad_(True)
    ours, _ = om.grpo_loss(logp, old, None, adv, mask, clip_eps=0.2, beta=0.0, dual_clip=3.0)
    r, A = torch.exp(logp - old), adv[:, None]  # [6, 5], [6, 1]
    trl = (-torch.min(r.clamp(max=3.0) * A, r.clamp(0.8, 1.2) * A)).mean()
    assert torch.allclose(ours, trl)
    assert torch.allclose(
        *(torch.autograd.grad(x, logp)[0] for x in (ours, trl))
    )  # the same gradient too


# ================================================================ TRL: the OP reward as a reward function
def test_trl_reward_takes_trl_arguments_and_conversational_completions():
    fn = trl_opgrpo.TRLReward(BagOfWords(), mask_keywords="both")
    assert fn.__name__ == "op_reward"
    plain = fn(
        prompts=["p", "p"],
        completions=[REF, ""],
        reference=[REF, REF],
        situation=[SITUATION] * 2,
        completion_ids=[[1], [2]],
        trainer_state=None,
    )
    chat = fn(
        prompts=[[{"role": "user", "content": "p"}]] * 2,
        completions=[
            [{"role": "assistant", "content": REF}],
            [{"role": "assistant", "content": ""}],
        ],
        reference=[REF, REF],
        situation=[SITUATION] * 2,
    )
    assert plain == chat == [pytest.approx(2.0), 0.0]


def test_trl_reward_is_score_answers_on_indented_and_non_strict_answers(minilm, items):
    s = items[0]
    answers = layouts(s)
    got = trl_opgrpo.TRLReward(minilm)(
        prompts=["p"] * 3,
        completions=answers,
        reference=[om.reference_answer(s)] * 3,
        situation=[s.situation] * 3,
    )
    want = reward.score_answers(
        answers, [om.reference_answer(s)] * 3, minilm, situations=[s.situation] * 3
    )
    assert got == pytest.approx([b.total for b in want], abs=1e-6)
    assert [b.tag for b in want] == [0.0, 0.0, -0.2] and want[1].rate < want[
        0
    ].rate  # the layouts do differ


def test_trl_reward_names_the_missing_reference_column():
    with pytest.raises(ValueError, match="'reference'"):
        trl_opgrpo.TRLReward(BagOfWords())(prompts=["p"], completions=["c"])
    with pytest.warns(UserWarning, match="situation"):
        trl_opgrpo.TRLReward(BagOfWords())(prompts=["p"], completions=[REF], reference=[REF])


# ================================================================ TRL: 2 real steps, the reward it logs
def captured(embedder):
    """trl_opgrpo.TRLReward wrapped to record what TRL handed it and what it returned."""
    score, calls = trl_opgrpo.TRLReward(embedder), []

    def op_reward(**kw):
        out = score(**kw)
        calls.append(
            dict(
                completions=kw["completions"],
                reference=kw["reference"],
                situation=kw["situation"],
                prompts=kw["prompts"],
                rewards=out,
            )
        )
        return out

    return op_reward, calls


def text_of(completion):
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def run_trl(tiny_model_dir, tmp_path, embedder, *extra):
    pytest.importorskip("trl")
    fn, calls = captured(embedder)
    a = trl_opgrpo.parse_args(
        [
            "--model",
            tiny_model_dir,
            "--train-data",
            TRAIN,
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--updates-per-step",
            "1",
            "--micro-batch",
            "4",
            "--save-every",
            "0",
            "--gradient-checkpointing",
            "0",
            "--lr",
            "1e-5",
            *extra,
        ]
    )
    trainer = trl_opgrpo.train(a, reward_fn=fn)
    rows = [r for r in trainer.state.log_history if "rewards/op_reward/mean" in r]
    return trainer, rows, calls


def test_trl_two_steps_log_the_op_reward_of_their_answers(tiny_model_dir, minilm, tmp_path, items):
    trainer, rows, calls = run_trl(
        tiny_model_dir,
        tmp_path,
        minilm,
        "--max-new-tokens",
        "8",
        "--updates-per-step",
        "2",
        "--micro-batch",
        "2",
    )  # the paper's beta, 2 updates
    assert (
        trainer.state.global_step == 2 * 2 and len(calls) == 2 and len(rows) == 2
    )  # one log row per RL step
    by_situation = {s.situation: s for s in items}
    for row, call in zip(rows, calls):
        assert len(call["completions"]) == 4  # P x G answers per step
        assert [prompt_messages(s) for s in call["situation"]] == call["prompts"]
        answers = [text_of(c) for c in call["completions"]]
        refs = [om.reference_answer(by_situation[s]) for s in call["situation"]]
        again = totals(answers, refs, minilm, situations=call["situation"])
        assert call["rewards"] == pytest.approx(again, abs=1e-6)
        assert row["rewards/op_reward/mean"] == pytest.approx(sum(again) / len(again), abs=1e-6)
    assert os.path.isfile(os.path.join(tmp_path, "run", "final", "config.json"))


def test_trl_passes_each_answer_the_reference_of_its_own_prompt(
    tiny_model_dir, minilm, tmp_path, items, monkeypatch
):
    """Generation is replaced by known answers (the first one or two perspective lines of the prompt's reference),
    so a reward scored against the wrong reference or situation would show in the mean TRL logs."""
    pytest.importorskip("trl")
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    by_situation = {s.situation: s for s in items}

    def answer(s, k):
        return "\n".join(
            reward.split_perspectives(reward.similarity_text(om.reference_answer(s)))[: 1 + k % 2]
        )

    def known_answers(self, input_ids, attention_mask=None, generation_config=None, **kw):
        prompts = tok.batch_decode(input_ids, skip_special_tokens=True)
        ids = []
        for k, p in enumerate(prompts):
            s = next(by_situation[x] for x in by_situation if x in p)
            ids.append(tok(answer(s, k), add_special_tokens=False).input_ids + [tok.eos_token_id])
        width = max(map(len, ids))
        pad = [row + [tok.eos_token_id] * (width - len(row)) for row in ids]
        return torch.cat([input_ids, torch.tensor(pad, device=input_ids.device)], 1)  # [B, L + T]

    monkeypatch.setattr(LlamaForCausalLM, "generate", known_answers)

    trainer, rows, calls = run_trl(
        tiny_model_dir, tmp_path, minilm, "--max-new-tokens", "120", "--beta", "0"
    )
    for row, call in zip(rows, calls):
        ss = [by_situation[s] for s in call["situation"]]
        expected = totals(
            [answer(s, k) for k, s in enumerate(ss)],
            [om.reference_answer(s) for s in ss],
            minilm,
            situations=[s.situation for s in ss],
        )
        assert [text_of(c) for c in call["completions"]] == [answer(s, k) for k, s in enumerate(ss)]
        assert row["rewards/op_reward/mean"] == pytest.approx(
            sum(expected) / len(expected), abs=1e-6
        )
        assert min(expected) > 0.3 and min(expected) < max(expected)  # the check has teeth: a wrong
        # reference would match no perspective (0.2: uniqueness, format, tag), and one line or two differ


def test_trl_sft_warm_start_is_saved_and_grpo_starts_from_it(tiny_model_dir, minilm, tmp_path):
    from safetensors.torch import load_file

    trainer, rows, calls = run_trl(
        tiny_model_dir,
        tmp_path,
        minilm,
        "--max-new-tokens",
        "8",
        "--steps",
        "1",
        "--sft-steps",
        "2",
        "--sft-batch",
        "2",
        "--sft-lr",
        "1e-3",
        "--beta",
        "0",
    )
    sft = os.path.join(tmp_path, "run", "sft")
    assert trainer.model.config._name_or_path == sft and len(calls) == 1
    before, after = (load_file(os.path.join(d, "model.safetensors")) for d in (tiny_model_dir, sft))
    assert any(
        not torch.equal(before[k], after[k]) for k in before
    )  # the SFT steps moved the weights


# ================================================================ verl: compute_score
@pytest.fixture
def verl_embedder(monkeypatch, minilm):
    monkeypatch.setattr(
        verl_reward, "_EMBEDDER", minilm
    )  # the default model, already loaded by the session
    return minilm


def test_compute_score_is_score_answers_for_the_same_answer(verl_embedder, items):
    s, other = items[0], items[1]
    row = to_verl_parquet.verl_rows([s], "train")[0]
    gt, info = row["reward_model"]["ground_truth"], row["extra_info"]
    cases = [
        (om.reference_answer(s), "answer"),
        (om.reference_answer(other), "answer"),
        ("", "answer"),
        (om.reference_answer(s), "both"),
    ] + [(a, "answer") for a in layouts(s)[1:]]  # indented, non-strict
    for answer, mask in cases:
        want = reward.score_answers(
            [answer],
            [om.reference_answer(s)],
            verl_embedder,
            situations=[s.situation],
            mask_keywords=mask,
        )[0]
        got = verl_reward.compute_score("opgrpo", answer, gt, info, mask_keywords=mask)
        assert got["score"] == pytest.approx(want.total, abs=1e-6)
        assert got == pytest.approx(
            dict(score=want.total, **{k: v for k, v in vars(want).items() if k != "total"})
        )
    assert got["score"] > 1.0  # the reference answer covers its own perspectives
    text = verl_reward.compute_score(
        "opgrpo", "", om.reference_answer(s), info
    )  # the text form is accepted too
    assert text["score"] == 0.0


def test_compute_score_takes_verls_extra_arguments_and_numpy_lists(verl_embedder, items):
    import numpy as np

    s = items[0]
    gt = to_verl_parquet.verl_rows([s], "train")[0]["reward_model"]["ground_truth"]
    a = verl_reward.compute_score(
        data_source="opgrpo",
        solution_str=om.reference_answer(s),
        ground_truth=gt,
        extra_info=dict(situation=s.situation, num_turns=None),
        reward_router_address=None,
    )
    b = verl_reward.compute_score(
        "opgrpo", om.reference_answer(s), np.array(gt, dtype=object), dict(situation=s.situation)
    )
    assert a == b


@pytest.mark.parametrize(
    "bad", [None, 3, "", "  \n", [], ["  "], [1, 2], ["ok", None], {"ground_truth": "x"}]
)
def test_compute_score_malformed_ground_truth_is_a_clear_value_error(verl_embedder, bad):
    with pytest.raises(ValueError, match="ground_truth must be the reference perspectives"):
        verl_reward.compute_score("opgrpo", "In the perspective of A, a.", bad, {"situation": "x"})


def test_compute_score_loads_the_embedder_once_from_the_env(monkeypatch):
    loaded = []
    monkeypatch.setattr(verl_reward, "_EMBEDDER", None)
    monkeypatch.setattr(
        harness.models,
        "load_embedder",
        lambda name=None, device=None: loaded.append(name) or object(),
    )
    monkeypatch.setenv("OPGRPO_SIM_MODEL", "/models/my-estimator")
    first = verl_reward.embedder()
    assert verl_reward.embedder() is first and loaded == ["/models/my-estimator"]


# ================================================================ verl: the parquet layout
def test_parquet_round_trips_train_jsonl(tmp_path, items):
    pytest.importorskip("pyarrow")
    to_verl_parquet.main(["--train-data", TRAIN, "--test-data", "", "--out", str(tmp_path)])
    path = tmp_path / "train.parquet"
    assert to_verl_parquet.read_parquet(str(path)) == items
    assert sorted(os.listdir(tmp_path)) == ["train.parquet"]


def test_parquet_rows_are_what_verl_reads(tmp_path, items):
    """Read back as verl does (datasets' parquet loader): chat messages, the ground truth as the reference answer's
    perspective pieces, the situation in extra_info."""
    datasets = pytest.importorskip("datasets")
    to_verl_parquet.write_parquet(
        to_verl_parquet.verl_rows(items, "train"), str(tmp_path / "t.parquet")
    )
    ds = datasets.Dataset.from_parquet(str(tmp_path / "t.parquet"))
    assert len(ds) == len(items)
    for row, s in zip(ds, items):
        assert row["data_source"] == "opgrpo" and row["prompt"] == prompt_messages(s.situation)
        assert row["reward_model"]["ground_truth"] == reward.split_perspectives(
            reward.similarity_text(om.reference_answer(s))
        )
        assert row["extra_info"]["situation"] == s.situation and row["extra_info"]["id"] == s.id


def test_reading_a_parquet_from_elsewhere_names_the_row(tmp_path):
    pytest.importorskip("pyarrow")
    to_verl_parquet.write_parquet(
        [dict(data_source="gsm8k", prompt="2 + 2?")], str(tmp_path / "x.parquet")
    )
    with pytest.raises(
        harness.data.DataError,
        match=r"x.parquet, row 0: not a row written by scale/to_verl_parquet.py",
    ):
        to_verl_parquet.read_parquet(str(tmp_path / "x.parquet"))
