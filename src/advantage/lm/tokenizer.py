"""The built-in character-level tokenizer, and loading any tokenizer from a local directory.

One character is one token, so a task's text and its tokens are the same thing to read: "12+34=46\n" is nine
tokens, and a completion of length L is L actions of the language-model MDP (docs/math.md §5: state = token prefix,
action = next token). The vocabulary is four special tokens followed by every printable ASCII character
(codes 32..126: letters, digits, punctuation including '+', '-', '*', '=', and the space) plus newline and tab:
101 tokens. Other characters map to <unk>.

No beginning-of-sequence token is added automatically (as with Qwen2): `encode(text)` is exactly the characters
of `text`. Chat turns are rendered as plain text by `CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advantage.errors import UsageError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
CHARACTERS: tuple[str, ...] = tuple(chr(code) for code in range(32, 127)) + ("\n", "\t")

# Role markers are plain text, so the template needs no extra tokens. An assistant turn ends with <eos>: a model
# trained on rendered conversations learns to stop, and generation stops on the same token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# What transformers 5.x writes as `tokenizer_class` for a saved PreTrainedTokenizerFast (4.x wrote the old name).
_FAST_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def build_char_tokenizer():
    """The character-level tokenizer: a `transformers.PreTrainedTokenizerFast` of 101 tokens.

    Ids 0..3 are <pad>, <unk>, <bos>, <eos>; then one id per character of `CHARACTERS`. Padding is on the right by
    default (callers that batch prompts for generation pad on the left explicitly).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK))
    # Every character (newline included, hence [\s\S] rather than '.') becomes its own pre-token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with nothing in between (WordLevel's default joins with spaces)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                        eos_token=EOS, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tokenizer_class_name(directory: Path) -> str | None:
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("tokenizer_class")
    except (OSError, ValueError) as error:
        raise UsageError(f"{config_file}: not a readable tokenizer config ({error})") from None


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved in Hugging Face format in the local directory `path`, offline.

    A saved `PreTrainedTokenizerFast` (such as `build_char_tokenizer()`) is loaded as that class directly:
    transformers 5.x's AutoTokenizer would otherwise pick the tokenizer class of the model type in config.json
    (Qwen2Tokenizer for a Qwen2 model folder), whose pre-tokenizer silently drops spaces and newlines.

    Raises:
        UsageError: `path` is not a directory or holds no loadable tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(path)
    if not directory.is_dir():
        raise UsageError(f"tokenizer directory {str(path)!r} does not exist or is not a directory")
    if not any(directory.glob("tokenizer*")):
        raise UsageError(f"no tokenizer in {str(path)!r} (no tokenizer.json or tokenizer_config.json)")
    loader = PreTrainedTokenizerFast if _tokenizer_class_name(directory) in _FAST_TOKENIZER_CLASSES else AutoTokenizer
    try:
        return loader.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UsageError(f"no loadable tokenizer in {str(path)!r}: {reason}") from None


# ------------------------------------------------------------------------------------------------- end of an answer


def end_token_ids(tokenizer, generation_config: Any = None) -> tuple[int, ...]:
    """Every token id that ends a completion: the tokenizer's EOS first, then each id of the model's
    `generation_config.eos_token_id` (one id, or a list as for Llama 3's <|end_of_text|>, <|eom_id|>, <|eot_id|>).

    The first id is the one appended to a completion that has none (`end_completion`); generation stops on any of
    them (`generation.generate`).

    Raises:
        UsageError: neither the tokenizer nor the generation config names an end token.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if configured is not None:
        for token in ([configured] if isinstance(configured, int) else configured):
            if int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise UsageError("the tokenizer has no eos token and the model's generation config names none: a "
                         "completion could never end")
    return tuple(ids)


def end_completion(completion_ids: Sequence[int], end_ids: Sequence[int]) -> list[int]:
    """A completion's token ids ending with exactly one end token: those after its last end token dropped, or
    `end_ids[0]` appended if it has none.

    A chat template closes an assistant turn with its end-of-turn token and often a newline after it (ChatML:
    "42<|im_end|>\\n"). Generation stops at the end token, so the policy never writes what follows it: training on
    it, or appending another EOS after it, would teach tokens that sampling never produces and would make a reward
    model score a different position (the appended EOS) from the one it is read at on sampled answers (the end
    token). So the answer is cut right after its end token, and training, sampling and scoring see the same ids.
    """
    ends = set(end_ids)
    for position in range(len(completion_ids) - 1, -1, -1):
        if completion_ids[position] in ends:
            return list(completion_ids[:position + 1])
    return [*completion_ids, end_ids[0]]


def strip_end_tokens(completion_ids: Sequence[int], end_ids: Sequence[int]) -> list[int]:
    """The completion's ids without its end tokens (the text of the answer, for decoding)."""
    ends = set(end_ids)
    return [token for token in completion_ids if token not in ends]
