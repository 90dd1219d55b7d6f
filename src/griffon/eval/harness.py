"""griffon as an lm-evaluation-harness model: ``griffon lm-eval --model griffon --model_args pretrained=RUN ...``.

Needs the optional extra ``griffon[eval]`` (``lm_eval``). Importing this module registers the model
class :class:`GriffonLM` as ``griffon`` with lm-eval; ``griffon lm-eval`` does so and then runs
lm-eval's own command line, so every lm-eval option works.

Speed comes from the fixed-size state of recurrent models: requests that share a context (the
choices of a multiple-choice question) prefill it once and continue each choice from a copy of
the cache (:func:`griffon.eval.score.score_continuations`); rolling loglikelihood reads a document
once with the state carried across chunks (:func:`griffon.eval.score.score_documents`) instead of
re-encoding overlapping windows.

That default, ``rolling=carry``, conditions every token on its whole document (for recurrent and
local-attention models), which is more context than lm-eval's HF model gives at the same
``max_length``: it cuts a document into disjoint windows of ``max_length`` tokens, each read from
an empty state, so a window's first token sees one token of context. Perplexities from the two
differ; ``rolling=windows`` scores lm-eval's windows (``lm_eval.utils.get_rolling_token_windows``)
as the HF model does, for numbers comparable with it. ``carry`` is the default because it measures
what a recurrent model is for: its state is the context, at no extra cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from griffon.checkpoint import load_for_inference, open_source
from griffon.decode import generate_text
from griffon.eval.score import byte_table, score_continuations, score_documents

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
"""The offline task pack (``griffon_next_line``, ``griffon_last_word``): ``--include_path`` it."""


@register_model("griffon")
class GriffonLM(TemplateLM):
    """A griffon run, checkpoint or exported model (``pretrained=PATH``) under lm-eval.

    Model arguments: ``pretrained`` (required), ``batch_size`` (default 8), ``device`` (``cpu``;
    ``cuda``, lm-eval's default, falls back to the CPU where there is no GPU),
    ``max_length`` (tokens per chunk when reading long texts, and the longest context plus
    generation in ``generate_until``, default 1024), ``step`` (the decode step for generation:
    ``auto``, ``model``, ``fused`` or ``compiled``), ``rolling`` (``carry``, the default, or
    ``windows``: how rolling loglikelihood reads a long text, the module docstring says why).
    """

    # The model arguments. lm-eval's command line also passes its --batch_size, --max_batch_size and
    # --device to every model: those griffon takes are overridden by a model argument, the rest dropped.
    ARGS = ("pretrained", "batch_size", "device", "max_length", "step", "rolling")
    ROLLING = ("carry", "windows")

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        device: str = "cpu",
        max_length: int = 1024,
        step: str = "auto",
        rolling: str = "carry",
    ) -> None:
        super().__init__()
        if rolling not in self.ROLLING:
            raise ValueError(f"rolling={rolling!r}: it is one of {', '.join(self.ROLLING)}")
        self.model_path = open_source(pretrained).path
        self.model, self.griffon_tokenizer = load_for_inference(pretrained, device=device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length)
        self.step = step
        self.rolling = rolling

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GriffonLM:
        """``--model_args a=1,b=2``: an unknown argument is refused by name; one that lm-eval's own
        options also set (``batch_size``, ``device``) takes the value given in the model arguments."""
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> GriffonLM:
        unknown = sorted(set(arg_dict) - set(cls.ARGS))
        if unknown:
            raise ValueError(f"unknown griffon model argument(s) {', '.join(unknown)}; it takes {', '.join(cls.ARGS)}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in cls.ARGS}
        return cls(**(extra | arg_dict))

    @property
    def eot_token_id(self) -> int:
        # Without an EOS (the byte tokenizer), the newline byte conditions an empty context, as a
        # document boundary would.
        eos = self.griffon_tokenizer.eos_id
        return eos if eos is not None else self.griffon_tokenizer.encode("\n")[-1]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.griffon_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.griffon_tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return score_continuations(self.model, pairs, self.batch_size, self.max_length)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability, its first token conditioned on the end-of-text token; with
        ``rolling=carry`` the text is read once, with the state carried across chunks of
        ``max_length`` tokens; with ``rolling=windows``, in lm-eval's disjoint windows."""
        if self.rolling == "windows":
            return [self._rolling_windows(request.args[0]) for request in requests]
        docs = [[self.eot_token_id, *self.tok_encode(request.args[0])] for request in requests]
        scores = score_documents(self.model, docs, byte_table(self.griffon_tokenizer), self.max_length,
                                 self.batch_size, per_doc=True)  # fmt: skip
        return [-row["nats"] for row in scores.per_doc]

    def _rolling_windows(self, text: str) -> float:
        """A text's log-probability over lm-eval's disjoint rolling windows, as its HF model scores it."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1
        )
        pairs = [make_disjoint_window(w) for w in windows]
        return sum(logprob for logprob, _ in score_continuations(self.model, pairs, self.batch_size, self.max_length))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of ``until`` (stop strings; default the end-of-text
        token only) or ``max_gen_toks`` tokens; greedy unless ``do_sample`` or ``temperature > 0``.
        As lm-eval's HF model, the context keeps its last ``max_length - max_gen_toks`` tokens."""
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            text = generate_text(
                self.model, self.griffon_tokenizer, [context or "\n"], max_new, stop_strings=until,
                max_prompt_tokens=max(self.max_length - max_new, 1),
                temperature=temperature, top_p=kwargs.pop("top_p", None), top_k=kwargs.pop("top_k", None),
                seed=kwargs.pop("seed", 0), step=self.step,
            )[0]  # fmt: skip
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``griffon`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:  # the offline task pack, unless another is given
        argv += ["--include_path", str(TASKS_DIR)]
    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
