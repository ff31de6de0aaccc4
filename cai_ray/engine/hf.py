"""transformers backend: CPU or one GPU, batched, left padding, the model's chat template."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cai_ray.engine import ChatTemplate, Message, Sampling, normalise_logprobs
from cai_ray.models import resolve_model

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "auto")


class HFEngine(ChatTemplate):
    """``generate`` / ``choice_logprobs`` with a transformers causal LM.

    Conversations are sorted by length and cut into micro-batches of ``max_batch_size`` so
    padding stays small; results are returned in input order.
    """

    def __init__(
        self,
        model: str = "smollm2",
        dtype: str = "bfloat16",
        device: str = "auto",
        threads: int | None = None,
        max_batch_size: int = 32,
        attn_implementation: str | None = None,
        prefix_cache: bool = True,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"engine dtype must be one of {DTYPES}, got {dtype!r}")
        if threads:
            # Ray sets OMP_NUM_THREADS from the actor's (fractional) num_cpus; a 0.5-CPU
            # actor would get 1 thread and leave a core idle. The config decides instead.
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        path = resolve_model(model)
        self.model_name = model
        self.model_path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(self.device)
        self.model.eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", None) or 2048)
        self.max_batch_size = max(1, int(max_batch_size))
        self.prefix_cache = prefix_cache
        self._prefix_caches: dict[int, tuple] = {}
        self.tokens_generated = 0
        log.info("hf engine: %s on %s (%s), context %d", model, device, dtype, self.context_length)

    # -- generate ---------------------------------------------------------------------
    def generate(self, convs: list[list[Message]], params: Sampling) -> list[str]:
        import torch

        encoded = [self._encode(c) for c in convs]
        order = sorted(range(len(convs)), key=lambda i: len(encoded[i]))
        out: list[str | None] = [None] * len(convs)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        greedy = params.greedy
        gen_kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=not greedy,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if not greedy:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start : start + self.max_batch_size]
            rows = [encoded[i] for i in idx]
            shared = _common_prefix(rows) if self.prefix_cache and len(rows) > 1 else 0
            with torch.inference_mode():
                if shared >= MIN_SHARED_PREFIX:
                    seqs, width = self._generate_shared_prefix(rows, shared, gen_kwargs)
                else:
                    batch = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(self.device)
                    seqs = self.model.generate(**batch, **gen_kwargs)
                    width = batch["input_ids"].shape[1]
            new = seqs[:, width:]
            for row, i in enumerate(idx):
                ids = new[row]
                # count real tokens: up to and including the first EOS
                eos = (ids == self.tokenizer.eos_token_id).nonzero()
                n = int(eos[0]) + 1 if len(eos) else int(ids.shape[0])
                self.tokens_generated += n
                out[i] = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
        return out  # type: ignore[return-value]

    def _generate_shared_prefix(self, rows: list[list[int]], shared: int, gen_kwargs):
        """Prefill the tokens every row shares (few-shot turns, system prompt) once, then
        generate the batch from that KV cache: [prefix][left-padded suffix]. Positions come
        from the attention mask, so each row sees exactly the positions it would unpadded.
        On CPU the few-shot prefill otherwise dominates a critique/revision batch."""
        import torch

        cache = self._prefix_kv(rows[0][:shared], len(rows))
        prefix = torch.tensor([rows[0][:shared]], device=self.device)
        tail = self.tokenizer.pad({"input_ids": [r[shared:] for r in rows]}, padding=True, return_tensors="pt").to(
            self.device
        )
        n = len(rows)
        input_ids = torch.cat([prefix.expand(n, -1), tail["input_ids"]], dim=1)
        mask = torch.cat(
            [torch.ones((n, shared), dtype=tail["attention_mask"].dtype, device=self.device), tail["attention_mask"]],
            dim=1,
        )
        seqs = self.model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **gen_kwargs)
        return seqs, input_ids.shape[1]

    def _prefix_kv(self, prefix: list[int], copies: int):
        """A fresh KV cache of ``prefix`` for a batch of ``copies`` rows. The prefill of a
        prefix is kept (a few entries, LRU): a job's few-shot header is the same in every
        batch, so it is computed once per actor, not once per micro-batch. The batch sees
        the kept tensors through ``expand`` (no copy); the first forward's concatenation
        with the new tokens is the only copy made."""
        import torch
        from transformers import DynamicCache

        key = hash(tuple(prefix))
        entry = self._prefix_caches.pop(key, None)
        if entry is None or entry[0] != prefix:
            ids = torch.tensor([prefix], device=self.device)
            kv = self.model(ids, use_cache=True).past_key_values
            entry = (list(prefix), [(layer.keys, layer.values) for layer in kv.layers])
        self._prefix_caches[key] = entry  # most recently used last
        while len(self._prefix_caches) > PREFIX_CACHE_ENTRIES:
            self._prefix_caches.pop(next(iter(self._prefix_caches)))
        cache = DynamicCache()
        for i, (k, v) in enumerate(entry[1]):
            cache.update(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1), i)
        return cache

    def _last_logits(self, rows: list[list[int]], shared: int, groups: list[tuple[int, list[int]]]):
        """Next-token logits after each row ([rows, vocab]).

        Three segments, each computed once: the ``shared`` prefix of every row (from the
        prefix cache), then per group of rows the tokens that group also shares (the two
        orders of one labeler comparison share the conversation and question), then each
        row's own tail. ``groups`` is [(group prefix length beyond ``shared``, row
        indices)]. Padding sits at the left of each segment; positions come from the mask.
        """
        import torch
        from transformers import DynamicCache

        n = len(rows)
        if shared < MIN_SHARED_PREFIX:
            batch = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(self.device)
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            return self.model(**batch, position_ids=positions, logits_to_keep=1).logits[:, -1]

        def padded(seqs):
            t = self.tokenizer.pad({"input_ids": seqs}, padding=True, return_tensors="pt").to(self.device)
            return t["input_ids"], t["attention_mask"]

        dev = self.device
        group_of = torch.empty(n, dtype=torch.long)
        for g, (_, members) in enumerate(groups):
            group_of[members] = g
        group_of = group_of.to(dev)
        plen = [p for p, _ in groups]
        if max(plen) > 0:
            # segment 2: each group's own shared tokens, on top of the shared prefix
            ids, seg_mask = padded([rows[m[0]][shared : shared + p] for p, m in groups])
            cache = self._prefix_kv(rows[0][:shared], len(groups))
            mask = torch.cat([torch.ones((len(groups), shared), dtype=seg_mask.dtype, device=dev), seg_mask], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
            self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            row_cache = DynamicCache()
            for i, layer in enumerate(cache.layers):
                row_cache.update(layer.keys.index_select(0, group_of), layer.values.index_select(0, group_of), i)
            head_mask = mask.index_select(0, group_of)
        else:
            row_cache = self._prefix_kv(rows[0][:shared], n)
            head_mask = torch.ones((n, shared), dtype=torch.long, device=dev)
        # segment 3: every row's own tail
        tail_ids, tail_mask = padded([rows[i][shared + plen[int(group_of[i])] :] for i in range(n)])
        mask = torch.cat([head_mask.to(tail_mask.dtype), tail_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -tail_ids.shape[1] :]
        out = self.model(
            input_ids=tail_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=row_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _plan_batches(self, encoded: list[list[int]]):
        """Micro-batches for scoring: [(conversation indices, shared prefix length, groups)].

        Without the prefix cache: sorted by length, no sharing. With it: the prefix every
        conversation of the call shares is found once; conversations are then grouped by
        what they share beyond it (sorted by tokens, neighbours with >= MIN_GROUP_PREFIX
        common tokens form a group), and groups are packed into micro-batches in order of
        length, so padding stays small."""
        n = len(encoded)
        if not self.prefix_cache or n < 2:
            order = sorted(range(n), key=lambda i: len(encoded[i]))
            for start in range(0, n, self.max_batch_size):
                idx = order[start : start + self.max_batch_size]
                yield idx, 0, [(0, list(range(len(idx))))]
            return
        shared = _common_prefix(encoded)
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        order = sorted(range(n), key=lambda i: encoded[i][shared:])
        runs: list[tuple[int, list[int]]] = []  # (group prefix length, conversation indices)
        for i in order:
            if runs:
                p, members = runs[-1]
                last = encoded[members[-1]]
                common = _common_prefix([last, encoded[i]]) - shared
                common = min(common, p) if len(members) > 1 else common
                if common >= MIN_GROUP_PREFIX and len(members) < self.max_batch_size:
                    runs[-1] = (common, members + [i])
                    continue
            runs.append((0, [i]))
        runs = [(p if len(m) > 1 else 0, m) for p, m in runs]
        runs.sort(key=lambda r: max(len(encoded[i]) for i in r[1]))
        batch: list[int] = []
        groups: list[tuple[int, list[int]]] = []
        for p, members in runs:
            if batch and len(batch) + len(members) > self.max_batch_size:
                yield batch, shared, groups
                batch, groups = [], []
            groups.append((p, list(range(len(batch), len(batch) + len(members)))))
            batch += members
        if batch:
            yield batch, shared, groups

    # -- choice scoring ---------------------------------------------------------------
    def choice_logprobs(self, convs: list[list[Message]], choices: Sequence[str]) -> list[list[float]]:
        """Sum of token log-probs of each choice after each conversation, normalised.

        The conversation should end with an assistant prefix such as "The answer is: (",
        which is continued rather than closed. A choice's tokens are the tokenizer's own
        continuation of the prompt (``choice_continuations``). Conversations whose choices
        are one token each (the labeler's "A" / "B") are read from one forward pass per
        conversation; longer choices need one row per (conversation, choice).
        """
        import torch

        conts = [self.choice_continuations(c, choices) for c in convs]
        scores: list[list[float]] = [[0.0] * len(choices) for _ in convs]
        single = [i for i, (_, ids) in enumerate(conts) if all(len(x) == 1 for x in ids)]
        encoded = [conts[i][0] for i in single]
        for batch, shared, groups in self._plan_batches(encoded):
            with torch.inference_mode():
                logits = self._last_logits([encoded[j] for j in batch], shared, groups)
            targets = torch.tensor([[x[0] for x in conts[single[j]][1]] for j in batch], device=logits.device)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets)
            for row, j in enumerate(batch):
                scores[single[j]] = logp[row].tolist()

        in_single = set(single)
        rows = [  # (conv index, choice index, prompt ids, choice ids)
            (ci, k, prefix, ids)
            for ci, (prefix, choice_ids) in enumerate(conts)
            if ci not in in_single
            for k, ids in enumerate(choice_ids)
        ]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            seqs = [p + c for _, _, p, c in chunk]
            batch = self.tokenizer.pad({"input_ids": seqs}, padding=True, return_tensors="pt").to(self.device)
            # With left padding the positions must come from the mask, or every padded
            # row would be scored as if it started mid-sequence.
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            # Left padding puts every choice at the end of its row, so only the last
            # (longest choice + 1) positions need logits, not seq x vocab for the prompt.
            keep = max(len(ids) for *_, ids in chunk) + 1
            with torch.inference_mode():
                logits = self.model(**batch, position_ids=positions, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # [rows, keep, vocab]
            for row, (ci, k, _prefix, ids) in enumerate(chunk):
                targets = batch["input_ids"][row, -len(ids) :]
                # logits at position t predict token t+1: the choice's tokens are
                # predicted by the len(ids) positions before the last one
                lp = logp[row, keep - 1 - len(ids) : keep - 1].gather(-1, targets[:, None]).sum()
                scores[ci][k] = float(lp)
        return [normalise_logprobs(s) for s in scores]


MIN_SHARED_PREFIX = 32  # tokens; below this a separate prefill is not worth it
PREFIX_CACHE_ENTRIES = 4  # prefix KV caches kept per engine
MIN_GROUP_PREFIX = 16  # tokens a group of conversations must share beyond the common prefix


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token."""
    first = rows[0]
    n = min(len(r) for r in rows) - 1
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)
