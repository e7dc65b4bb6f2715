"""LLaVA-Bench (COCO) and LLaVA-Bench (In-the-Wild), judged as LLaVA does it.

LLaVA's llava/eval/eval_gpt_review_visual.py (COCO; the README's "GPT-assisted Evaluation")
and eval_gpt_review_bench.py (In-the-Wild; scripts/v1_5/eval/llavabench.sh) ask a judge, for
each question, to score two answers: the reference (text-only GPT-4's, given the context) as
Assistant 1 and the model's as Assistant 2. The request, as those scripts send it:
    system: "You are a helpful and precise assistant for checking the quality of the answer."
    user:   "[Context]\\n{context}\\n\\n[Question]\\n{question}\\n\\n"
            "[{role} 1]\\n{reference}\\n\\n[End of {role} 1]\\n\\n"
            "[{role} 2]\\n{answer}\\n\\n[End of {role} 2]\\n\\n[System]\\n{prompt}\\n\\n"
    temperature 0.2, max_tokens 1024 (the scripts' values; their judge was gpt-4-0314)
with role and prompt from llava/eval/table/rule.json by the question's category: COCO's as it
is (conv, detail, complex: the prompt that speaks of captions and boxes), In-the-Wild's as
"llava_bench_" + category. The context: COCO's five captions, one a line, a blank line, then
one "{category}: {bbox}" line per object (caps_boxes_coco2014_val_80.jsonl); In-the-Wild's
caption (context.jsonl), its lines joined by newlines when it is a list. Both are looked up by
the question's image. The prompts are in judge_prompts.yaml, quoted from rule.json.

A reply's scores (parse_score): its first line, commas made spaces, split on single spaces;
two pieces that read as numbers are (reference, model), anything else is [-1, -1], which
LLaVA keeps in the means (counted here under `unparsed`, with the question ids).

llava/eval/summarize_gpt_review.py then reports, per category and for all questions, the
means of the two scores rounded to 3 places, and prints
    round(model / reference * 100, 1), round(reference * 10, 1), round(model * 10, 1)
the first being the relative score the papers quote. Here `metrics` and each of `subtasks`
(conv, detail, complex) hold those three as fractions: relative_score (its percentage / 100),
reference_score and model_score (the mean on the 1-10 scale / 10), with n, and the unrounded
1-10 means as reference_mean and model_mean.

lmms-eval's llava_in_the_wild and llava-bench-coco tasks differ (not implemented here): their
judge defaults to gpt-4o-2024-11-20, their parse takes the first two numbers of the first line
(so "8, 7" and "Assistant 1: 8, Assistant 2: 7" read as scores), and their relative score is of
the unrounded means; they generate up to 4096 tokens.

Beyond LLaVA's scripts: answers are matched to questions and references by question_id (the
scripts zip the three files line by line, which is the same when they are in order); a
question without an answer is judged with an empty answer and listed under `missing`.

Layout. In-the-Wild, as LLaVA's docs/Evaluation.md (the hub's liuhaotian/llava-bench-in-the-wild):
    llava-bench-in-the-wild/questions.jsonl    questions: question_id, image, text, category
    llava-bench-in-the-wild/context.jsonl      captions: image, caption
    llava-bench-in-the-wild/answers_gpt4.jsonl the reference answers: question_id, text
    llava-bench-in-the-wild/images/            the images
COCO, as LLaVA's playground/data/coco2014_val_qa_eval/ with the caption-and-box file of
llava/eval/table/ copied beside it:
    coco2014_val_qa_eval/qa90_questions.jsonl, qa90_gpt4_answer.jsonl, caps_boxes_coco2014_val_80.jsonl
    coco2014_val_qa_eval/images/               the COCO val2014 images the questions name
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylmm.data.jsonl import read_jsonl
from tinylmm.errors import DataError
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import layout_file, read_answers
from tinylmm.eval.base import BENCHMARKS
from tinylmm.eval.judge import Judge, prompts

TEMPERATURE = 0.2  # LLaVA's eval_gpt_review_*.py (with a TODO on which temperature is best)
MAX_TOKENS = 1024
CATEGORIES = ("conv", "detail", "complex")
FALLBACK = [-1.0, -1.0]


def parse_score(review: str) -> list[float]:
    """LLaVA's parse of a review: [reference, model] from its first line, else [-1, -1]."""
    pieces = review.split("\n")[0].replace(",", " ").split(" ")
    if len(pieces) != 2:
        return list(FALLBACK)
    try:
        return [float(pieces[0]), float(pieces[1])]
    except ValueError:
        return list(FALLBACK)


@dataclass(frozen=True)
class Variant:
    """What differs between LLaVA-Bench's COCO and In-the-Wild sets."""

    name: str
    questions: str
    references: str
    context: str
    rule_prefix: str  # rule.json's key is prefix + the question's category

    def context_text(self, entry: dict, path: Path) -> str:
        if self.name == "llava_bench_coco":
            try:
                captions = "\n".join(entry["captions"])
                boxes = "\n".join(f"{o['category']}: {o['bbox']}" for o in entry["instances"])
            except (KeyError, TypeError) as e:
                raise DataError(f"{path}: context of {entry.get('image')} lacks {e} (captions, instances)") from None
            return f"{captions}\n\n{boxes}"
        if "caption" not in entry:
            raise DataError(f"{path}: context of {entry.get('image')} has no 'caption'")
        caption = entry["caption"]
        return "\n".join(caption) if isinstance(caption, list) else str(caption)


