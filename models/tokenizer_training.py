"""Train a small byte-level BPE tokenizer locally (no download) and wrap it for ``transformers``.

    tok = train_tokenizer(texts, vocab_size=512)       # a transformers PreTrainedTokenizerFast
    tok.save_pretrained(DIR)                            # tokenizer.json, config, chat template

Byte-level BPE (GPT-2 / Qwen2 / Llama-3 style: every byte is a token, so any text encodes) with
the ChatML special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (the end of
a turn and the EOS) and Qwen2's ChatML chat template. ``pretokenize``:

- ``"symbols"``: every non-space character, with the space before it, is its own pre-token
  (``" 1"``, ``"2"``, ``" +"``): merges never cross characters, so the tokenizer is canonical
  for text written symbol by symbol (``envs.tokenizer_bridge`` renders exactly that); a word
  ending a line (the chat template's ``user\n``, ``assistant\n``) is one pre-token;
- ``"words"``: the GPT-2 regex (runs of letters, of digits, of punctuation, each with its
  leading space): merges inside words and numbers, as in real checkpoints; the bridge's
  rendering then differs from ``encode`` on multi-digit numbers (it warns), and generated
  merged tokens still parse;
- ``"qwen2"``: Qwen2's regex (words with their leading space, ``'s`` contractions and
  punctuation runs as pieces, every digit alone): merges inside words, never across digits,
  so text in words is encoded word by word and the bridge's rendering of a task in words
  (``Env.phrases``) equals ``encode``;
- ``"metaspace"``: SentencePiece-style (Llama-2): spaces become ``▁``, a ``▁`` is prepended
  to the text, words split at spaces; the alphabet is the corpus's characters, not bytes.
"""
from __future__ import annotations

from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
chat_words = "system\nYou are a helpful assistant.\nuser\nassistant\n"
PRETOKENIZE = ("symbols", "words", "qwen2", "metaspace")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, pretokenize: str = "symbols",
                    chat_template: str | None = CHATML_TEMPLATE):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if pretokenize not in PRETOKENIZE:
        raise ValueError(f"pretokenize={pretokenize!r} is not one of {PRETOKENIZE}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
        raise ValueError(f"vocab_size must be an int >= 260 (256 bytes + specials), got "
                         f"{vocab_size!r}")
    texts = list(texts)
    tok = Tokenizer(models.BPE())
    if pretokenize == "symbols":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[A-Za-z]+\n| ?\S|\s"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pretokenize == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pretokenize == "words":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = (decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
                   if pretokenize == "metaspace" else decoders.ByteLevel())
    alphabet = (pre_tokenizers.ByteLevel.alphabet() if pretokenize != "metaspace"
                 else sorted(set("".join(texts)) | set(chat_words) | {"\u2581"}))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    # the chat template's own words ("system", "user", "assistant", ...), as often as the task
    # texts, so that they merge into whole tokens as in a real tokenizer
    if chat_template:
        texts += [chat_words] * max(1, len(texts) // 4)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=chat_template)
