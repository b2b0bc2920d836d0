"""A saved tokenizer comes back as it was saved: under transformers 5, AutoTokenizer picks the class of the model's
type, so a Qwen2 directory saved with a WordLevel tokenizer reloads as Qwen2Tokenizer, which reads 'what is 3 plus 4'
as ['3', '4']. load_tokenizer checks it against the directory's tokenizer.json on the data's texts, warns naming both
classes, and loads the saved class."""

from __future__ import annotations

import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers

from hybrid_engine.commands import model_dirs
from hybrid_engine.commands.model_dirs import load_tokenizer
from hybrid_engine.rlhf.demo import DEMO_DIR

WORDS = ["[PAD]", "[UNK]", "what", "is", "plus", "3", "4", "7", "<|im_end|>"]
TEXT = "what is 3 plus 4"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny Qwen2 saved with its own WordLevel tokenizer, as a user builds one for a toy task."""
    directory = tmp_path_factory.mktemp("qwen-wordlevel")
    word_level = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]",
                                                     unk_token="[UNK]", eos_token="<|im_end|>")
    config = transformers.Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_the_premise_autotokenizer_changes_the_saved_tokenizer(qwen_dir):
    auto = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))
    assert type(auto).__name__ == "Qwen2Tokenizer" and auto.tokenize(TEXT) != TEXT.split()


def test_a_tokenizer_reloaded_as_another_class_is_loaded_as_saved_with_a_warning(qwen_dir, capsys):
    tokenizer = load_tokenizer(qwen_dir, flag="--model", sample=[TEXT])
    assert tokenizer.tokenize(TEXT) == TEXT.split()
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == [2, 3, 5, 4, 6]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model {qwen_dir}" in err
    assert "Qwen2Tokenizer" in err and "WordLevel" in err and "using the saved class" in err


def test_the_data_sample_is_checked(qwen_dir, monkeypatch, capsys):
    monkeypatch.setattr(model_dirs, "SAMPLE", ())
    assert type(load_tokenizer(qwen_dir, sample=[])).__name__ == "Qwen2Tokenizer"  # nothing to check it on
    assert capsys.readouterr().err == ""
    assert load_tokenizer(qwen_dir, sample=["7", TEXT]).tokenize(TEXT) == TEXT.split()
    assert repr(TEXT) in capsys.readouterr().err  # the first text split differently is named


def test_a_tokenizer_that_round_trips_is_left_alone(capsys):
    tokenizer = load_tokenizer(DEMO_DIR, sample=["tell me about a fox"])
    assert type(tokenizer) is type(transformers.AutoTokenizer.from_pretrained(str(DEMO_DIR)))
    assert capsys.readouterr().err == ""
