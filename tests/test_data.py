import json
import os

import pytest
import torch

import probprune.data as data
from probprune.data import (DataError, calibration_texts, calibration_windows,
                            check_calibration_source, check_eval_source, eval_text, local_texts,
                            random_windows, tokenize_joined, wiki_summaries)
from tests.conftest import WIKITEXT_TEST
from tests.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_local_txt_jsonl_json_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "from json", "id": 1}]))
    assert local_texts(str(tmp_path / "a.txt")) == ["first line\n", "second line\n"]
    assert local_texts(str(tmp_path / "b.jsonl")) == ["from jsonl"]
    assert local_texts(str(tmp_path / "c.json")) == ["from json"]
    assert sorted(local_texts(str(tmp_path))) == sorted(
        ["first line\n", "second line\n", "from jsonl", "from json"])


def test_missing_file_empty_text_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        calibration_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="contains no text"):
        local_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field"):
        local_texts(str(tmp_path / "x.jsonl"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="has no"):
        local_texts(str(tmp_path / "sub"))
    with pytest.raises(DataError, match="unknown calibration source 'nonsense'"):
        calibration_texts("nonsense")


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "data file '{path}' is empty"),
    ("empty.jsonl", b"", "data file '{path}' is empty"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": broken\n',
     "data file '{path}' is not valid JSON (a list of records or one record per line): "
     "ArrowInvalid: JSON parse error"),
    ("cut.json", b'[{"text": "a"', "data file '{path}' is not valid JSON"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"),
     "data file '{path}' is not valid UTF-8 text: UnicodeDecodeError"),
    ("notext.json", json.dumps([{"body": "x"}]).encode(), "data file '{path}' has no 'text' field"),
    ("ints.jsonl", b'{"text": 5}\n', "data file '{path}': the 'text' field must hold strings"),
    ("lists.json", json.dumps({"text": ["a", "b"]}).encode(), "the 'text' field must hold strings"),
])
def test_malformed_file_is_a_data_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        local_texts(str(path))
    assert message.format(path=path) in str(e.value) and "\n" not in str(e.value)


def test_malformed_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine\n")
    (tmp_path / "b.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"data file '.*b\.jsonl' is not valid JSON"):
        local_texts(str(tmp_path))


def test_check_sources_read_local_files_and_leave_hub_sources(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("some words\n")
    bad.write_text("")
    monkeypatch.delenv("PROBPRUNE_WIKITEXT2", raising=False)
    check_calibration_source(str(good))
    check_eval_source(str(good))
    check_eval_source("wikitext2", str(good))
    with pytest.raises(DataError, match="is empty"):
        check_calibration_source(str(bad))
    with pytest.raises(DataError, match="is empty"):
        check_eval_source(str(bad))
    with pytest.raises(DataError, match="is empty"):
        check_eval_source("wikitext2", str(bad))
    with pytest.raises(DataError, match="unknown calibration source 'nonsense'"):
        check_calibration_source("nonsense")

    def offline(*a, **k):  # hub sources are fetched only when the run reads them
        raise AssertionError("fetched a hub dataset")
    monkeypatch.setattr(data, "_hub_texts", offline)
    check_calibration_source("c4")
    check_calibration_source("wikitext2")
    check_eval_source("wikitext2")
    monkeypatch.setenv("PROBPRUNE_WIKITEXT2", str(bad))
    with pytest.raises(DataError, match="is empty"):
        check_eval_source("wikitext2")


def test_check_sources_need_the_summaries_package(monkeypatch):
    check_calibration_source("wiki-summaries")
    check_eval_source("wiki-summaries")
    monkeypatch.setattr(data, "SUMMARIES", ("no_such_package_xyz", "data.json", "no-such-package"))
    with pytest.raises(DataError, match="needs the package no-such-package"):
        check_calibration_source("wiki-summaries")
    with pytest.raises(DataError, match="needs the package no-such-package"):
        check_eval_source("wiki-summaries")


def test_too_few_tokens_for_windows(tmp_path, tok):
    (tmp_path / "short.txt").write_text("only a few words here\n")
    with pytest.raises(DataError, match=r"too few for 4 windows of 64 tokens"):
        calibration_windows(tok, str(tmp_path / "short.txt"), n=4, seqlen=64)
    with pytest.raises(DataError, match="fewer than one window"):
        random_windows(torch.arange(5), 1, 10, seed=0)


def test_random_windows_are_slices_and_follow_the_seed():
    ids = torch.arange(1000)
    a, b, c = (random_windows(ids, 8, 32, seed=s) for s in (1, 1, 2))
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(8, 32))  # contiguous token runs


def test_wiki_summaries_heldout_is_disjoint_from_calibration():
    calib, held = wiki_summaries("calibration"), wiki_summaries("heldout")
    assert len(held) > 500 and len(calib) > 8 * len(held)
    assert not set(calib) & set(held)


def test_wikitext2_local_file_rebuilds_hub_join(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(
        " = Title = \n Body one .\n Body two .\n = = Part = = \n = = = Sub = = = \n"
        " Body three .\n = Next = \n Body four .\n")
    text = eval_text("wikitext2", str(tmp_path / "wiki.test.raw"))
    # The hub's rows: a blank row before and after each heading, one more between a paragraph
    # and the next article's title, one at the end; then joined by "\n\n".
    rows = ["", " = Title = \n", "", " Body one .\n", " Body two .\n", "", " = = Part = = \n",
            "", "", " = = = Sub = = = \n", "", " Body three .\n", "", "", " = Next = \n", "",
            " Body four .\n", ""]
    assert text.text == "\n\n".join(rows)
    assert "local file" in text.name


def test_wikitext2_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "w.raw").write_text(" some words\n")
    monkeypatch.setenv("PROBPRUNE_WIKITEXT2", str(tmp_path / "w.raw"))
    assert eval_text("wikitext2").text == " some words\n\n\n"  # and the hub's last blank row


def test_wikitext2_unreachable_falls_back_to_heldout_summaries(monkeypatch):
    monkeypatch.delenv("PROBPRUNE_WIKITEXT2", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import probprune.data as data

    def unreachable(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "_hub_texts", unreachable)
    text = eval_text("wikitext2")
    assert text.name.startswith("wiki-summaries held-out")
    assert text.text.startswith(wiki_summaries("heldout")[0])
    with pytest.raises(DataError, match="not reachable"):
        eval_text("wikitext2", allow_fallback=False)


@pytest.mark.skipif(not os.path.exists(WIKITEXT_TEST), reason="shared WikiText-2 copy not present")
def test_shared_wikitext2_tokenizes(tok):
    from probprune.data import _wikitext2_local_rows
    assert len(_wikitext2_local_rows(WIKITEXT_TEST)) == 4358  # wikitext-2-raw-v1 test on the hub
    text = eval_text("wikitext2", WIKITEXT_TEST)
    ids = tokenize_joined(tok, [text.text[:5000]])
    assert ids.dtype == torch.long and ids.numel() > 100
