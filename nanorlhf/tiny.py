"""Tiny models built locally in seconds (no hub): a Qwen2-architecture policy and a DeBERTa-v2 reward model.

They load through exactly the same code as the real defaults (vLLM, transformers, peft), so tests and
`--demo` exercise the real pipeline. Shapes follow what vLLM's CPU backend accepts (head size >= 32).
"""

import itertools
import json
import os
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train_tokenizer(texts, vocab_size, special_tokens):
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one (as Llama and Qwen do) so arithmetic tasks see place values.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _generated_tokenizer(vocab_size, special_tokens):
    """A byte-level BPE tokenizer with `vocab_size` entries and no merges: the 256 byte symbols plus generated
    two- and three-letter pieces. Text encodes byte by byte, and every id decodes: what a random model with a
    realistic vocabulary (32k, or Qwen's 151k) needs, without training a tokenizer on a large corpus."""
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    pieces = ("".join(p) for n in itertools.count(2) for p in itertools.product(string.ascii_lowercase, repeat=n))
    for piece in pieces:
        for token in (piece, "\u0120" + piece):  # with and without the byte-level space
            if len(vocab) == vocab_size:
                break
            vocab[token] = len(vocab)
        if len(vocab) == vocab_size:
            break
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer


def build_tiny_policy(out_dir, texts, hidden_size=128, num_layers=2, vocab_size=512, max_positions=1024, seed=0):
    """Save a random tiny Qwen2 causal LM and a ChatML byte-level BPE tokenizer (trained on `texts`) to out_dir."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _save_policy(out_dir, _train_tokenizer(texts, vocab_size, specials), hidden_size, num_layers,
                        max_positions, seed)


def build_policy_at_shape(out_dir, hidden_size=256, num_layers=4, vocab_size=32768, max_positions=2048, seed=0):
    """Save a random Qwen2 causal LM at a realistic shape (head size 64, a large vocabulary) and a generated
    ChatML tokenizer to out_dir: for checks of the user's configuration (bf16, long completions) on a CPU."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _save_policy(out_dir, _generated_tokenizer(vocab_size, specials), hidden_size, num_layers, max_positions,
                        seed)


def _save_policy(out_dir, backend, hidden_size, num_layers, max_positions, seed):
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_positions,
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,  # head size 64: vLLM's CPU attention needs >= 32
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_reward_model(out_dir, texts, hidden_size=64, num_layers=2, vocab_size=512, seed=0):
    """Save a random tiny DebertaV2ForSequenceClassification (one score) and its pair tokenizer to out_dir."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    backend = _train_tokenizer(texts, vocab_size, specials)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
        model_max_length=512,
    )
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    DebertaV2ForSequenceClassification(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "nanorlhf_tiny.json"), "w") as f:
        json.dump({"kind": "reward_model", "hidden_size": hidden_size}, f)
    return out_dir
