"""``KLAEvalLM``: lm-eval-harness's model interface over our Hugging Face ``KLAForCausalLM``.

Scoring follows lm-eval's own Hugging Face model (``lm_eval.models.huggingface.HFLM``) request
by request: the same context/continuation split (``TemplateLM._encode_pair``), EOS before an empty
context, left truncation to ``max_length``, rolling windows for ``loglikelihood_rolling``, stop
strings cut from ``generate_until`` outputs; only the model call is ours.

Batches: log-likelihood rows are right-padded (the model is causal: padding after a row's last
token cannot change its logits, so no mask is needed and scores do not depend on the batch
size); logits are formed only at the continuation positions (never a [batch, length, vocab]
tensor). Generation left-pads with an attention mask, which ``KLAForCausalLM`` handles exactly
(padded positions leave every KLA state as it was).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .loading import Tokenizer

_log = logging.getLogger("kla_megatron.evaluation")


class _StopStrings(StoppingCriteria):
    """Per row: stop once the generated text contains one of the stop strings."""

    def __init__(self, tokenizer: Tokenizer, stops: List[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = [self.tokenizer.decode(row[self.prompt_len:].tolist()) for row in input_ids]
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class KLAEvalLM(TemplateLM):
    """An lm-eval ``LM`` scoring with ``model`` (a ``KLAForCausalLM``) and ``tokenizer``."""

    def __init__(self, model, tokenizer: Tokenizer, *, batch_size: int = 1, device="cpu",
                 dtype: torch.dtype = torch.float32, max_length: Optional[int] = None, max_gen_toks: int = 256):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        self._device = torch.device(device)
        self.model = model.to(device=self._device, dtype=dtype).eval()
        self.kla_tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self._warned_truncation = False

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.kla_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.kla_tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.kla_tokenizer.decode(tokens)

    # ------------------------------------------------------------------ log-likelihood

    def _window(self, context: List[int], continuation: List[int]) -> List[int]:
        """The input tokens of one request: context + continuation minus the last token, the
        oldest tokens dropped beyond ``max_length`` (as lm-eval's HFLM does)."""
        whole = context + continuation
        if len(whole) > self.max_length + 1 and not self._warned_truncation:
            _log.warning(f"kla-eval: requests longer than max_length {self.max_length} are truncated from the left")
            self._warned_truncation = True
        return whole[-(self.max_length + 1):][:-1]

    @torch.inference_mode()
    def continuation_logprobs(self, rows: List[Tuple[List[int], List[int]]]) -> List[torch.Tensor]:
        """Per (context, continuation) token lists, one batch: the log-probabilities [n, vocab]
        (fp32) at the n positions that predict the continuation's n tokens."""
        inputs = [self._window(ctx, cont) for ctx, cont in rows]
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)  # right padding: never seen by real tokens
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        hidden = self.model.model(input_ids=ids.to(self.device))[0]  # [b, width, D] after the final norm
        picked = torch.cat([hidden[i, len(x) - len(cont): len(x)]
                            for i, (x, (_, cont)) in enumerate(zip(inputs, rows))])
        weight = self.model.output_weight()
        logits = F.linear(picked, weight.to(picked.dtype)).float()  # as KLAForCausalLM.forward
        return list(logits.log_softmax(-1).split([len(cont) for _, cont in rows]))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kla-eval loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            rows = [(ctx, cont) for _, ctx, cont in chunk]
            for (key, _, cont), logp in zip(chunk, self.continuation_logprobs(rows)):
                target = torch.tensor(cont, device=logp.device)
                answer = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Whole-text log-likelihood in windows of ``max_length`` tokens (EOS before the first)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate_texts(self, contexts: List[str], until: List[str], max_gen_toks: int, **gen_kwargs) -> List[str]:
        """One batch: each context continued (greedy unless ``do_sample``) until a stop string,
        EOS or ``max_gen_toks`` tokens; the text before the first stop string."""
        keep = max(self.max_length - max_gen_toks, 1)
        encoded = [self.tok_encode(c)[-keep:] or [self.eot_token_id] for c in contexts]
        width = max(len(x) for x in encoded)
        ids = torch.full((len(encoded), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(encoded):  # left padding, masked
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        if not gen_kwargs.get("do_sample"):
            gen_kwargs.pop("temperature", None)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max_gen_toks, pad_token_id=self.eot_token_id,
                                  eos_token_id=self.eot_token_id, use_cache=True,
                                  stopping_criteria=StoppingCriteriaList([_StopStrings(self.kla_tokenizer, until,
                                                                                       width)]),
                                  **gen_kwargs)
        texts = []
        for row in out[:, width:].tolist():
            row = row[: row.index(self.eot_token_id)] if self.eot_token_id in row else row
            texts.append(postprocess_generated_text(self.tok_decode(row), until, None))
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        order = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos = self.tok_decode([self.eot_token_id])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kla-eval generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos or None)
            texts = self.generate_texts(list(contexts), until, kwargs.pop("max_gen_toks"), **kwargs)
            for context, text in zip(contexts, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)
