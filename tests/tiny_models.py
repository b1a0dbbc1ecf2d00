"""Tiny reward models and tokenizers built from configs (no hub): real architectures, random weights.

`initializer_range=0.2` makes the random RMs strongly interactive, so attribution tests are not trivially additive.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The movie was wonderful and the acting was superb.",
    "This film was terrible, boring and far too long.",
    "I loved every minute of it; the music is great!",
    "What a waste of two hours, awful plot and bad jokes.",
    "Café crème, señor Müller: naïve façade, déjà vu.",
    "日本語のテキストと中文文本 mixed with English words.",
    "Emoji time 😀👍🏽 and family 👨‍👩‍👧 at the end.",
    "It was amazing, I had a great time with friends!",
    "Tell me about your weekend. It was awful, everything went wrong.",
    "The weather is a constant reminder of the beautiful world around us.",
]


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 5, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def _bytelevel_bpe_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def build_encoder_rm(out: Path, *, layers: int = 2, hidden: int = 32, init: float = 0.2) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_wordpiece_tokenizer(),
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=256, num_labels=2, initializer_range=init,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=tok.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def build_causal_rm(out: Path, *, layers: int = 2, hidden: int = 32, init: float = 0.2) -> Path:
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe_tokenizer(), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, num_labels=1,
        initializer_range=init, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def build_policy_tokenizer(out: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe_tokenizer(vocab_size=280), eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    return Path(out)


# ChatML as SmolLM2-Instruct ships it (a default system turn when the conversation has none).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_llama_chat_rm(out: Path, *, layers: int = 2, hidden: int = 32, init: float = 0.2) -> Path:
    """A 1-logit Llama RM (RoPE, grouped-query attention) whose tokenizer has a ChatML chat template, laid out
    like SmolLM2's: eos = pad = <|im_end|>, unk = <|endoftext|>, no BOS added."""
    from tokenizers import AddedToken
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    backend = _bytelevel_bpe_tokenizer()
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=256, num_labels=1,
        initializer_range=init, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)
