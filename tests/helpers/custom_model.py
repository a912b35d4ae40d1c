"""Builds, in seconds, a model folder that needs its own code, as YAYI2's does.

config.json names a configuration class and a causal-LM class of the folder's own
(``auto_map``), each in a Python file beside random tiny weights, and tokenizer_config.json
names a slow SentencePiece tokenizer class of its own, over a SentencePiece model trained
here on the repo's own docs (plus a little Chinese text) with the ``sentencepiece`` package:
a small vocabulary, byte fallback and digits split one by one, as YAYI2's 81,920-token
vocabulary does.  The classes subclass Llama's under new names and a model type transformers
does not know, so nothing loads without ``trust_remote_code``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SEED = 0
VOCAB_SIZE = 600
CUSTOM_FILES = ("configuration_yayi.py", "modeling_yayi.py", "tokenization_yayi.py")
# Chinese lines so that some pieces are whole characters and the rest fall back to bytes.
CHINESE = (
    "雅意是一个中文大语言模型。它可以回答问题、写文章和翻译。\n"
    "模型的权重保存在文件夹里，分词器把文本切成词元。\n"
    "今天的天气很好，我们去公园散步吧。数字一二三四五六七八九十。\n"
)

CONFIGURATION = '''"""The custom model's configuration: Llama's, under a model type of its own."""

from transformers import LlamaConfig


class YayiConfig(LlamaConfig):
    model_type = "yayi"
'''

MODELING = '''"""The custom model's base model and causal LM: Llama's, under names of their own."""

from transformers import LlamaForCausalLM, LlamaModel

from .configuration_yayi import YayiConfig


class YayiModel(LlamaModel):
    config_class = YayiConfig


class YayiForCausalLM(LlamaForCausalLM):
    config_class = YayiConfig
'''

TOKENIZATION = '''"""The custom model's slow SentencePiece tokenizer, written as YAYI2's is."""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class YayiTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True, **kwargs):
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        ids = bos + token_ids_0
        return ids if token_ids_1 is None else ids + bos + token_ids_1

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
'''


def training_text() -> str:
    return "\n".join(path.read_text() for path in sorted((REPO / "docs").glob("*.md"))) + CHINESE * 20


def train_sentencepiece(out: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())


def build_custom_model(out: Path, auto_model: bool = True) -> Path:
    """The custom-code folder at ``out``; ``auto_model`` False leaves AutoModel out of auto_map, as YAYI2's own
    config.json does."""
    import torch
    from transformers import LlamaForCausalLM

    from engines.models import tiny_config

    out.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(out)
    torch.manual_seed(SEED)
    config = tiny_config("llama", VOCAB_SIZE)  # the tiny models' shape, which vLLM's CPU kernels take
    LlamaForCausalLM(config).save_pretrained(out)
    settings = json.loads((out / "config.json").read_text())
    settings.update(
        model_type="yayi",
        architectures=["YayiForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_yayi.YayiConfig",
            # vLLM's Transformers backend builds the base model through AutoModel.
            "AutoModel": "modeling_yayi.YayiModel",
            "AutoModelForCausalLM": "modeling_yayi.YayiForCausalLM",
        },
    )
    if not auto_model:
        del settings["auto_map"]["AutoModel"]
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "YayiTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_yayi.YayiTokenizer", None]},
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 1024,
            },
            indent=2,
        )
    )
    for name, source in zip(CUSTOM_FILES, (CONFIGURATION, MODELING, TOKENIZATION), strict=True):
        (out / name).write_text(source)
    return out


@dataclass(frozen=True)
class Reference:
    """The custom folder with transformers' own greedy continuation of ``PROMPT`` on its own classes, and the
    extra end-of-sequence id its generation_config.json lists: the token at ``stop_at`` of that continuation."""

    folder: Path
    prompt_ids: list[int]
    greedy: list[int]  # NEW_TOKENS tokens, its end-of-sequence ids ignored
    stop_at: int
    tokenizer: Any


PROMPT = "雅意模型的分词器把数字 2024 切成"
NEW_TOKENS = 12


def first_new(tokens: list[int]) -> int:
    """The last position whose token appears there first: generation that stops at that token ends exactly
    there (random weights may repeat one token: then position 0)."""
    return max(k for k in range(len(tokens)) if tokens[k] not in tokens[:k])


def greedy_reference(folder: Path) -> tuple[list[int], list[int], Any]:
    """The prompt's ids and transformers' own greedy continuation of them, on the folder's own classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert type(tokenizer).__name__ == "YayiTokenizer" and type(model).__name__ == "YayiForCausalLM"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist(), tokenizer


def build_with_reference(out: Path) -> Reference:
    """The custom folder whose generation_config.json lists one more end-of-sequence id, a token its greedy
    continuation of ``PROMPT`` reaches: one folder for the custom-code and the stop-token tests, so each
    engine's server starts once for both."""
    build_custom_model(out)
    prompt_ids, greedy, tokenizer = greedy_reference(out)
    stop_at = first_new(greedy)
    settings = json.loads((out / "generation_config.json").read_text())
    settings["eos_token_id"] = [2, greedy[stop_at]]
    (out / "generation_config.json").write_text(json.dumps(settings))
    return Reference(out, prompt_ids, greedy, stop_at, tokenizer)


if __name__ == "__main__":
    import sys

    print(build_custom_model(Path(sys.argv[1])))
