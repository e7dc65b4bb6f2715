"""`tinylmm data instructize`: a VQA / multiple-choice / caption / referring-expression file
turned into a LLaVA conversation file (tinylmm/data/instructize.py has the rules)."""

from __future__ import annotations


def instructize_file(src, out, options, *, images=None):
    """tinylmm.data.instructize.instructize_file, imported when called (`tinylmm --help` stays light)."""
    from tinylmm.data import instructize

    return instructize.instructize_file(src, out, options, images=images)
