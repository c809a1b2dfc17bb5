import importlib.util
import json

import pytest
import torch

from mergeplan.calibrate.data import load_calib_set
from mergeplan.calibrate.settings import parse_calibration
from mergeplan.errors import MergeplanError
from test_calib_family import build_tokenizer, CORPUS, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return build_tokenizer(d, [l for v in CORPUS.values() for l in v])


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_jsonl_text_and_prompt_response_are_tokenised_in_order(tmp_path, tok):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"text": "two plus two is four"},
        {"prompt": "def add ( a , b ) :", "response": "return a + b"},
        {"text": "while true : break", "id": 3},
    ])
    cs = load_calib_set("d.jsonl", tmp_path, tok, samples=10, seq_len=64)
    assert cs.kind == "jsonl" and len(cs.samples) == 3
    assert cs.samples[0] == tok("two plus two is four")["input_ids"]
    # prompt and response joined by a newline
    assert cs.samples[1] == tok("def add ( a , b ) :\nreturn a + b")["input_ids"]
    assert "only 3 of the 10 requested samples" in " ".join(cs.notes)


def test_samples_takes_the_first_records_and_truncates_to_seq_len(tmp_path, tok):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in CORPUS["legal"]])
    cs = load_calib_set(str(p), tmp_path, tok, samples=2, seq_len=5)
    assert len(cs.samples) == 2 and cs.records_read == 2
    assert all(len(s) == 5 for s in cs.samples)
    assert cs.samples[0] == tok(CORPUS["legal"][0])["input_ids"][:5]
    assert cs.padded == 0


def test_short_samples_are_padded_masked_and_noted(tmp_path, tok):
    _jsonl(tmp_path / "d.jsonl", [{"text": "while true : break"}, {"text": CORPUS["math"][1]}, {"text": "x"}])
    cs = load_calib_set("d.jsonl", tmp_path, tok, samples=3, seq_len=8)
    # "x" tokenises to one token: no next-token target, skipped with a note
    assert len(cs.samples) == 2
    notes = " ".join(cs.notes)
    assert "shorter than two tokens" in notes and "shorter than seq_len=8" in notes
    (ids, mask), = cs.batches(4)
    assert ids.shape == (2, 8)
    n0 = len(cs.samples[0])
    assert mask[0].tolist() == [1] * n0 + [0] * (8 - n0)  # right padding, masked
    assert mask[1].tolist() == [1] * 8
    assert ids[0, :n0].tolist() == cs.samples[0]
    assert (ids[0, n0:] == tok.pad_token_id).all()


def test_batches_pad_only_to_the_longest_in_each_batch(tmp_path, tok):
    _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in ["while true : break", "if x > 0 : return x", "x = 1"]])
    cs = load_calib_set("d.jsonl", tmp_path, tok, samples=3, seq_len=64)
    batches = cs.batches(2)
    assert [b[0].shape[0] for b in batches] == [2, 1]
    assert batches[0][0].shape[1] == max(len(s) for s in cs.samples[:2])
    assert int(sum(m.sum() for _, m in batches)) == cs.tokens


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path, tok):
    (tmp_path / "c.txt").write_text("two plus two\nis four\n\n\nwhile true : break\n\n")
    cs = load_calib_set("c.txt", tmp_path, tok, samples=10, seq_len=64)
    assert cs.kind == "text"
    assert cs.samples == [tok("two plus two\nis four")["input_ids"], tok("while true : break")["input_ids"]]


def test_digests_follow_the_text_used(tmp_path, tok):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "two plus two is four"}, {"text": "while true : break"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "two plus two is four"}, {"text": "while true : break"}])
    c = _jsonl(tmp_path / "c.jsonl", [{"text": "two plus two is five"}, {"text": "while true : break"}])
    ra, rb, rc = (load_calib_set(p.name, tmp_path, tok, 4, 16).record() for p in (a, b, c))
    assert ra["text_sha256"] == rb["text_sha256"] and ra["tokens_sha256"] == rb["tokens_sha256"]
    assert ra["text_sha256"] != rc["text_sha256"]
    assert ra["samples"] == 2 and ra["tokens"] == sum(len(tok(t)["input_ids"]) for t in ["two plus two is four", "while true : break"])


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "not found"),
        (lambda d: (d / "x.jsonl").write_text(""), "is empty"),
        (lambda d: (d / "x.jsonl").write_text("\n\n"), "is empty"),
        (lambda d: (d / "x.jsonl").write_text('{"body": "no text here"}\n'), r"x.jsonl:1: no `text` field.*fields: body"),
        (lambda d: (d / "x.jsonl").write_text('{"text": "ok fine"}\n{oops\n'), r"x.jsonl:2: not valid JSON"),
    ],
)
def test_bad_jsonl_is_a_one_line_error(tmp_path, tok, setup, match):
    setup(tmp_path)
    with pytest.raises(MergeplanError, match=match):
        load_calib_set("x.jsonl", tmp_path, tok, 4, 16)


