"""sim_train.py as a specification: triplet mining, the situation split, the judge's mechanics, and a training
run that measurably helps. The real MiniLM is used throughout; every training run is a handful of steps."""

import inspect
import json

import numpy as np
import pytest
import torch

import harness.models
import reward
import sim_train
from eval_judge import judge_triplets
from harness.data import Perspective, Situation


@pytest.fixture
def one_thread():
    """Training on a CPU shared with other jobs: 1 thread is several times faster than 2 (no spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def situation(sid, *perspectives):
    return Situation(
        sid,
        f"situation {sid}",
        [Perspective(f"P{k}", e, paraphrase=para) for k, (e, para) in enumerate(perspectives)],
    )


# Explanations b and c both talk about money, a about honesty: under any sensible model c is b's closest.
HONESTY = (
    "Telling the truth to a friend matters even when it hurts.",
    "Being candid with a friend is important.",
)
COST = (
    "The trip costs more money than the family can spare this year.",
    "The family budget cannot cover it.",
)
DEBT = (
    "Borrowing money for a holiday can leave the family in debt.",
    "A loan for the vacation may sink them.",
)


def test_mine_triplets_pairs_each_explanation_with_its_paraphrase_and_most_similar_sibling(minilm):
    rows = sim_train.mine_triplets([situation("s1", HONESTY, COST, DEBT)], minilm)
    assert [(r["anchor"], r["positive"]) for r in rows] == [HONESTY, COST, DEBT], (
        "mine_triplets: anchor = each explanation, positive = its paraphrase, in order"
    )
    by_anchor = {r["anchor"]: r["negative"] for r in rows}
    assert by_anchor[COST[0]] == DEBT[0] and by_anchor[DEBT[0]] == COST[0], (
        "mine_triplets: the negative is the most anchor-similar other explanation of the same situation"
    )
    assert all(r["situation"] == "s1" and r["negative"] != r["anchor"] for r in rows), (
        "mine_triplets: each row names its situation; the anchor is never its own negative"
    )


def test_mine_triplets_skips_perspectives_without_paraphrase_or_sibling(minilm):
    rows = sim_train.mine_triplets(
        [situation("s1", HONESTY, (COST[0], None)), situation("s2", DEBT)], minilm
    )
    assert [(r["anchor"], r["negative"]) for r in rows] == [(HONESTY[0], COST[0])], (
        "mine_triplets: no triplet for a perspective without a paraphrase, nor in a situation of one perspective"
    )


def test_judge_triplets_take_first_yes_as_positive_and_most_similar_no_as_negative(minilm):
    s = situation("s1", HONESTY, COST, DEBT)
    same = {(e, p) for e, p in (HONESTY, COST, DEBT)}
    asked = []

    def judge(pairs):  # says Yes exactly to (explanation, its own paraphrase)
        asked.extend(pairs)
        return [pair in same for pair in pairs]

    rows = judge_triplets([s], minilm, judge, threshold=-1.0)  # -1: every pair is a candidate
    assert len(asked) == 3 * 5, (
        "judge_triplets: each explanation is asked against the other 5 sentences of the pool"
    )
    assert [(r["anchor"], r["positive"]) for r in rows] == [HONESTY, COST, DEBT], (
        "judge_triplets: the positive is the first candidate the judge says Yes to"
    )
    E = reward.unit_embeddings(minilm, [t for pair in (HONESTY, COST, DEBT) for t in pair])
    for r in rows:  # the negative is the most anchor-similar sentence judged No
        nos = [t for t in E if t != r["anchor"] and (r["anchor"], t) not in same]
        assert r["negative"] == max(nos, key=lambda t: E[r["anchor"]] @ E[t]), (
            "judge_triplets: the negative is the most anchor-similar candidate judged No"
        )


def test_judge_triplets_ask_nothing_below_the_threshold(minilm):
    rows = judge_triplets([situation("s1", HONESTY, COST)], minilm, lambda p: 1 / 0, threshold=1.01)
    assert rows == [], (
        "judge_triplets: no pair above the threshold: the judge is not called, no triplet"
    )


def test_judge_margins_are_one_number_per_pair_and_do_not_depend_on_padding(tiny_policy):
    model, tok = tiny_policy
    pairs = [("a", "b"), (HONESTY[0], COST[1]), (DEBT[0], "a much longer sentence " * 8)]
    from eval_judge import JUDGE_QUESTION
    from extras.judge import judge_margins

    batched = judge_margins(model, tok, pairs, JUDGE_QUESTION, batch_size=3)
    alone = np.concatenate(
        [judge_margins(model, tok, [p], JUDGE_QUESTION, batch_size=1) for p in pairs]
    )
    assert batched.shape == (3,) and np.isfinite(batched).all()
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_split_by_situation_holds_out_a_tenth_of_the_situations_disjointly():
    items = [situation(f"s{k}", HONESTY) for k in range(124)]
    train, held = sim_train.split_by_situation(items, 0.1, seed=0)
    assert len(held) == 12 and len(train) == 112
    assert {s.id for s in train}.isdisjoint(s.id for s in held) and len(train) + len(held) == len(
        items
    )
    assert [s.id for s in held] == [
        s.id for s in sim_train.split_by_situation(items, 0.1, seed=0)[1]
    ]


def test_evaluate_counts_matches_and_redundant_flags(minilm):
    s = situation("s1", HONESTY, COST, DEBT)
    m = sim_train.evaluate(
        minilm, [s], [dict(anchor=HONESTY[0], positive=HONESTY[1], negative=COST[0])]
    )
    assert m["triplet_accuracy"] == 1.0 and m["n_situations"] == 1 and m["redundant_rate"] == 0.0
    assert 0 <= m["match_recall"] <= 1 and (
        m["match_precision"] is None or 0 <= m["match_precision"] <= 1
    )


# Lexical traps: the negative repeats the anchor's words with the meaning flipped, the positive says the same in
# other words. A bag-of-words-ish model prefers the negative; training must teach it otherwise.
TRAPS = [
    ("The dog bit the man.", "A man was attacked by a canine.", "The man bit the dog."),
    (
        "She paid him before he finished the work.",
        "He got his money in advance.",
        "He paid her before she finished the work.",
    ),
    (
        "The company fired the workers after the strike.",
        "Staff lost their jobs once the walkout ended.",
        "The workers fired the company after the strike.",
    ),
    (
        "Parents should listen to their children.",
        "Kids deserve to be heard by mum and dad.",
        "Children should listen to their parents.",
    ),
    (
        "The tenant sued the landlord over the repairs.",
        "A renter took the property owner to court.",
        "The landlord sued the tenant over the repairs.",
    ),
    (
        "The student taught the teacher a lesson.",
        "The pupil showed the instructor something new.",
        "The teacher taught the student a lesson.",
    ),
    (
        "The government must protect the press.",
        "Journalism needs shielding by the state.",
        "The press must protect the government.",
    ),
    (
        "Doctors should trust their patients.",
        "Physicians ought to believe the people they treat.",
        "Patients should trust their doctors.",
    ),
]


def test_a_short_training_run_raises_triplet_accuracy_where_the_base_model_is_wrong(one_thread):
    import harness.models

    model = harness.models.load_embedder(device="cpu")
    rows = [dict(anchor=a, positive=p, negative=n) for a, p, n in TRAPS]
    before = sim_train.evaluate(model, [], rows)["triplet_accuracy"]
    losses = sim_train.train(model, rows, scale=20.0, batch_size=5, epochs=4, lr=3e-4, warmup=0.0)
    after = sim_train.evaluate(model, [], rows)["triplet_accuracy"]
    assert before == 0.0 and after >= 0.5, (before, after)  # 0.75 when written
    assert (
        len(losses) == 4 * 2 and losses[-1] < losses[0]
    )  # 8 triplets in batches of 5: 5 + 3 per epoch


@pytest.mark.parametrize("no_duplicates", [False, True])
def test_no_duplicates_keeps_a_text_out_of_a_batch_that_already_holds_it(
    monkeypatch, one_thread, no_duplicates
):
    """Each triplet's negative is the next triplet's anchor, as in mined data: a plain batch of all 6 holds 5 texts
    twice; with no_duplicates no batch holds any text twice."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    seen, forward = [], MultipleNegativesRankingLoss.forward

    def spy(self, features, labels):
        seen.append(
            [
                tuple(row.tolist())
                for f in features
                for row, m in zip(f["input_ids"], f["attention_mask"])
                for row in [row[m.bool()]]
            ]
        )  # every text of the batch, padding removed
        return forward(self, features, labels)

    monkeypatch.setattr(MultipleNegativesRankingLoss, "forward", spy)
    words = "alpha beta gamma delta epsilon zeta eta".split()
    rows = [
        dict(
            anchor=f"the {words[k]} view",
            positive=f"a {words[k]} opinion",
            negative=f"the {words[k + 1]} view",
        )
        for k in range(6)
    ]
    sim_train.train(
        harness.models.load_embedder(device="cpu"),
        rows,
        batch_size=6,
        epochs=1,
        no_duplicates=no_duplicates,
    )
    repeats = sum(len(b) - len(set(b)) for b in seen)
    assert seen and ((repeats == 0) if no_duplicates else (len(seen) == 1 and repeats == 5))