COCO = Variant(
    "llava_bench_coco", "qa90_questions.jsonl", "qa90_gpt4_answer.jsonl", "caps_boxes_coco2014_val_80.jsonl", ""
)
WILD = Variant("llava_bench_in_the_wild", "questions.jsonl", "answers_gpt4.jsonl", "context.jsonl", "llava_bench_")


def review_request(context: str, question: str, reference: str, answer: str, rule: dict) -> list[dict]:
    """The messages LLaVA's review scripts send for one question."""
    role, prompt = rule["role"], rule["prompt"]
    content = (
        f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{prompt}\n\n"
    )
    return [{"role": "system", "content": prompts()["llava_bench"]["system"]}, {"role": "user", "content": content}]


def summary(tuples: list[list[float]]) -> dict:
    """summarize_gpt_review.py's figures for a group of [reference, model] scores, as fractions."""
    reference = sum(t[0] for t in tuples) / len(tuples)
    model = sum(t[1] for t in tuples) / len(tuples)
    ref3, model3 = round(reference, 3), round(model, 3)
    relative = round(model3 / ref3 * 100, 1) if ref3 else 0.0  # LLaVA divides by zero there
    return {
        "n": len(tuples),
        "relative_score": round(relative / 100, 4),
        "reference_score": round(round(ref3 * 10, 1) / 100, 4),
        "model_score": round(round(model3 * 10, 1) / 100, 4),
        "reference_mean": reference,
        "model_mean": model,
    }


def _by_id(path: Path, what: str) -> dict[str, dict]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        for name in ("question_id", "text"):
            if name not in row:
                raise DataError(f"{path}, line {i}: {what} has no '{name}'")
    return {str(r["question_id"]): r for r in rows}


def score_llava_bench(variant: Variant, data: Path, answers_path: Path, rule: str, judge: Judge) -> dict:
    data = Path(data)
    q_path = layout_file(data, variant.questions, f"LLaVA-Bench's questions ({variant.name})")
    questions = _by_id(q_path, "a question")
    ref_path = layout_file(data, variant.references, "LLaVA-Bench's reference (GPT-4) answers")
    references = _by_id(ref_path, "a reference answer")
    ctx_path = layout_file(data, variant.context, "LLaVA-Bench's context (captions) by image")
    contexts = {str(c.get("image")): c for c in read_jsonl(ctx_path)}
    rules = prompts()["llava_bench"]["rules"]
    answers = read_answers(answers_path, questions)

    tuples: dict[str, list[list[float]]] = {c: [] for c in CATEGORIES}
    unparsed = []
    for qid, q in questions.items():
        category = q.get("category")
        if variant.rule_prefix + str(category) not in rules:
            raise DataError(f"{q_path}: question {qid} has category {category!r}; LLaVA-Bench's are {CATEGORIES}")
        if qid not in references:
            raise DataError(f"{ref_path}: no reference answer to question {qid}")
        if str(q.get("image")) not in contexts:
            raise DataError(f"{ctx_path}: no context for image {q.get('image')!r} (question {qid})")
        messages = review_request(
            variant.context_text(contexts[str(q["image"])], ctx_path),
            q["text"],
            references[qid]["text"],
            answers.get(qid) or "",
            rules[variant.rule_prefix + category],
        )
        scores = parse_score(judge.ask(messages, temperature=TEMPERATURE, max_tokens=MAX_TOKENS))
        if scores == FALLBACK:
            unparsed.append(qid)
        tuples.setdefault(category, []).append(scores)

    everything = [t for group in tuples.values() for t in group]
    if not everything:
        raise DataError(f"{q_path} has no questions")
    overall = summary(everything)
    return {
        "bench": variant.name,
        "rule": rule,
        "n": len(everything),
        "metrics": {k: overall[k] for k in ("relative_score", "model_score", "reference_score")},
        "means": {"model": overall["model_mean"], "reference": overall["reference_mean"]},
        "subtasks": {c: summary(group) for c, group in tuples.items() if group},
        "unparsed": {"n": len(unparsed), "ids": unparsed},
        "missing": answers.report(),
    }


class _LLaVABench:
    rules = ("llava",)
    judged = True
    images = "images"
    max_new_tokens = 1024  # LLaVA's model_vqa.py, which answers LLaVA-Bench
    variant: Variant

    @classmethod
    def questions(cls, data: Path):
        return read_question_jsonl(data, cls.variant.questions, f"LLaVA-Bench's question file ({cls.variant.name})")

    @classmethod
    def score(cls, data: Path, answers: Path, rule: str = "llava", *, judge: Judge) -> dict:
        return score_llava_bench(cls.variant, data, answers, rule, judge)


@BENCHMARKS.register("llava_bench_coco")
class LLaVABenchCOCO(_LLaVABench):
    """LLaVA-Bench (COCO), 90 questions, judged against GPT-4's answers (LLaVA's relative score)."""

    variant = COCO


@BENCHMARKS.register("llava_bench_in_the_wild")
class LLaVABenchInTheWild(_LLaVABench):
    """LLaVA-Bench (In-the-Wild), 60 questions, judged against GPT-4's answers (LLaVA's relative score)."""

    variant = WILD
