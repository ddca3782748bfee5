"""Score (context, continuation) pairs with a causal LM under lm-eval 0.4's HFLM rules.

The rules that move numbers, all reproduced here:
- trailing whitespace of the context moves to the front of the continuation;
- the pair is tokenized as a whole and as context alone; the continuation is the tail of the
  whole beyond the context's token count (so merges across the boundary match the harness);
- the tokenizer's own special-token default is used (no BOS forced or removed), except that text
  already starting with the BOS string gets no second one;
- an empty context becomes the prefix token (BOS, else EOS);
- inputs longer than the model's context keep their last max_length tokens.
Batches are right-padded; the causal mask keeps padding from touching real positions, and log
probabilities are taken in fp32 and summed in fp64 so batch size does not move the scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError

# HF tokenizers use this as "no model_max_length set" (int(1e30)); lm-eval ignores it too.
TOKENIZER_UNSET_LENGTH = int(1e30)
FALLBACK_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Score:
    loglikelihood: float
    is_greedy: bool  # every continuation token is the argmax given its prefix


def model_max_length(model, tokenizer) -> int:
    """Context length as lm-eval resolves it: config fields, then the tokenizer, then 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if tokenizer_length is not None and tokenizer_length != TOKENIZER_UNSET_LENGTH:
        return int(tokenizer_length)
    return FALLBACK_MAX_LENGTH


class LoglikelihoodScorer:
    def __init__(self, model, tokenizer, batch_size: int):
        if batch_size < 1:
            raise QtoolError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = model_max_length(model, tokenizer)
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        self.device = next(model.parameters()).device
        self.keeps_selected_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _encode(self, text: str) -> list[int]:
        if self.prefix_text and text.startswith(self.prefix_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids for (context, continuation), split the way the harness splits them."""
        if context == "":
            continuation_ids = self.tokenizer.encode(continuation, add_special_tokens=False)
            if continuation_ids and continuation_ids[0] == self.prefix_token_id:
                return continuation_ids[:1], continuation_ids[1:]
            return [self.prefix_token_id], continuation_ids
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        context_ids = self._encode(stripped)
        whole_ids = self._encode(stripped + continuation)
        return context_ids, whole_ids[len(context_ids) :]

    def _model_input(self, context_ids: list[int], continuation_ids: list[int]) -> list[int]:
        if not continuation_ids:
            raise QtoolError("a continuation encodes to no tokens; check the task file for empty answers")
        if len(continuation_ids) > self.max_length:
            raise QtoolError(
                f"a continuation of {len(continuation_ids)} tokens exceeds the model's {self.max_length}-token context"
            )
        # The last token is only ever a target, never an input.
        return (context_ids + continuation_ids)[-(self.max_length + 1) :][:-1]

    @torch.no_grad()
    def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        inputs = [self._model_input(ctx, cont) for ctx, cont in pairs]
        width = max(len(ids) for ids in inputs)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        spans = [range(len(ids) - len(cont), len(ids)) for ids, (_, cont) in zip(inputs, pairs)]
        logits, column_of = self._continuation_logits(batch.to(self.device), spans)
        scores = []
        for row, (span, (_, cont)) in enumerate(zip(spans, pairs)):
            columns = torch.tensor([column_of[p] for p in span], device=logits.device)
            logprobs = torch.log_softmax(logits[row, columns].float(), dim=-1)
            targets = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
            picked = logprobs.gather(1, targets[:, None]).squeeze(1)
            scores.append(
                Score(
                    loglikelihood=float(picked.double().sum()),
                    is_greedy=bool((logprobs.argmax(dim=-1) == targets).all()),
                )
            )
        return scores

    def _continuation_logits(self, batch: torch.Tensor, spans: list[range]) -> tuple[torch.Tensor, dict[int, int]]:
        """Logits at the positions some row scores, plus position -> column in the result.

        Models that take `logits_to_keep` skip the vocabulary projection elsewhere (a fifth of
        the work for a small model); the kept positions' logits are the same numbers either way.
        """
        if not self.keeps_selected_logits:
            return self.model(batch).logits, {p: p for p in range(batch.shape[1])}
        positions = sorted({p for span in spans for p in span})
        keep = torch.tensor(positions, dtype=torch.long, device=batch.device)
        return self.model(batch, logits_to_keep=keep).logits, {p: i for i, p in enumerate(positions)}

    def score(
        self,
        requests: Sequence[tuple[str, str]],
        advance: Callable[[int], None] | None = None,
    ) -> list[Score]:
        """Scores in request order; longest inputs first so each batch pads little."""
        pairs = [self.encode_pair(context, continuation) for context, continuation in requests]
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        scores: list[Score | None] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, score in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                scores[index] = score
            if advance:
                advance(len(chunk))
        return scores