def test_mnrl_is_the_cross_entropy_over_scaled_cosines_by_hand(minilm):
    """The loss sim_train.train hands to the trainer (sim_train.mnrl at the project's default scale, 64), on one batch
    of 3 triplets: mean_k -log softmax_d(64 cos(a_k, d)) at d = p_k, over the 6 candidates d (the 3 positives, then
    the 3 hard negatives). In eval mode: the trainer's logged loss has dropout on, so it is not the same number."""
    assert (
        sim_train.Config.scale == 64.0
        and inspect.signature(sim_train.train).parameters["scale"].default == 64.0
    )
    rows = [
        dict(
            anchor="the honesty view", positive="a truthful opinion", negative="the kindness view"
        ),
        dict(anchor="the kindness view", positive="a caring opinion", negative="the fairness view"),
        dict(
            anchor="the fairness view",
            positive="an even-handed opinion",
            negative="the honesty view",
        ),
    ]
    E = {
        t: v.astype(np.float64)
        for t, v in reward.unit_embeddings(minilm, [r[k] for r in rows for k in r]).items()
    }
    A = np.stack([E[r["anchor"]] for r in rows])  # [3, dim]
    D = np.stack([E[r["positive"]] for r in rows] + [E[r["negative"]] for r in rows])  # [6, dim]
    z = 64.0 * A @ D.T  # [3, 6]
    log_softmax = (
        z
        - z.max(1, keepdims=True)
        - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    )
    by_hand = float(-log_softmax[np.arange(3), np.arange(3)].mean())
    features = [minilm.tokenize([r[k] for r in rows]) for k in sim_train.FIELDS]
    with torch.no_grad():
        loss = sim_train.mnrl(minilm, sim_train.Config.scale)(features, None)
    assert float(loss) == pytest.approx(by_hand, rel=1e-4), (
        "MNRL: cross-entropy over 64 x the cosines to every positive and hard negative of the batch"
    )


