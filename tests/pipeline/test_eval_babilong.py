"""BABILong: bAbI parsing, the held-out task data, the haystack builder, the benchmark's answer matching, and
`lm2 eval babilong` on tiny random LM2 and vanilla folders (answers checked against a plain greedy loop)."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm2.model.errors import EvalError
from lm2.pipeline.cli import main
from lm2.pipeline.eval.babilong.answers import is_correct, last_mentioned
from lm2.pipeline.eval.babilong.babi import (
    HELDOUT_FOLDER,
    TASK_LABELS,
    BabiSample,
    read_text,
    stories,
    story_samples,
    task_samples,
)
from lm2.pipeline.eval.babilong.continuations import candidate_ids, chosen, forced_choice, greedy, read_prompt
from lm2.pipeline.eval.babilong.distance import bucket, bucket_label, fact_place
from lm2.pipeline.eval.babilong.samples import Background, haystack, parse_length, prompt, sample_rng, split_sentences
from tests.pipeline.eval_fixtures import VANILLA_TOKENS

CORPUS = Path(__file__).parents[2] / "corpus"
SHARED_BABI = Path(__file__).parents[3] / "shared" / "data" / "babi"
STORY = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra journeyed to the garden.
2 Where is Sandra? \tgarden\t1
"""


def test_a_question_becomes_a_sample_with_the_facts_before_it():
    first, second = stories(STORY)
    assert [s.facts for s in story_samples(first)] == [
        ("Mary moved to the bathroom.", "John went to the hallway."),
        ("Mary moved to the bathroom.", "John went to the hallway.", "Daniel went back to the hallway."),
    ]
    assert [(s.question, s.answer) for s in story_samples(first)] == [
        ("Where is Mary?", "bathroom"),
        ("Where is Daniel?", "hallway"),
    ]
    assert story_samples(second)[0].facts == ("Sandra journeyed to the garden.",)
    # Supporting line numbers become fact indices (line 4 is the third fact: line 3 is a question).
    assert [s.supporting for s in story_samples(first)] == [(0,), (2,)]


@pytest.mark.parametrize("task", list(TASK_LABELS))
def test_held_out_stories_are_the_tail_of_the_training_files_and_answers_are_task_words(task):
    samples = task_samples(HELDOUT_FOLDER, task)
    assert len(samples) >= 200
    labels = {label.lower() for label in TASK_LABELS[task]}
    assert all(set(s.answer.lower().split(",")) <= labels for s in samples)
    if SHARED_BABI.is_dir():
        train = read_text(next(SHARED_BABI.glob(f"{task}_*")))
        heldout = read_text(next(HELDOUT_FOLDER.glob(f"{task}_*")))
        assert train.endswith(heldout) and train[: -len(heldout)].endswith("\n")


def test_qa1_supporting_facts_name_the_person_and_the_answer():
    """An independent reading of the held-out qa1 samples: the last supporting fact is where the question's person
    last went, so it names the person and the answer room."""
    for sample in task_samples(HELDOUT_FOLDER, "qa1"):
        fact = sample.facts[sample.supporting[-1]]
        person = sample.question.removeprefix("Where is ").removesuffix("?")
        assert fact.startswith(person) and fact.endswith(f"{sample.answer}."), (sample.question, fact)


@pytest.mark.parametrize(
    ("task", "target", "output", "question", "right"),
    [
        ("qa1", "kitchen", " kitchen.", "Where is Mary?", True),
        ("qa1", "kitchen", " the Kitchen, I think", "Where is Mary?", True),
        ("qa1", "kitchen", " kitchen or garden.", "Where is Mary?", False),  # two answer words: wrong
        ("qa1", "kitchen", " garden. Then kitchen.", "Where is Mary?", False),  # only the first sentence counts
        ("qa1", "kitchen", " nothing", "Where is Mary?", False),
        ("qa4", "office", " office, not the garden", "What is the garden east of?", True),  # question words ignored
        ("qa5", "Fred", " fred gave it", "Who did Mary give the milk to?", True),
        ("qa8", "apple,milk", " milk and apple.", "What is Mary carrying?", True),
        ("qa8", "apple,milk", " milk.", "What is Mary carrying?", False),
        ("qa8", "nothing", " nothing.", "What is Mary carrying?", True),
        ("qa10", "maybe", " maybe.", "Is Bill in the park?", True),
    ],
)
def test_answer_matching_is_the_benchmarks(task, target, output, question, right):
    assert is_correct(task, target, output, question) is right


