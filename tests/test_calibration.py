"""Calibration texts and blocks (ALGORITHMS.md §12.4): sources, shuffle order, selection, errors."""
from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import calibration.sources as sources
from calibration.blocks import build_blocks, shuffled_order
from calibration.sources import builtin_texts, load_texts
from checkpoints.errors import UserError

DOCS = ["first doc", "second\ndoc with two lines", "third"]


class LetterTokenizer:
    """Toy tokenizer: BOS (9) + one id per letter (a=1 ... z=26); the empty text encodes to []."""

    def encode(self, text: str) -> list[int]:
        return [9] + [ord(c) - 96 for c in text] if text else []


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a\nb\n\n\n  c  \n\n \t\n\nd\n", encoding="utf-8")
    assert list(load_texts(str(path))) == ["a\nb", "  c  ", "d\n"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_structured_files_read_the_text_field(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    rows = [{"text": t, "meta": i} for i, t in enumerate(DOCS)]
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": DOCS, "meta": [0, 1, 2]}), path)
    assert list(load_texts(str(path))) == DOCS


def test_json_accepts_string_list_and_custom_field(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(DOCS), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in DOCS), encoding="utf-8")
    assert list(load_texts(str(tmp_path / "a.json"))) == DOCS
    assert list(load_texts(str(tmp_path / "b.jsonl"), text_field="body")) == DOCS


def test_folder_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("two\n\nthree", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}), encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text(json.dumps(["four"]), encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    assert list(load_texts(str(tmp_path))) == ["one", "two", "three", "four"]


def test_bad_local_sources_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="--calib_data .*no such file"):
        load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}), encoding="utf-8")
    with pytest.raises(UserError, match="'text'"):
        load_texts(str(tmp_path / "x.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt"):
        load_texts(str(tmp_path / "empty"))


def test_hub_dataset_is_read_lazily_by_row(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = load_texts("someone/corpus", split="train")
    assert calls == [("someone/corpus", "train")]
    assert len(texts) == 3 and texts[1] == DOCS[1] and texts[0:2] == DOCS[:2]
    with pytest.raises(UserError, match="no column 'body'"):
        load_texts("someone/corpus", text_field="body")


def test_unreachable_hub_names_the_offline_options(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach 'mit-han-lab/pile-val-backup' on the Hub\nretrying")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_texts(sources.DEFAULT_CALIB_DATA)
    message = str(err.value)
    assert "--calib_data builtin" in message and "local" in message and "\n" not in message


def test_missing_zstandard_is_reported_before_downloading(monkeypatch):
    monkeypatch.setattr(sources, "find_spec", lambda name: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(UserError, match="zstandard.*--calib_data builtin"):
        load_texts(sources.DEFAULT_CALIB_DATA)


def test_builtin_corpus_is_large_offline_and_packed_by_paragraph():
    docs = builtin_texts()
    assert load_texts("builtin") == docs
    assert len(docs) >= 500 and sum(map(len, docs)) > 400_000
    multi = [d for d in docs if "\n\n" in d]
    assert multi and all(len(d) <= sources.BUILTIN_DOC_CHARS for d in multi)
    # mostly short enough for 512-token blocks: at ~3.5 chars per Llama token, 1,000 chars ~ 290 tokens
    assert sum(len(d) <= sources.BUILTIN_DOC_CHARS for d in docs) > 0.9 * len(docs)


def test_shuffle_order_equals_hf_datasets_shuffle():
    n = 50
    shuffled = datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=42)
    assert shuffled_order(n, 42).tolist() == list(shuffled["i"])
    assert shuffled_order(6, 42).tolist() == [3, 2, 5, 4, 1, 0]


def test_blocks_follow_the_reference_recipe_by_hand():
    # order for seed 42 and 6 texts: 3, 2, 5, 4, 1, 0 (checked against datasets above)
    texts = ["ab", "  abc  ", "abcdefgh", "a", "  \n ", "bc"]
    blocks = build_blocks(texts, LetterTokenizer(), n_samples=3, block_size=4, seed=42)
    # 3 "a" -> [9,1]; 2 is 9 tokens > 4: skipped; 5 -> [9,2,3]; 4 strips to "" -> []: skipped;
    # 1 strips to "abc" -> [9,1,2,3] (exactly 4: kept); 3 accepted, stop. 9 tokens -> 2 blocks.
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[9, 1, 9, 2], [3, 9, 1, 2]]
    everything = build_blocks(texts, LetterTokenizer(), n_samples=10, block_size=4, seed=42)
    assert everything.tolist() == [[9, 1, 9, 2], [3, 9, 1, 2], [3, 9, 1, 2]]  # + text 0 [9,1,2]


def test_local_file_and_hub_dataset_give_the_same_blocks(tmp_path, monkeypatch):
    texts = [f"doc number {i} " + "xy" * (i % 7) for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: datasets.Dataset.from_dict({"text": texts}))
    tok = LetterTokenizer()
    local = build_blocks(load_texts(str(tmp_path / "c.jsonl")), tok, n_samples=8, block_size=16, seed=7)
    hub = build_blocks(load_texts("org/name"), tok, n_samples=8, block_size=16, seed=7)
    shuffled = datasets.Dataset.from_dict({"text": texts}).shuffle(seed=7)["text"]
    accepted = [tok.encode(t.strip()) for t in shuffled if len(tok.encode(t.strip())) <= 16][:8]
    flat = [i for ids in accepted for i in ids]
    assert torch.equal(local, hub)
    assert local.flatten().tolist() == flat[: len(flat) // 16 * 16]


def test_too_little_text_is_a_user_error():
    with pytest.raises(UserError, match="--block_size"):
        build_blocks(["ab", "cd"], LetterTokenizer(), block_size=100)
    with pytest.raises(UserError, match="none of its 2 documents fits"):
        build_blocks(["ab", "cd"], LetterTokenizer(), block_size=1)
    with pytest.raises(UserError, match="--calib_samples"):
        build_blocks(["ab"], LetterTokenizer(), n_samples=0)
