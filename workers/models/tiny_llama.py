"""`lorafleet/tiny-llama`: a few-million-parameter Llama built here, deterministically.

No model hub is reachable, so the default base model is made from the shipped corpus
(workers/data/corpus/): a byte-level BPE tokenizer trained with `tokenizers`, a chat template,
and a short causal-LM pre-training so fine-tunes start from a real language model.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

MODEL_ID = "lorafleet/tiny-llama"
CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Assistant turns end with <|end|>; generation stops on it or on </s> (completion / text data).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ARCH = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=True)
PRETRAIN = dict(steps=150, batch_size=16, block=128, lr=3e-3, warmup=20, seed=0)


def load_corpus() -> tuple[list[str], list[list[dict]]]:
    prose = [json.loads(line)["text"] for line in (CORPUS_DIR / "prose.jsonl").read_text().splitlines()]
    chats = [json.loads(line)["messages"] for line in (CORPUS_DIR / "chat.jsonl").read_text().splitlines()]
    return prose, chats


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token=None, additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        model_max_length=ARCH["max_position_embeddings"], padding_side="right",
    )


def _pretrain_stream(tokenizer, prose: list[str], chats: list[list[dict]]) -> list[int]:
    """All documents as one token stream: <s> doc </s> for prose, the chat template for chats."""
    rng = random.Random(PRETRAIN["seed"])
    docs = [("text", p) for p in prose] + [("chat", c) for c in chats]
    rng.shuffle(docs)
    stream: list[int] = []
    for kind, doc in docs:
        if kind == "text":
            stream += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"],
                       tokenizer.eos_token_id]
        else:
            stream += tokenizer.apply_chat_template(doc, tokenize=True, return_dict=True)["input_ids"]
    return stream


def build_tiny_llama(out_dir: Path | str) -> Path:
    """Write the HF directory (config, model.safetensors, tokenizer files) to ``out_dir``.

    Same code, same corpus, same torch build → the same bytes (fixed seeds, one thread order).
    The directory appears atomically, so a concurrent reader never sees half a model.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    prose, chats = load_corpus()
    tokenizer = train_tokenizer(prose + [m["content"] for chat in chats for m in chat])
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **ARCH)
    torch.manual_seed(PRETRAIN["seed"])
    model = LlamaForCausalLM(config)
    stream = torch.tensor(_pretrain_stream(tokenizer, prose, chats), dtype=torch.long)
    _pretrain(model, stream)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _pretrain(model, stream) -> None:
    import torch

    p = PRETRAIN
    gen = torch.Generator().manual_seed(p["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / p["warmup"]) * max(0.05, 1 - s / p["steps"]))
    n_blocks = (len(stream) - 1) // p["block"]
    blocks = stream[: n_blocks * p["block"]].view(n_blocks, p["block"])
    model.train()
    for _ in range(p["steps"]):
        batch = blocks[torch.randint(n_blocks, (p["batch_size"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama")))
