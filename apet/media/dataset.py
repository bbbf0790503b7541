"""Evaluation data: apet's JSONL format and converters from the formats users already have.

apet format, one JSON object per line::

    {"id": "q1", "image": "COCO_val2014_000000000042.jpg", "question": "What color is the bus?",
     # or "video": "clips/v1.mp4" (a video file, a frame directory or a .npy) for video models
     "answers": ["red", "red", "dark red"],          # or "answer": "red"
     "type": "open" | "yesno" | "choice",            # default "open"
     "choices": ["cat", "dog"]}                      # "choice" only; the answer is a letter or the text

Converters (``--format``): ``llava`` (LLaVA eval question file + ``--annotations`` answers jsonl),
``pope`` (question_id/image/text/label), ``scienceqa`` (question/choices/answer index), ``vqa``
(VQAv2/TextVQA questions JSON + ``--annotations`` annotations JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from apet.errors import InputError, UsageError

TYPES = ("open", "yesno", "choice")
FORMATS = ("apet", "llava", "pope", "scienceqa", "vqa")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class EvalItem:
    id: str
    image: str
    question: str
    answers: tuple[str, ...]
    type: str = "open"
    choices: tuple[str, ...] = field(default_factory=tuple)
    benchmark: str = ""
    video: str = ""  # set instead of ``image`` for video rows

    @property
    def media(self) -> str:
        return "video" if self.video else "image"

    @property
    def path(self) -> str:
        """The medium's path, relative to ``--images``."""
        return self.video or self.image


def check_sources(data: tuple[Path, ...], images: Path) -> None:
    """The data files exist and ``images`` is a directory (checked before any model is loaded)."""
    for path in data:
        _check_data_file(path)
    if not Path(images).is_dir():
        raise UsageError(f"--images {images} is not a directory", "pass the folder the image paths are in")


def _check_data_file(path: Path) -> None:
    if not Path(path).is_file():
        raise InputError(f"data file {path} does not exist", "check --data")


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    _check_data_file(path)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number} is not valid JSON ({exc.msg})", "fix or remove that line") from exc
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number} is not a JSON object", "one object per line")
            yield number, record


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path} ({exc})", "pass the JSON file of the benchmark") from exc


def _item(record: dict[str, Any], where: str, benchmark: str) -> EvalItem:
    missing = [k for k in ("id", "question") if k not in record]
    if ("image" in record) == ("video" in record):
        missing.append("image" if "image" not in record else "image/video (only one)")
    if missing or ("answers" not in record and "answer" not in record):
        raise InputError(f"{where} lacks {', '.join(missing) or 'answers/answer'}",
                         "each line needs id, image (or video), question and answers (or answer)")
    answers = record.get("answers", record.get("answer"))
    answers = tuple(str(a) for a in (answers if isinstance(answers, list) else [answers]))
    kind = record.get("type", "open")
    if kind not in TYPES:
        raise InputError(f"{where} has type {kind!r}", f"use one of {', '.join(TYPES)}")
    choices = tuple(str(c) for c in record.get("choices") or ())
    if kind == "choice" and len(choices) < 2:
        raise InputError(f"{where} is a choice question with fewer than two choices", "add a choices list")
    return EvalItem(str(record["id"]), str(record.get("image", "")), str(record["question"]), answers, kind, choices,
                    benchmark, video=str(record.get("video", "")))


def load_apet(path: Path, benchmark: str | None = None) -> list[EvalItem]:
    name = benchmark or Path(path).stem
    return [_item(r, f"{path}:{n}", r.get("benchmark", name)) for n, r in _lines(path)]


def from_pope(path: Path) -> list[EvalItem]:
    """POPE: {"question_id", "image", "text", "label": "yes"|"no"}."""
    return [EvalItem(str(r["question_id"]), str(r["image"]), str(r["text"]), (str(r["label"]).lower(),), "yesno",
                     benchmark=Path(path).stem) for _, r in _lines(path)]


def from_scienceqa(path: Path) -> list[EvalItem]:
    """ScienceQA-style multiple choice: {"id", "image", "question", "choices": [...], "answer": index}."""
    items = []
    for _, r in _lines(path):
        choices = tuple(str(c) for c in r["choices"])
        answer = r["answer"]
        letter = LETTERS[int(answer)] if isinstance(answer, int) or str(answer).isdigit() else str(answer)
        items.append(EvalItem(str(r["id"]), str(r["image"]), str(r["question"]), (letter,), "choice", choices,
                              Path(path).stem))
    return items


def from_llava(path: Path, annotations: Path | None) -> list[EvalItem]:
    """LLaVA eval question file ({"question_id", "image", "text"}) + answers jsonl ({"question_id", "answer(s)"})."""
    if annotations is None:
        raise UsageError("--format llava needs --annotations ANSWERS.jsonl", "pass the answers file")
    answers: dict[str, Any] = {}
    for _, r in _lines(annotations):
        answers[str(r["question_id"])] = r.get("answers", r.get("answer", r.get("text")))
    items = []
    for number, r in _lines(path):
        qid = str(r["question_id"])
        if qid not in answers:
            raise InputError(f"{path}:{number}: question {qid} has no answer in {annotations}", "check both files")
        value = answers[qid]
        kind = "yesno" if str(value).strip().lower() in ("yes", "no") else "open"
        items.append(EvalItem(qid, str(r["image"]), str(r["text"]),
                              tuple(str(a) for a in (value if isinstance(value, list) else [value])), kind,
                              benchmark=Path(path).stem))
    return items


def from_vqa(path: Path, annotations: Path | None, image_pattern: str = "{image_id}.jpg") -> list[EvalItem]:
    """VQAv2 / TextVQA: questions JSON {"questions": [...]} + annotations JSON {"annotations": [...]}."""
    if annotations is None:
        raise UsageError("--format vqa needs --annotations ANNOTATIONS.json", "pass the annotations file")
    by_id = {str(a["question_id"]): a for a in _load_json(annotations).get("annotations", [])}
    items = []
    for q in _load_json(path).get("questions", []):
        a = by_id.get(str(q["question_id"]))
        if a is None:
            continue
        answers = tuple(str(x["answer"]) if isinstance(x, dict) else str(x) for x in a.get("answers", []))
        kind = "yesno" if a.get("answer_type") == "yes/no" else "open"
        items.append(EvalItem(str(q["question_id"]), image_pattern.format(**q), str(q["question"]), answers, kind,
                              benchmark=Path(path).stem))
    return items


def load(path: Path, fmt: str = "apet", annotations: Path | None = None, image_pattern: str = "{image_id}.jpg"
         ) -> list[EvalItem]:
    """Any supported format -> EvalItems; malformed input raises InputError naming the file and line."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is unknown", f"use one of {', '.join(FORMATS)}")
    try:
        if fmt == "apet":
            items = load_apet(path)
        elif fmt == "pope":
            items = from_pope(path)
        elif fmt == "scienceqa":
            items = from_scienceqa(path)
        elif fmt == "llava":
            items = from_llava(path, annotations)
        else:
            items = from_vqa(path, annotations, image_pattern)
    except KeyError as exc:
        raise InputError(f"{path} lacks the field {exc} that --format {fmt} needs", "check --format") from exc
    if not items:
        raise InputError(f"{path} holds no questions", "pass a data file with at least one question (check --format)")
    if len({i.id for i in items}) != len(items):
        raise InputError(f"{path} has duplicate ids", "ids must be unique (resume relies on them)")
    return items
