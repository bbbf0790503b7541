"""Scoring: VQAv2-style normalised soft accuracy, yes/no accuracy + F1 (POPE), multiple-choice letters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from apet.media.dataset import LETTERS, EvalItem

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "whats": "what's", "thats": "that's", "im": "i'm", "ive": "i've"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:]")


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation: lowercase, punctuation, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\d)\.(?!\d)", " ", text)  # periods that are not decimal points
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#annotators who gave the prediction / 3, 1), on normalised strings."""
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == predicted for a in answers)
    return min(matches / 3.0, 1.0) if len(answers) > 1 else float(matches > 0)


def yes_no(prediction: str) -> str | None:
    """'yes' / 'no' read from a free-form answer (first yes/no word), or None."""
    for word in normalize_answer(prediction).split():
        if word in ("yes", "no"):
            return word
    return None


def choice_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a prediction picks: a leading letter ('B', 'B.', '(B)') or the option's text."""
    text = prediction.strip()
    match = re.match(r"^\(?([A-Z])(?:[.):]|\s|$)", text)
    if match and LETTERS.index(match.group(1)) < len(choices):
        return match.group(1)
    normalized = normalize_answer(text)
    for i, choice in enumerate(choices):
        if normalize_answer(choice) == normalized:
            return LETTERS[i]
    return None


def score_item(item: EvalItem, prediction: str) -> float:
    if item.type == "yesno":
        return float(yes_no(prediction) == normalize_answer(item.answers[0]))
    if item.type == "choice":
        gold = item.answers[0].strip()
        if len(gold) != 1 or gold not in LETTERS:  # the answer given as option text
            gold = choice_letter(gold, item.choices) or gold
        return float(choice_letter(prediction, item.choices) == gold)
    return soft_accuracy(prediction, item.answers)


@dataclass(frozen=True)
class BinaryScores:
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    unreadable: int = 0  # answers with neither yes nor no


def yes_no_scores(gold: Sequence[str], predicted: Sequence[str | None]) -> BinaryScores:
    """POPE's metrics with 'yes' as the positive class. An unreadable answer (no yes/no word) is wrong, as in
    :func:`score_item`: it never counts as correct and a 'yes' question it answers is a false negative."""
    pairs = [(g.lower(), p) for g, p in zip(gold, predicted)]
    tp = sum(g == "yes" and p == "yes" for g, p in pairs)
    fp = sum(g == "no" and p == "yes" for g, p in pairs)
    fn = sum(g == "yes" and p != "yes" for g, p in pairs)
    correct = sum(g == p for g, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(1, len(pairs))
    return BinaryScores(correct / n, precision, recall, f1, sum(p == "yes" for _, p in pairs) / n,
                        sum(p is None for _, p in pairs))


def prompt_for(item: EvalItem) -> str:
    """The LLaVA-1.5 evaluation prompts for each question type."""
    if item.type == "choice":
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        return f"{item.question}\n{options}\nAnswer with the option's letter from the given choices directly."
    return f"{item.question}\nAnswer the question using a single word or phrase."
