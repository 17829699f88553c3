"""The GSM8K-style loader on small synthetic JSONL and Parquet files, and the GRPO app's GSM8K task."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from kubeforge.data import Example, held_out_split, load_gsm8k, load_splits
from kubeforge.rewards.math import correctness
from kubeforge.spec import RLJobSpec
from kubeforge.validation import SpecError, parse_spec

from apps.grpo.gsm8k import GSM8KTask, format_prompt


def rows(count: int, start: int = 0) -> list[dict[str, str]]:
    """GSM8K-shaped rows: a question, a worked answer with calculator notes, then '#### final'."""
    return [
        {
            "question": f"Tom has {i} apples and buys {i} more. How many apples does he have?",
            "answer": f"He has {i} + {i} = <<{i}+{i}={2 * i}>>{2 * i} apples.\n#### {2 * i:,}",
        }
        for i in range(start, start + count)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def test_jsonl_rows_become_examples_with_the_final_answer(tmp_path):
    records = [{**r, "id": i} for i, r in enumerate(rows(3, start=600))]  # other columns are ignored
    examples = load_gsm8k(write_jsonl(tmp_path / "gsm8k.jsonl", records))
    assert examples[0] == Example(prompt=records[0]["question"], answer="1,200")
    assert [e.answer for e in examples] == ["1,200", "1,202", "1,204"]


def test_parquet_shards_of_a_split_load_in_order(tmp_path):
    write_parquet(tmp_path / "train-00000-of-00002.parquet", rows(4))
    write_parquet(tmp_path / "train-00001-of-00002.parquet", rows(4, start=4))
    write_parquet(tmp_path / "test-00000-of-00001.parquet", rows(2, start=100))
    (tmp_path / "README.md").write_text("not data")
    assert [e.answer for e in load_gsm8k(tmp_path, "train")] == [str(2 * i) for i in range(8)]
    assert [e.answer for e in load_gsm8k(tmp_path, "test")] == ["200", "202"]
    assert [e.answer for e in load_gsm8k(tmp_path, "train[-2:]")] == ["12", "14"]  # a slice across shards


def test_a_named_eval_split_is_the_held_out_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(5))
    write_jsonl(tmp_path / "test.jsonl", rows(2, start=50))
    splits = load_splits(tmp_path, split="train", eval_split="test")
    assert len(splits.train) == 5
    assert [e.answer for e in splits.held_out] == ["100", "102"]


def test_the_held_out_fraction_is_deterministic_disjoint_and_order_free(tmp_path):
    examples = load_gsm8k(write_jsonl(tmp_path / "all.jsonl", rows(400)))
    splits = held_out_split(examples, 0.25, seed=3)
    assert 60 <= len(splits.held_out) <= 140  # about a quarter: membership is a hash of each question
    assert sorted(splits.train + splits.held_out, key=lambda e: e.prompt) == sorted(examples, key=lambda e: e.prompt)
    assert not {e.prompt for e in splits.train} & {e.prompt for e in splits.held_out}
    assert held_out_split(list(reversed(examples)), 0.25, seed=3).held_out == list(reversed(splits.held_out))
    assert load_splits(tmp_path / "all.jsonl", held_out_fraction=0.25, seed=3) == splits
    assert held_out_split(examples, 0.25, seed=4).held_out != splits.held_out


def test_a_repeated_question_lands_on_one_side_only():
    examples = [Example(f"q{i % 50}", str(i)) for i in range(200)]  # each question four times
    splits = held_out_split(examples, 0.3, seed=0)
    assert not {e.prompt for e in splits.train} & {e.prompt for e in splits.held_out}


@pytest.mark.parametrize(
    ("fraction", "message"), [(0.0, "between 0 and 1"), (1.0, "between 0 and 1"), (1e-9, "leaves the held-out")]
)
def test_a_held_out_fraction_that_cannot_split_is_refused(fraction, message):
    with pytest.raises(ValueError, match=message):
        held_out_split([Example("a", "1"), Example("b", "2")], fraction)


def test_missing_file_names_the_field_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spec.dataset.path: .*nope.jsonl does not exist; expected a JSONL"):
        load_gsm8k(tmp_path / "nope.jsonl")


def test_a_directory_without_the_split_lists_what_it_holds(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(2))
    with pytest.raises(FileNotFoundError, match=r"split 'validation' .*holds train.jsonl.*expected validation.jsonl"):
        load_gsm8k(tmp_path, "validation")


def test_missing_column_is_named(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(ValueError, match=r"has no column 'answer' \(it has question, solution\)"):
        load_gsm8k(path)


@pytest.mark.parametrize("answer", ["He has 4 apples.", "He has 4 apples. ####  ", None])
def test_an_answer_without_a_final_answer_is_refused_with_its_row(tmp_path, answer):
    records = rows(2)
    records[1]["answer"] = answer
    with pytest.raises(ValueError, match=r"row 1: 'answer' is .*; expected GSM8K format, the solution then '####"):
        load_gsm8k(write_jsonl(tmp_path / "train.jsonl", records))


def test_an_empty_question_is_refused(tmp_path):
    records = rows(2)
    records[0]["question"] = " "
    with pytest.raises(ValueError, match=r"row 0: 'question' is ' '; expected text"):
        load_gsm8k(write_jsonl(tmp_path / "train.jsonl", records))


def test_unsupported_broken_and_mixed_files_are_refused(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"train.csv is not JSONL or Parquet"):
        load_gsm8k(csv)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"split 'train' of .*broken.jsonl is not readable"):
        load_gsm8k(broken)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "train-0.jsonl", rows(1))
    write_parquet(mixed / "train-1.parquet", rows(1))
    with pytest.raises(ValueError, match="mixes JSONL and Parquet"):
        load_gsm8k(mixed)


def test_a_single_file_holds_only_train_and_its_slices(tmp_path, caplog):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows(10))
    splits = load_splits(path, split="train[:80%]", eval_split="train[80%:]")
    assert [e.answer for e in splits.held_out] == ["16", "18"]
    assert len(splits.train) == 8 and not caplog.records
    with pytest.raises(
        ValueError, match=r"split 'test': the file .*gsm8k.jsonl holds only the split 'train'; use slices"
    ):
        load_splits(path, eval_split="test")
    load_splits(path, split="train", eval_split="train[80%:]")  # overlapping slices: allowed, with a warning
    assert "2 of 2 held-out questions (train[80%:]) are also in the train split (train)" in caplog.text


# -- the GRPO app's task ---------------------------------------------------------------------------


@pytest.fixture
def gsm8k_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", rows(30))
    write_parquet(tmp_path / "test.parquet", rows(6, start=1000))
    return tmp_path


def test_task_prompts_ask_for_a_boxed_answer_and_the_math_reward_accepts_it(gsm8k_dir):
    task = GSM8KTask(gsm8k_dir, eval_split="test")
    example = task.held_out[0]
    assert example.prompt == format_prompt(rows(1, start=1000)[0]["question"])
    assert example.prompt.startswith("Tom has 1000 apples") and "\\boxed{answer}" in example.prompt
    assert example.answer == "2,000"
    assert correctness(example.prompt, "1000 + 1000 = 2000, so \\boxed{2000}.", example.answer) == 1.0
    assert correctness(example.prompt, "\\boxed{1000}", example.answer) == 0.0


def test_task_streams_visit_every_problem_once_per_epoch_and_repeat_across_runs(gsm8k_dir):
    task = GSM8KTask(gsm8k_dir, eval_split="test", seed=1)
    epoch = [task.at(p) for p in range(30)]
    assert sorted(e.answer for e in epoch) == sorted(e.answer for e in task.train)
    assert [task.at(p) for p in range(30, 60)] != epoch  # a new order each epoch
    again = GSM8KTask(gsm8k_dir, eval_split="test", seed=1)
    assert [again.at(p) for p in (59, 3, 31)] == [task.at(59), task.at(3), task.at(31)]  # any order, same answer
    assert [task.at(p, stream="warmup") for p in range(30)] != epoch


def test_task_from_spec_holds_out_a_fraction_and_caps_the_eval_set(gsm8k_dir):
    spec = RLJobSpec.model_validate(
        {
            "model": {"path": "/models/m"},
            "dataset": {"path": str(gsm8k_dir / "train.jsonl")},
            "algorithm": {"heldOutFraction": 0.3, "evalSize": 3},
        }
    )
    task = GSM8KTask.from_spec(spec, seed=2)
    assert task.name == "gsm8k" and task.max_new_tokens == 512
    assert len(task.held_out) == 3
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.held_out}
    assert len(task.train) + len(GSM8KTask(gsm8k_dir / "train.jsonl", held_out_fraction=0.3, seed=2).held_out) == 30


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"heldOutFraction": 2}, r"spec.algorithm.heldOutFraction: got 2; expected a value less than 1"),
        ({"heldOutFraction": "a"}, r"spec.algorithm.heldOutFraction: got 'a'"),
        ({"evalSize": 0}, r"spec.algorithm.evalSize: got 0; expected a value greater than or equal to 1"),
    ],
)
def test_the_spec_refuses_bad_task_settings(gsm8k_dir, algorithm, message):
    # The schema types them (kubeforge.algorithm), so a bad one fails `kubeforge validate`, not the app.
    with pytest.raises(SpecError, match=message):
        parse_spec({"model": {"path": "/models/m"}, "dataset": {"path": str(gsm8k_dir)}, "algorithm": algorithm})


def test_task_from_spec_needs_a_dataset_path():
    with pytest.raises(ValueError, match="spec.dataset.path: not set"):
        GSM8KTask.from_spec(RLJobSpec.model_validate({"model": {"path": "/models/m"}}))