def test_lengths_parse_and_bad_ones_are_refused():
    assert [parse_length(x) for x in ("0k", "4k", "128K", "300")] == [0, 4096, 131072, 300]
    with pytest.raises(EvalError, match="write e.g. 0k"):
        parse_length("4kb")


def test_sentences_split_at_ends_before_capitals():
    text = 'He came home. She said: "Go!" Then\nhe left? Yes, at once. ok Go.'
    assert split_sentences(text) == ["He came home.", 'She said: "Go!"', "Then he left?", "Yes, at once. ok Go."]


@pytest.fixture(scope="module")
def tokenizer(hf_lm2):
    return AutoTokenizer.from_pretrained(hf_lm2)


@pytest.fixture(scope="module")
def background(tokenizer):
    return Background([CORPUS], tokenizer)


def test_haystack_holds_the_facts_in_order_at_the_target_length(tokenizer, background):
    sample = task_samples(HELDOUT_FOLDER, "qa2")[5]
    for length in (0, 300, 2048):
        built = haystack(sample, length, background, sample_rng(0, "qa2", length, 5))
        again = haystack(sample, length, background, sample_rng(0, "qa2", length, 5))
        assert built == again  # deterministic by seed
        found = [built.context.find(fact) for fact in sample.facts]
        assert -1 not in found and found == sorted(found)
        assert [built.context[start:end] for start, end in built.fact_spans] == list(sample.facts)
        if length == 0:
            assert built.context == " ".join(sample.facts)
        else:  # counted piece by piece; the joined text may merge or split a few pieces at the seams
            assert abs(len(tokenizer(built.context).input_ids) - length) <= 0.03 * length
            assert len(set(built.fact_positions)) > 1  # the facts are spread, not clumped
    other = haystack(sample, 300, background, sample_rng(1, "qa2", 300, 5))
    assert other.context != haystack(sample, 300, background, sample_rng(0, "qa2", 300, 5)).context
    text = prompt(sample, "CONTEXT")
    assert text.startswith("CONTEXT") and text.endswith(f"Question: {sample.question}\nAnswer:")


