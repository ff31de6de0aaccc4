"""A tiny Llama with a SentencePiece-style tokenizer (Metaspace pre-tokenizer and decoder, a
Unigram vocabulary), built in a fraction of a second: the shape of Llama-2, Mistral and
Gemma tokenizers, where "A" alone is ``▁A`` but "The answer is: (" is continued by a bare
``A``. SmolLM2's byte-level BPE has no such difference, so only this model can catch a
labeler that scores the wrong token. Shape: tiny-random-wide's (head_dim 64, for vLLM's CPU
attention)."""

from pathlib import Path

from cai_ray.models import TINY_WIDE_CONFIG

SPECIALS = ["<unk>", "<s>", "</s>"]
# Words of the prompts the tests use; everything else falls back to single characters.
SENTENCES = [
    "Which response is more helpful, honest and harmless?",
    "Tell me about item one. Tell me about item two.",
    "Options: (A) a kind answer (B) a rude answer",
    "The answer is: (A)",
    "The answer is: (B)",
]
# A Llama-2 style template (no generation prompt: the assistant turn follows [/INST]).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% else %}<<SYS>> {{ m['content'] }} <</SYS>>{% endif %}{% endfor %}"
)


def vocabulary(merged: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """(piece, log-probability): specials, every printable character with and without the
    word marker ``▁``, the sentences' words, and ``merged`` pieces that beat any split
    (e.g. ``▁(A``: a tokenizer that merges the answer prefix's "(" with a choice)."""
    chars = [chr(c) for c in range(33, 127)]
    words = {"▁" + w for s in SENTENCES for w in s.split() if "(" not in w}
    pieces = [(p, 0.0) for p in SPECIALS] + [("▁", -8.0)]
    pieces += [(c, -6.0) for c in chars] + [("▁" + c, -6.0) for c in chars]
    pieces += [(w, -2.0) for w in sorted(words) if w not in {"▁" + c for c in chars}]
    return pieces + [(m, -1.0) for m in merged]


def build(out: Path, merged: tuple[str, ...] = (), seed: int = 0) -> str:
    """A random-weight Llama and its SentencePiece-style tokenizer, saved as a HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = vocabulary(merged)
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(SPECIALS)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, **TINY_WIDE_CONFIG)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return str(out)
