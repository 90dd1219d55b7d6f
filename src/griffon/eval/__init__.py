"""Evaluation: scoring whole documents and packed batches (loss, perplexity, bits per byte;
:mod:`.score`), reading the documents to score (:mod:`.documents`), and griffon's model for
lm-evaluation-harness with its offline task pack (:mod:`.harness`, ``harness_tasks/``)."""

from griffon.eval.score import Scores, byte_table, evaluate, score_continuations, score_documents

__all__ = ["Scores", "byte_table", "evaluate", "score_continuations", "score_documents"]
