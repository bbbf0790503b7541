"""apet-eval: scoring, data formats, selection rules, and an end-to-end run with resume on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image

from apet.contracts.compression import CompressionConfig
from apet.errors import InputError, UsageError
from apet.eval.runner import PREDICTIONS, EvalConfig, read_predictions, run_eval
from apet.eval.scoring import (
    choice_letter,
    normalize_answer,
    prompt_for,
    score_item,
    soft_accuracy,
    yes_no,
    yes_no_scores,
)
from apet.media.dataset import EvalItem, load
from apet.selection import RULES, get_rule


def test_normalization_follows_the_vqa_rules() -> None:
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert normalize_answer("  1,000 ") == "1000"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("a cat.") == "cat"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("red/blue") == "red blue"


def test_soft_accuracy_by_hand() -> None:
    answers = ["red", "Red.", "the red", "blue", "red", "maroon", "blue", "red", "crimson", "dark red"]
    assert soft_accuracy("red", answers) == 1.0  # 5 matches -> min(5/3, 1)
    assert soft_accuracy("Blue", answers) == pytest.approx(2 / 3)
    assert soft_accuracy("maroon", answers) == pytest.approx(1 / 3)
    assert soft_accuracy("green", answers) == 0.0
    assert soft_accuracy("Two", ["2"]) == 1.0  # a single reference answer is exact match after normalising


def test_yes_no_and_pope_metrics_by_hand() -> None:
    assert yes_no("Yes, there is.") == "yes" and yes_no("no") == "no" and yes_no("maybe") is None
    gold = ["yes", "yes", "yes", "no", "no", "no"]
    predicted = ["yes", "yes", "no", "yes", "no", None]
    s = yes_no_scores(gold, predicted)  # tp 2, fp 1, fn 1, correct 3 of 6 (the unreadable answer is wrong)
    assert s.accuracy == pytest.approx(3 / 6) and s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(2 / 3) and s.f1 == pytest.approx(2 / 3) and s.yes_ratio == pytest.approx(0.5)
    assert s.unreadable == 1


def test_yes_no_accuracy_agrees_with_the_per_type_score(tmp_path: Path) -> None:
    """The same answers scored twice in one report (per type, and POPE's metrics) must agree."""
    from apet.eval.report import build_report

    items = [EvalItem(f"q{i}", "0.png", "Is it?", (gold,), "yesno", benchmark="b")
             for i, gold in enumerate(["yes", "no", "no", "yes"])]
    predictions = ["Yes.", "maybe", "No", "I cannot tell"]  # two unreadable: one with gold "no", one "yes"
    records = [{"method": "apet", "ratio": 1.0, "benchmark": "b", "id": item.id, "type": "yesno", "prediction": p,
                "score": score_item(item, p)} for item, p in zip(items, predictions)]
    cfg = EvalConfig(source="tiny", data=(), images=tmp_path, out=tmp_path)
    row = build_report(records, items, cfg)["rows"][0]
    assert row["yesno"]["accuracy"] == row["by_type"]["yesno"]["score"] == row["score"] == 0.5
    assert row["yesno"]["unreadable"] == 2


def test_eval_refuses_empty_data_zero_limit_and_missing_images(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(InputError, match="holds no questions"):
        run_eval(EvalConfig(source=str(tiny_checkpoint), data=(empty,), images=images, out=tmp_path / "o"))
    with pytest.raises(UsageError, match="--limit 0"):
        EvalConfig(source=str(tiny_checkpoint), data=(empty,), images=images, out=tmp_path / "o", limit=0)
    rows = [{"id": f"q{i}", "image": f"{i}.png", "question": "What?", "answer": "x"} for i in range(5)]
    make_image(0).save(images / "0.png")
    data = _write(tmp_path / "data.jsonl", rows)
    with pytest.raises(InputError, match=r"4 image\(s\).*--images .*: 1.png, 2.png, 3.png and 1 more") as info:
        run_eval(EvalConfig(source=str(tiny_checkpoint), data=(data,), images=images, out=tmp_path / "o"))
    assert "--image " not in str(info.value) and not (tmp_path / "o").exists()


def test_report_of_a_two_stage_artifact_says_two_stages(artifact_factory, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    make_image(0).save(images / "0.png")
    data = _write(tmp_path / "data.jsonl", [{"id": "q0", "image": "0.png", "question": "What?", "answer": "x"}])
    artifact = artifact_factory(ratio=0.11, stages=2)
    report = run_eval(EvalConfig(source=str(artifact), data=(data,), images=images, out=tmp_path / "o",
                                 ratios=(0.11,), backend="onnxruntime", max_new_tokens=1))
    assert report["stages"] == 2 and "2 compression stages" in (tmp_path / "o" / "report.md").read_text()


def test_multiple_choice_letters() -> None:
    choices = ["a cat", "a dog", "a bird"]
    assert choice_letter("B", choices) == "B" and choice_letter("(C) bird", choices) == "C"
    assert choice_letter("B. a dog", choices) == "B" and choice_letter("dog", choices) == "B"
    assert choice_letter("E", choices) is None and choice_letter("cat", choices) == "A"
    item = EvalItem("1", "x.png", "Which?", ("B",), "choice", tuple(choices))
    assert score_item(item, "B") == 1.0 and score_item(item, "A") == 0.0
    assert "A. a cat\nB. a dog" in prompt_for(item)
    by_text = EvalItem("2", "x.png", "Which?", ("a bird",), "choice", tuple(choices))
    assert score_item(by_text, "C.") == 1.0


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_converters(tmp_path: Path) -> None:
    pope = load(_write(tmp_path / "pope.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?",
                                                   "label": "yes"}]), "pope")
    assert pope[0].type == "yesno" and pope[0].answers == ("yes",) and pope[0].benchmark == "pope"
    sqa = load(_write(tmp_path / "sqa.jsonl", [{"id": "s1", "image": "b.png", "question": "Which?",
                                                "choices": ["x", "y", "z"], "answer": 2}]), "scienceqa")
    assert sqa[0].answers == ("C",) and sqa[0].choices == ("x", "y", "z")
    questions = _write(tmp_path / "q.jsonl", [{"question_id": 7, "image": "c.jpg", "text": "Color?"},
                                              {"question_id": 8, "image": "d.jpg", "text": "Any dogs?"}])
    answers = _write(tmp_path / "a.jsonl", [{"question_id": 7, "answers": ["red", "red"]},
                                            {"question_id": 8, "answer": "No"}])
    llava = load(questions, "llava", answers)
    assert [i.type for i in llava] == ["open", "yesno"] and llava[0].answers == ("red", "red")
    (tmp_path / "vq.json").write_text(json.dumps({"questions": [{"question_id": 3, "image_id": 42,
                                                                 "question": "How many?"}]}))
    (tmp_path / "va.json").write_text(json.dumps({"annotations": [{"question_id": 3, "answer_type": "number",
                                                                   "answers": [{"answer": "2"}] * 10}]}))
    vqa = load(tmp_path / "vq.json", "vqa", tmp_path / "va.json", image_pattern="COCO_{image_id:012d}.jpg")
    assert vqa[0].image == "COCO_000000000042.jpg" and len(vqa[0].answers) == 10
    with pytest.raises(UsageError, match="--annotations"):
        load(questions, "llava")


def test_data_validation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "image": "a", "question": "q", "answer": "x"}\n{not json\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load(bad)
    with pytest.raises(InputError, match="answers"):
        load(_write(tmp_path / "m.jsonl", [{"id": 1, "image": "a", "question": "q"}]))
    with pytest.raises(InputError, match="duplicate"):
        load(_write(tmp_path / "d.jsonl", [{"id": 1, "image": "a", "question": "q", "answer": "x"}] * 2))
    with pytest.raises(InputError, match="choices"):
        load(_write(tmp_path / "c.jsonl", [{"id": 1, "image": "a", "question": "q", "answer": "A",
                                            "type": "choice", "choices": ["x"]}]))


@pytest.mark.parametrize("name", sorted(RULES))
def test_selection_rules_keep_the_budget_in_order(name: str) -> None:
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))
    out = get_rule(name)(x, CompressionConfig(keep=20, basis=4, seed=3))
    assert out.tokens.shape == (2, 20, 16) and out.index.shape == (2, 20)
    assert (out.index.diff(dim=1) > 0).all() and int(out.index.max()) < 64
    full = get_rule(name)(x, CompressionConfig(keep=64, basis=4))
    assert torch.equal(full.index[0], torch.arange(64))