def plain_greedy(model, ids, steps):
    """Greedy decoding by full forwards without any cache: the independent computation."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat((tokens, model(tokens, use_cache=False).logits[:, -1:].argmax(-1)), dim=1)
    return tokens[0, len(ids) :].tolist()


def run_command(model, out, lengths, capsys):
    code = main(
        [
            "eval",
            "babilong",
            "--model",
            str(model),
            "--tasks",
            "qa1,qa5",
            "--lengths",
            lengths,
            "--samples",
            "3",
            "--background",
            str(CORPUS),
            "--output",
            str(out),
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    )  # answers are compared with the CPU's (the GPU's run in test_gpu.py)
    assert code == 0
    return json.loads((out / "results.json").read_text()), capsys.readouterr()


def check_answers(results, folder, tokenizer, background, kept=None):
    """Each cell's first output is the plain greedy continuation of its (tail of the) prompt and its forced choice
    the best of full forwards per candidate (one sample per cell: full forwards are slow); every accuracy is the
    benchmark's metric on the recorded outputs, or the recorded choices against the targets; the distance rows
    count every record once, and a supporting fact is in view exactly when its text is in the tokens read."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    samples = {task: task_samples(HELDOUT_FOLDER, task) for task in results["tasks"]}
    for cell in results["cells"]:
        length, first = parse_length(cell["length"]), cell["records"][0]
        sample = samples[cell["task"]][first["index"]]
        context = haystack(sample, length, background, sample_rng(0, cell["task"], length, first["index"])).context
        ids = tokenizer(prompt(sample, context), add_special_tokens=False).input_ids
        assert len(ids) == first["prompt_tokens"]
        text = prompt(sample, context)
        candidates = candidate_ids(
            lambda t: tokenizer(t, add_special_tokens=False).input_ids, text, ids, TASK_LABELS[cell["task"]]
        )
        ids = ids[-kept:] if kept else ids
        assert first["output"] == tokenizer.decode(plain_greedy(model, ids, 4), skip_special_tokens=True)
        expected = full_forward_scores(model, ids, candidates)
        assert first["scores"] == pytest.approx(expected, abs=1e-3)
        assert first["forced"] == max(expected, key=expected.get)
        read = tokenizer.decode(ids)
        for record in cell["records"]:
            sample = samples[cell["task"]][record["index"]]
            assert record["correct"] == is_correct(cell["task"], sample.answer, record["output"], sample.question)
            assert record["forced_correct"] == (record["forced"].lower() == sample.answer.lower())
            if record is first:
                assert record["facts_in_view"] == (sample.facts[sample.supporting[0]] in read)
        assert cell["correct"] == sum(r["correct"] for r in cell["records"]) and cell["samples"] == 3
        assert cell["accuracy"] == pytest.approx(100 * cell["correct"] / 3)
        assert cell["forced_accuracy"] == pytest.approx(100 * sum(r["forced_correct"] for r in cell["records"]) / 3)
        check_recency(cell, samples[cell["task"]])
    for task in results["tasks"]:
        rows = [row for row in results["distance"] if row["task"] == task]
        records = [r for c in results["cells"] if c["task"] == task for r in c["records"]]
        assert sum(row["samples"] for row in rows) == len(records)
        assert sum(row["correct"] for row in rows) == sum(r["correct"] for r in records)
        assert sum(row["facts_cut_off"] for row in rows) == sum(not r["facts_in_view"] for r in records)
        assert {bucket_label(*bucket(r["distance"])) for r in records} == {row["bucket"] for row in rows}


def named_last(task: str, facts: tuple[str, ...]) -> str | None:
    """The answer word whose last whole-word occurrence in the facts comes latest."""
    text = " ".join(facts).lower()
    ends = {w: max((m.end() for m in re.finditer(rf"\b{w.lower()}\b", text)), default=-1) for w in TASK_LABELS[task]}
    word = max(ends, key=ends.get)
    return word if ends[word] >= 0 else None


def check_recency(cell: dict, samples: list) -> None:
    """The recency figures of a cell, recomputed from its records and the samples' facts."""
    for record in cell["records"]:
        assert record["last_mentioned"] == named_last(cell["task"], samples[record["index"]].facts)
    scored = [r for r in cell["records"] if r["last_mentioned"] is not None and r["forced_correct"] is not None]
    if not scored:
        assert cell["recency_accuracy"] is None and cell["forced_is_last_mentioned"] is None
        return
    hits = sum(r["last_mentioned"].lower() == r["target"].lower() for r in scored)
    follows = sum(r["last_mentioned"].lower() == r["forced"].lower() for r in scored)
    assert cell["recency_accuracy"] == pytest.approx(100 * hits / len(scored))
    assert cell["forced_is_last_mentioned"] == pytest.approx(100 * follows / len(scored))


def test_the_recency_shortcut_answers_with_the_answer_word_named_last():
    facts = ("Mary went to the kitchen.", "John moved to the garden.", "Mary travelled to the office.")
    assert last_mentioned("qa1", facts[:2]) == "garden" and last_mentioned("qa1", facts) == "office"
    assert last_mentioned("qa5", ("Fred gave the milk to Bill.",)) == "Bill"
    assert last_mentioned("qa6", facts) is None  # yes/no: the facts never name the answer


