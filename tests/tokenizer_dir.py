"""A real HF tokenizer with a chat template, built offline: a byte-level BPE trained here.

`write_chat_tokenizer(directory)` trains a 320-token byte-level BPE (the vocabulary size of the
`tiny` preset, so the model's every output id decodes) with `tokenizers`, and saves it with
`transformers.PreTrainedTokenizerFast.save_pretrained` into `directory` (tokenizer.json,
tokenizer_config.json and chat_template.jinja, as transformers writes them), ready to sit in an
exported model directory.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 320  # == the tiny preset's vocab_size
SPECIAL_TOKENS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
# A Zephyr-style template: a default system prompt, alternation enforced with raise_exception,
# block tags on their own lines (trim_blocks / lstrip_blocks decide the whitespace).
CHAT_TEMPLATE = """\
{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set turns = messages[1:] %}
{% else %}
    {% set system = 'You are a helpful assistant.' %}
    {% set turns = messages %}
{% endif %}
<|system|>
{{ system }}{{ eos_token }}
{% for message in turns %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world, hello there! "
    "Scheduling short requests first keeps their queueing delay small. "
    "Préemption, colocation et désagrégation. Ünïcödé wörds."
)


def write_chat_tokenizer(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Train the tokenizer and save it (with `chat_template` unless None) into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_CORPUS] * 20, trainer)
    assert backend.get_vocab_size() == VOCAB_SIZE, backend.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", chat_template=chat_template
    )
    fast.save_pretrained(directory)
    return directory