def test_fewer_triplets_than_a_batch_is_an_error(minilm):
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        sim_train.train(minilm, [dict(anchor="a", positive="b", negative="c")] * 5)


def write(path, items, paraphrase=True):
    with open(path, "w") as f:
        for s in items:
            f.write(
                json.dumps(
                    dict(
                        id=s.id,
                        situation=s.situation,
                        perspectives=[
                            dict(
                                name=p.name,
                                explanation=p.explanation,
                                **({"paraphrase": p.paraphrase} if paraphrase else {}),
                            )
                            for p in s.perspectives
                        ],
                    )
                )
                + "\n"
            )


def test_data_without_paraphrases_and_without_judge_says_how_to_get_triplets(tmp_path):
    write(
        tmp_path / "d.jsonl",
        [situation(f"s{k}", HONESTY, COST) for k in range(3)],
        paraphrase=False,
    )
    with pytest.raises(ValueError, match="--judge MODEL"):
        sim_train.main(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "out")])


def test_the_cli_trains_on_no_held_out_situation_and_saves_a_model_reward_can_load(
    tmp_path, one_thread
):

    items = [
        situation(f"s{k}", (a, p), (n, p + " Indeed.")) for k, (a, p, n) in enumerate(TRAPS * 2)
    ]
    items = [type(s)(f"{s.id}-{k}", s.situation, s.perspectives) for k, s in enumerate(items)]
    write(tmp_path / "d.jsonl", items)
    out = tmp_path / "out"
    result = sim_train.main(
        [
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--held-out",
            "0.25",
        ]
    )
    rows = [json.loads(line) for line in open(out / "triplets.jsonl")]
    held = {r["situation"] for r in rows if r["split"] == "eval"}
    assert len(held) == 4 and held.isdisjoint(r["situation"] for r in rows if r["split"] == "train")
    assert result["n_train_triplets"] == 24 and result["before"]["eval"]["n_triplets"] == 8
    assert set(json.load(open(out / "sim_eval.json"))["after"]["eval"]) >= {
        "triplet_accuracy",
        "match_recall",
    }
    assert harness.models.load_embedder(str(out)).encode(["x"]).shape == (1, 384)