def test_babilong_command_on_lm2_runs_any_length(hf_lm2, tokenizer, background, tmp_path, capsys):
    results, printed = run_command(hf_lm2, tmp_path / "out", "0k,200", capsys)
    assert results["kind"] == "LM2" and not any(c["truncated"] for c in results["cells"])
    assert [(c["task"], c["length"]) for c in results["cells"]] == [
        ("qa1", "0k"),
        ("qa1", "200"),
        ("qa5", "0k"),
        ("qa5", "200"),
    ]
    check_answers(results, hf_lm2, tokenizer, background)
    assert all(r["facts_in_view"] for c in results["cells"] for r in c["records"])  # LM2 reads every token
    assert "| qa1 |" in printed.out and f"wrote {tmp_path / 'out'}/results.json" in printed.out
    assert "Forced choice among the task's answer words" in printed.out and "supporting fact" in printed.out
    assert "Recency shortcut" in printed.out
    assert "babilong" in printed.err and "100%" in printed.err  # the progress bar
    assert (tmp_path / "out" / "results.md").read_text().startswith("BABILong accuracy (%)")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "out" / "heatmap.png").ndim == 3
    assert matplotlib.image.imread(tmp_path / "out" / "distance.png").ndim == 3


def test_babilong_command_on_vanilla_reads_the_tail_and_says_so(hf_vanilla, tokenizer, background, tmp_path, capsys):
    results, printed = run_command(hf_vanilla, tmp_path / "out", "0k,200", capsys)
    long = [c for c in results["cells"] if c["length"] == "200"]
    assert all(c["truncated"] == 3 and c["kept_tokens"] == VANILLA_TOKENS - 4 for c in long)
    check_answers(results, hf_vanilla, tokenizer, background, kept=VANILLA_TOKENS - 4)
    cut_off = [r for c in long for r in c["records"] if not r["facts_in_view"]]
    assert cut_off and all(row["facts_cut_off"] <= row["samples"] for row in results["distance"])
    assert "cut to their last 60 tokens" in printed.out and "| qa1 |" in printed.out


