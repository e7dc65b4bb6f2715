"""VQA accuracy and the answer processing it compares after, shared by TextVQA and VQAv2.

The official VQA evaluation (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py)
processes an answer in two steps:
  processPunctuation: each of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  is deleted when the
      text holds it next to a space, or holds a comma between digits (`commaStrip`,
      "(\\d)(\\,)(\\d)"), else replaced by a space; then every "." not followed by a digit is
      deleted (at most 32 of them: the reference passes re.UNICODE where re.sub takes its count).
  processDigitArticle: lower-case and split on whitespace; per word, the number words
      none/zero..ten become digits, the articles a/an/the are dropped, and a contraction written
      without one of its apostrophes gets it back ("dont" -> "don't", "couldnt've" ->
      "couldn't've"); words joined by single spaces.
EvalAI's answer processor (MMF's port in LLaVA's llava/eval/m4c_evaluator.py,
EvalAIAnswerProcessor) runs the same two steps after its `word_tokenize` (lower-case; delete ","
and "?"; "'s" -> " 's"; strip), with newlines and tabs made spaces, and its comma rule matches
one or more commas between digits ("(?<=\\d)(\\,)+(?=\\d)").

The contraction table is written here from that rule; the official table has a few entries that
differ (capitalised keys such as "Im", which never match after lower-casing, and "somebody'd"
mapped to "somebodyd").

VQA accuracy of a prediction against the human answers: over the ways to leave one human
answer out (10 in VQAv2 and TextVQA), the mean of min(1, matches among the others / 3).
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
NUMBERS |= {"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# English contractions whose apostrophe-less spelling is not itself a word ("we'd" -> "wed" is left out)
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _without_one_apostrophe(word: str) -> list[str]:
    return [word[:i] + word[i + 1 :] for i, c in enumerate(word) if c == "'"]


CONTRACTIONS = {bare: word for word in CONTRACTED for bare in _without_one_apostrophe(word)}
VQA_COMMA = re.compile(r"\d,\d")  # vqaEval.py's commaStrip
EVALAI_COMMA = re.compile(r"(?<=\d),+(?=\d)")  # EvalAIAnswerProcessor's COMMA_STRIP
_PERIOD = re.compile(r"\.(?!\d)")


def process_punctuation(text: str, comma: re.Pattern = VQA_COMMA) -> str:
    """processPunctuation (module docstring); `comma` is the comma-between-digits rule."""
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or comma.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """processDigitArticle (module docstring)."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def evalai_normalize(answer: str) -> str:
    """EvalAI's answer processor: word_tokenize, then both steps with its comma rule."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = process_punctuation(text.replace("\n", " ").replace("\t", " ").strip(), EVALAI_COMMA)
    return process_digit_article(text)


def leave_one_out_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches / 3), the answers compared as given."""
    n = len(human_answers)
    matches = [sum(h == prediction for j, h in enumerate(human_answers) if j != i) for i in range(n)]
    return sum(min(1.0, m / 3) for m in matches) / n
