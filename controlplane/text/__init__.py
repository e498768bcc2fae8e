"""Prompt text <-> token ids for the control plane, without torch.

`codec.py` picks the serving model's tokenizer (its own HF `tokenizer.json`, or the data plane's
byte tokenizer), `hf.py` wraps the `tokenizers` library, `chat.py` renders chat templates the
way Hugging Face does. Nothing here imports grpc, protos or the rest of the control plane: the
API layer converts wire messages to plain values first.
"""
