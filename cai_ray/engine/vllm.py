"""vLLM backend: ``vllm.LLM`` inside the engine actor (GPU, tensor parallel from config).

vLLM is an optional extra (``pip install 'cai-ray[vllm]'``) and is imported only here, when
this backend is chosen. The Ray Data stage gives the actor ``tensor_parallel_size`` GPUs.
"""

from __future__ import annotations

from typing import Sequence

from cai_ray.engine import ChatTemplate, EngineUnavailable, Message, Sampling, normalise_logprobs
from cai_ray.models import resolve_model


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(
            "engine backend 'vllm' needs vLLM, which is not installed: "
            "pip install 'cai-ray[vllm]' on a machine with NVIDIA GPUs, "
            "or use engine.backend=hf"
        ) from e
    return vllm


class VLLMEngine(ChatTemplate):
    def __init__(
        self,
        model: str,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        **_cpu_only,  # threads / max_batch_size: vLLM schedules its own batches
    ):
        vllm = _import_vllm()
        path = resolve_model(model)
        self.model_name = model
        self.model_path = path
        self.llm = vllm.LLM(
            model=path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.tokens_generated = 0

    def generate(self, convs: list[list[Message]], params: Sampling) -> list[str]:
        from vllm import SamplingParams

        sp = SamplingParams(
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            seed=params.seed,
        )
        prompts = [{"prompt_token_ids": self._encode(c)} for c in convs]
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        texts = []
        for o in outs:
            self.tokens_generated += len(o.outputs[0].token_ids)
            texts.append(o.outputs[0].text.strip())
        return texts

    def choice_logprobs(
        self, convs: list[list[Message]], choices: Sequence[str]
    ) -> list[list[float]]:
        """Exact choice log-probs from vLLM's prompt logprobs of prefix + choice."""
        from vllm import SamplingParams

        choice_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        prompts, spans = [], []
        for conv in convs:
            prefix = self._encode(conv)
            for ids in choice_ids:
                prompts.append({"prompt_token_ids": prefix + ids})
                spans.append((len(prefix), len(prefix) + len(ids), ids))
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        flat = []
        for o, (begin, end, ids) in zip(outs, spans):
            flat.append(sum(o.prompt_logprobs[t][tok].logprob for t, tok in zip(range(begin, end), ids)))
        k = len(choices)
        return [normalise_logprobs(flat[i * k : (i + 1) * k]) for i in range(len(convs))]