def test_bad_babilong_input_is_one_line(hf_lm2, tmp_path, capsys):
    code = main(
        [
            "eval",
            "babilong",
            "--model",
            str(hf_lm2),
            "--tasks",
            "qa1",
            "--lengths",
            "0k",
            "--babi",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "qa1_*.txt" in err[0] and "--babi" in err[0]
    assert main(["eval", "babilong", "--model", str(tmp_path), "--lengths", "0k"]) == 2
    assert "config.json" in capsys.readouterr().err
    for device, problem in (("cuda:7", "usable GPU(s)"), ("gpu", "is not a device"), ("meta", "cpu or cuda")):
        assert main(["eval", "babilong", "--model", str(hf_lm2), "--lengths", "0k", "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0] and f"--device {device}" in err[0].replace("'", ""), err


def test_distance_of_a_hand_built_sample():
    """Words as tokens: the distance counts the words between the last supporting fact and the question."""
    facts = ("Mary went to the kitchen.", "John moved to the office.")
    context = f"{facts[0]} One two three four five six seven. {facts[1]} Eight nine ten eleven."
    spans = tuple((context.index(fact), context.index(fact) + len(fact)) for fact in facts)
    text = prompt(BabiSample(facts, "Where is Mary?", "kitchen"), context)
    first = fact_place(str.split, text, len(context), spans, (0,))
    assert (first.distance, first.first_token) == (7 + 5 + 4, 0)
    both = fact_place(str.split, text, len(context), spans, (0, 1))
    assert (both.distance, both.first_token) == (4, 0)
    last = fact_place(str.split, text, len(context), spans, (1,))
    assert (last.distance, last.first_token) == (4, 5 + 7)
    assert fact_place(str.split, text, len(context), spans, ()) is None


def test_distance_buckets_are_powers_of_two():
    assert [bucket(d) for d in (0, 127, 128, 255, 256, 1500, 16384)] == [
        (0, 128),
        (0, 128),
        (128, 256),
        (128, 256),
        (256, 512),
        (1024, 2048),
        (16384, 32768),
    ]
    assert [bucket_label(*bucket(d)) for d in (5, 200, 1500, 20000)] == ["<128", "128-256", "1k-2k", "16k-32k"]


def test_fact_place_points_at_the_fact_in_the_tokenized_prompt(tokenizer, background):
    """With the real tokenizer: the earliest supporting fact's tokens start at first_token, and the tokens between
    the last one and the question decode to the background between them."""
    sample = task_samples(HELDOUT_FOLDER, "qa2")[7]
    built = haystack(sample, 500, background, sample_rng(0, "qa2", 500, 7))
    text = prompt(sample, built.context)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    place = fact_place(
        lambda t: tokenizer(t, add_special_tokens=False).input_ids,
        text,
        len(built.context),
        built.fact_spans,
        sample.supporting,
    )
    first_fact = sample.facts[sample.supporting[0]]
    assert tokenizer.decode(ids[place.first_token :]).startswith(first_fact)
    question = len(tokenizer(built.context, add_special_tokens=False).input_ids)
    between = built.context[built.fact_spans[sample.supporting[-1]][1] : len(built.context)].strip()
    assert tokenizer.decode(ids[question - place.distance : question]).strip() == between


def full_forward_scores(model, ids, candidates):
    """The independent computation: each candidate appended to the prompt, one forward without cache, the sum of
    its tokens' log-probabilities."""
    scores = {}
    with torch.no_grad():
        for word, tokens in candidates.items():
            logits = model(torch.tensor([ids + tokens]), use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            scores[word] = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(tokens))
    return scores


@pytest.mark.parametrize("folder", ["hf_lm2", "hf_vanilla"])
def test_forced_choice_equals_full_forwards_without_cache(folder, request):
    """Candidates of 1 to 4 tokens after a prompt of 47 tokens: LM2's segments hold 16, so longer candidates
    complete a segment (a memory write) on their copy of the cache. The scores equal full forwards without cache,
    the choice is their argmax, and the prompt's own cache is left as it was (greedy afterwards is the plain loop)."""
    path = request.getfixturevalue(folder)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.randint(4, 500, (47,), generator=torch.Generator().manual_seed(3)).tolist()
    candidates = {"one": [17], "two": [40, 41], "three": [90, 7, 300], "four": [5, 6, 7, 8], "again": [40, 99]}
    state = read_prompt(model, ids)
    scores = forced_choice(model, state, candidates)
    expected = full_forward_scores(model, ids, candidates)
    assert scores == pytest.approx(expected, abs=1e-4)
    ranked = sorted(expected.values())
    assert ranked[-1] - ranked[-2] > 1e-3 and chosen(scores) == max(expected, key=expected.get)
    assert greedy(model, state, 5, set()) == plain_greedy(model, ids, 5)


@pytest.mark.parametrize("task", ["qa1", "qa5"])
def test_candidates_are_the_words_tokens_after_the_whole_prompt(tokenizer, background, task):
    """The evaluation tokenizes the candidates after the question alone: they are the tokens that follow whole
    prompts of any length."""
    encode = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    sample = task_samples(HELDOUT_FOLDER, task)[0]
    question = prompt(sample, "")
    candidates = candidate_ids(encode, question, encode(question), TASK_LABELS[task])
    for length in (0, 300, 1000):
        text = prompt(sample, haystack(sample, length, background, sample_rng(0, task, length, 0)).context)
        ids = encode(text)
        for word, tokens in candidates.items():
            assert encode(f"{text} {word}") == ids + tokens and tokenizer.decode(tokens).strip() == word
    assert any(len(tokens) > 1 for tokens in candidates.values())  # the test tokenizer splits some words