def test_pool_averages_segments_and_divprune_avoids_duplicates() -> None:
    x = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(1, 1, 2)
    pooled = get_rule("pool")(x, CompressionConfig(keep=2, basis=1))
    assert pooled.tokens[0, :, 0].tolist() == [1.5, 5.5] and pooled.index.tolist() == [[1, 5]]
    distinct = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    tokens = distinct[torch.tensor([0, 0, 0, 1, 1, 2, 3, 0])][None]  # 4 directions, duplicated
    picked = get_rule("divprune")(tokens, CompressionConfig(keep=4, basis=1)).index[0].tolist()
    assert len({tuple(tokens[0, i].tolist()) for i in picked}) == 4  # one token per distinct direction


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict:
    """Questions whose reference answers are the uncompressed model's own answers (so full score = 1)."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        make_image(i).save(images / f"{i}.png")
    draft = [{"id": f"o{i}", "image": f"{i}.png", "question": "What is shown?", "answer": "?"} for i in range(3)]
    draft += [{"id": f"y{i}", "image": f"{i}.png", "question": "Is there a box?", "answer": "yes", "type": "yesno"}
              for i in range(2)]
    first = _write(root / "first.jsonl", draft)
    probe = root / "probe"
    run_eval(EvalConfig(source=str(tiny_checkpoint), data=(first,), images=images, out=probe, ratios=(1.0,),
                        max_new_tokens=4))
    answers = {r["id"]: r["prediction"] for r in read_predictions(probe / PREDICTIONS)}
    for row in draft:
        if row.get("type") != "yesno":
            row["answer"] = answers[row["id"]]
    return {"data": _write(root / "mini.jsonl", draft), "images": images, "checkpoint": tiny_checkpoint}


def test_end_to_end_two_ratios_two_methods_and_resume(eval_data: dict, tmp_path: Path) -> None:
    cfg = EvalConfig(source=str(eval_data["checkpoint"]), data=(eval_data["data"],), images=eval_data["images"],
                     out=tmp_path / "out", ratios=(1.0, 0.22, 0.11), methods=("apet", "random"), max_new_tokens=4)
    report = run_eval(cfg)
    records = read_predictions(cfg.out / PREDICTIONS)
    assert len(records) == 5 * (1 + 2 * 2)
    full = next(r for r in report["rows"] if r["ratio"] == 1.0)
    assert full["by_type"]["open"]["score"] == 1.0 and full["n"] == 5
    for row in report["rows"]:
        assert row["n"] == 5 and 0.0 <= row["score"] <= 1.0 and row["retention"] is not None
    assert set(report["mean_retention"]) == {"apet@1", "apet@0.22", "apet@0.11", "random@0.22", "random@0.11"}
    for name in ("report.json", "report.md", "retention.png", PREDICTIONS):
        assert (cfg.out / name).stat().st_size > 0
    assert json.loads((cfg.out / "report.json").read_text())["items"] == 5
    # resume: drop two answers and truncate the last line; only those are recomputed
    lines = (cfg.out / PREDICTIONS).read_text().splitlines()
    (cfg.out / PREDICTIONS).write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])
    again = run_eval(cfg)
    resumed = read_predictions(cfg.out / PREDICTIONS)
    assert len(resumed) == len(records)
    assert {(r["method"], r["ratio"], r["id"]) for r in resumed} == {(r["method"], r["ratio"], r["id"])
                                                                     for r in records}
    assert again["mean_retention"] == report["mean_retention"]


def test_cli_help_documents_the_format() -> None:
    out = subprocess.run([sys.executable, "-m", "apet.cli", "eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and '"answers"' in out.stdout and "pope" in out.stdout


def test_resume_asks_edited_rows_again_and_drops_removed_ones(eval_data: dict, tmp_path: Path) -> None:
    """A real JSONL edited between two runs into the same --out: one answer and one question changed, one
    image replaced under its old name, one row removed. The changed rows are asked again, the rest reused,
    and the report equals a fresh run's (reusing by id, o0 kept its stale score 1 where fresh gives 0)."""
    import shutil
    from dataclasses import replace

    images = tmp_path / "images"
    shutil.copytree(eval_data["images"], images)
    data = tmp_path / "mini.jsonl"
    shutil.copy(eval_data["data"], data)
    cfg = EvalConfig(source=str(eval_data["checkpoint"]), data=(data,), images=images, out=tmp_path / "out",
                     ratios=(1.0,), max_new_tokens=4)
    first = run_eval(cfg)
    assert first["predictions"] == {"reused": 0, "run": 5, "changed_rows": 0}
    assert first["rows"][0]["by_type"]["open"]["score"] == 1.0  # the answers are the model's own
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["o0", "o1", "o2", "y0", "y1"]
    rows[0]["answer"] = "a giraffe riding a bicycle"  # o0: an answer corrected
    rows[1]["question"] = "What colour is the background?"  # o1: a question edited
    make_image(7).save(images / rows[2]["image"])  # o2: its image replaced under the same name
    del rows[4]  # y1: removed
    _write(data, rows)

    again = run_eval(cfg)
    assert again["predictions"] == {"reused": 1, "run": 3, "changed_rows": 3}
    assert again["items"] == 4 and again["rows"][0]["n"] == 4
    assert "1 reused from an earlier run" in (cfg.out / "report.md").read_text()
    fresh = run_eval(replace(cfg, out=tmp_path / "fresh"))
    assert fresh["predictions"] == {"reused": 0, "run": 4, "changed_rows": 0}
    assert again["rows"] == fresh["rows"] and again["mean_retention"] == fresh["mean_retention"]
    assert again["rows"][0]["by_type"]["open"]["score"] < 1.0  # o0 now scores 0
    stored = {r["id"]: r for r in read_predictions(cfg.out / PREDICTIONS) if r["id"] != "y1"}
    made = {r["id"]: r for r in read_predictions(tmp_path / "fresh" / PREDICTIONS)}
    assert {k: (r["prediction"], r["score"], r["row"], r["setting"]) for k, r in stored.items()} == \
        {k: (r["prediction"], r["score"], r["row"], r["setting"]) for k, r in made.items()}
    # a third run with nothing changed computes nothing
    assert run_eval(cfg)["predictions"] == {"reused": 4, "run": 0, "changed_rows": 0}


