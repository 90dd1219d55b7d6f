"""The serving engine's output processing: what a request's tokens become, and when it stops. The
text (detokenised as tokens arrive, cut at the first stop string), the log-probabilities of the
prompt and of the generated tokens, and the reason to stop (EOS, a stop token or string, or
``max_tokens``)."""

from __future__ import annotations

import torch

from griffon.data.tokenizers import Tokenizer
from griffon.decode.output import TextStream, append_token
from griffon.engine.request import LogprobRows, Request


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # float32 at least: bf16 logits would give log-probabilities good to 2-3 digits only
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


class OutputProcessor:
    """Outputs for one engine; ``tokenizer`` gives text, stop strings and EOS (``None``: ids only)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.eos_id = None if tokenizer is None else tokenizer.eos_id

    def open(self, req: Request) -> None:
        """Set up ``req``'s outputs: its text stream and the log-probability tables it asked for."""
        if self.tokenizer is not None:  # the text so far, cut at the first stop string
            req.text = TextStream(self.tokenizer, req.params.stop)
        if req.params.logprobs is not None:
            req.logprobs = LogprobRows(req.params.logprobs)
            if req.params.echo:
                req.prompt_logprobs = LogprobRows(req.params.logprobs)

    def score_prompt(self, req: Request, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-probabilities of the prompt's tokens predicted by the logits (T, V) at positions
        start .. end-1: position t predicts token t+1; nothing predicts the first token."""
        end = min(end, len(req.prompt) - 1)
        if end > start:
            targets = torch.tensor(req.prompt[start + 1 : end + 1], device=logits.device)
            req.prompt_logprobs.extend(log_softmax(logits[: end - start]), targets)

    def append(self, req: Request, token: int, logits: torch.Tensor) -> str | None:
        """Add a generated ``token``, sampled from ``logits`` (1, V, the model's, before penalties),
        to ``req``'s outputs; the reason the request stops with it (``stop`` or ``length``), else
        None, by the rules :func:`griffon.generate` follows too (:func:`~griffon.decode.output.append_token`)."""
        p = req.params
        if req.logprobs is not None or p.score:
            logp = log_softmax(logits)
            chosen = torch.tensor([token], device=logits.device)
            if req.logprobs is not None:
                req.logprobs.extend(logp, chosen)
            req.cumulative_logprob += float(logp[0, token])
        return append_token(p, req.tokens, req.text, token, self.eos_id)