def test_unknown_format_and_plain_directory_are_refused(tmp_path, tok):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MergeplanError, match="unknown format .csv"):
        load_calib_set("x.csv", tmp_path, tok, 4, 16)
    (tmp_path / "dir").mkdir()
    with pytest.raises(MergeplanError, match="not a `datasets` save_to_disk directory"):
        load_calib_set("dir", tmp_path, tok, 4, 16)


def test_parquet(tmp_path, tok):
    if importlib.util.find_spec("pyarrow") is None:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(MergeplanError, match="needs the `pyarrow` package"):
            load_calib_set("x.parquet", tmp_path, tok, 4, 16)
        pytest.skip("pyarrow not installed: only the error path is testable")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["two plus two is four", "while true : break"]}), tmp_path / "x.parquet")
    cs = load_calib_set("x.parquet", tmp_path, tok, 4, 16)
    assert cs.samples[1] == tok("while true : break")["input_ids"]


def test_hf_and_datasets_dirs_need_datasets(tmp_path, tok):
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(MergeplanError, match="needs the `datasets` package"):
            load_calib_set("hf:some/name:train", tmp_path, tok, 4, 16)
        d = tmp_path / "saved"
        d.mkdir()
        (d / "dataset_info.json").write_text("{}")
        with pytest.raises(MergeplanError, match="needs the `datasets` package"):
            load_calib_set("saved", tmp_path, tok, 4, 16)
        pytest.skip("datasets not installed: only the error paths are testable")
    import datasets

    datasets.Dataset.from_dict({"text": ["two plus two is four", "x = 1 ; y = 2"]}).save_to_disk(str(tmp_path / "saved"))
    cs = load_calib_set("saved", tmp_path, tok, 4, 16)
    assert cs.kind == "datasets" and cs.samples[0] == tok("two plus two is four")["input_ids"]


# -- calibration: settings ---------------------------------------------------------------
def test_settings_defaults_and_per_model_data():
    s = parse_calibration({"data": {"math": "m.jsonl", "code": "c.jsonl"}, "samples": 8})
    assert (s.samples, s.seq_len, s.batch_size, s.device, s.dtype) == (8, 512, 4, "auto", "auto")
    assert s.source_for("math") == "m.jsonl" and s.source_for("legal") is None
    assert s.as_record()["data"] == {"code": "c.jsonl", "math": "m.jsonl"}


@pytest.mark.parametrize(
    "raw, match",
    [
        (None, "add a `calibration:` section"),
        ({"samples": 4}, "calibration.data is missing"),
        ({"data": "x", "sampels": 4}, r"unknown key 'sampels' in calibration \(did you mean 'samples'\?\); allowed: data, samples"),
        ({"data": "x", "samples": 0}, r"calibration.samples must be an integer >= 1"),
        ({"data": "x", "seq_len": 1.5}, r"calibration.seq_len must be an integer >= 2"),
        ({"data": "x", "batch_size": True}, r"calibration.batch_size must be an integer"),
        ({"data": "x", "device": "gpu"}, r"calibration.device must be auto, cpu, cuda"),
        ({"data": "x", "dtype": "fp8"}, r"calibration.dtype must be one of"),
        ({"data": {"math": 3}}, r"calibration.data.math must be a path"),
    ],
)
def test_bad_settings_name_the_key(raw, match):
    with pytest.raises(MergeplanError, match=match):
        parse_calibration(raw)


def test_device_resolution_never_assumes_cuda():
    from mergeplan.calibrate.models import resolve_device

    dev = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert isinstance(dev, torch.device) and dev.type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergeplanError, match="CUDA is not available"):
            resolve_device("cuda:0")