def test_predictions_of_another_setting_are_not_reused(eval_data: dict, tmp_path: Path) -> None:
    """Same rows, a longer answer limit: another setting, so nothing is reused."""
    from dataclasses import replace

    cfg = EvalConfig(source=str(eval_data["checkpoint"]), data=(eval_data["data"],), images=eval_data["images"],
                     out=tmp_path / "out", ratios=(1.0,), max_new_tokens=2, limit=2)
    assert run_eval(cfg)["predictions"]["run"] == 2
    assert run_eval(replace(cfg, max_new_tokens=3))["predictions"] == {"reused": 0, "run": 2, "changed_rows": 0}
    assert run_eval(cfg)["predictions"] == {"reused": 2, "run": 0, "changed_rows": 0}


def test_artifact_source_warns_only_about_options_typed(artifact_factory, tmp_path: Path, caplog) -> None:
    from apet.cli import main

    images = tmp_path / "images"
    images.mkdir()
    make_image(0).save(images / "0.png")
    data = _write(tmp_path / "data.jsonl", [{"id": "q0", "image": "0.png", "question": "What?", "answer": "x"}])
    artifact = artifact_factory(ratio=0.11, stages=2)
    common = ["eval", str(artifact), "--data", str(data), "--images", str(images), "--backend", "onnxruntime",
              "--max-new-tokens", "1"]
    with caplog.at_level("WARNING", logger="apet.eval.runner"):
        assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert "ignored" not in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="apet.eval.runner"):  # --weights/--stages agree with the artifact
        assert main(common + ["--out", str(tmp_path / "b"), "--ratios", "0.5", "--weights", "fp16",
                              "--stages", "2", "--group-size", "64"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
    assert "--ratios/--group-size only apply" in warning and "--weights" not in warning


def test_answers_without_keys_are_not_reused(eval_data: dict, tmp_path: Path) -> None:
    """A predictions.jsonl from before row keys: its answer (deliberately wrong, scored 1) is not trusted."""
    out = tmp_path / "out"
    out.mkdir()
    legacy = {"method": "apet", "ratio": 1.0, "benchmark": "mini", "id": "o0", "type": "open", "prediction": "zebra",
              "score": 1.0}
    (out / PREDICTIONS).write_text(json.dumps(legacy) + "\n")
    cfg = EvalConfig(source=str(eval_data["checkpoint"]), data=(eval_data["data"],), images=eval_data["images"],
                     out=out, ratios=(1.0,), max_new_tokens=4, limit=1)
    report = run_eval(cfg)
    assert report["predictions"] == {"reused": 0, "run": 1, "changed_rows": 0}
    records = read_predictions(out / PREDICTIONS)
    assert records[0] == legacy and records[1]["prediction"] != "zebra" and len(records) == 2
