"""Write the built-in demo task: sft.jsonl, reward.jsonl, ppo.jsonl and a WordLevel tokenizer.

    python scripts/make_demo_data.py                       # (re)write hybrid_engine/data/demo/
    python scripts/make_demo_data.py --out /tmp/demo       # somewhere else, e.g. to compare

The output is byte for byte the same on every run with the same seed (one random.Random drives
every choice; files are written with fixed key order and "\\n" line ends). The task and its hidden
rule are described in hybrid_engine/rlhf/demo.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from statistics import mean

from hybrid_engine.rlhf.demo import DEMO_DIR, NEGATIVE, POSITIVE, rule_score

SFT_ROWS, REWARD_ROWS, PPO_ROWS = 3000, 3000, 1200
SFT_POSITIVE, PAIR_POSITIVE = 0.35, 0.5  # chance that a sentiment slot is filled with a positive word
MIN_WORDS, MAX_WORDS = 8, 16
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<assistant> {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)

# category: (topics, prompt templates, the response's subject, aspects the response may mention)
CATEGORIES = {
    "weather": (
        "paris london tokyo rome berlin madrid cairo sydney toronto dublin oslo vienna prague lisbon athens "
        "boston chicago seattle denver miami",
        ("describe the weather in {t}", "how is the weather in {t}", "tell me about the weather in {t}"),
        "the weather in {t}", "sky wind air morning evening rain"),
    "animal": (
        "dog cat horse rabbit parrot turtle goat sheep duck owl fox bear whale dolphin tiger lion mouse frog "
        "pony puppy",
        ("tell me about a {t}", "describe a {t}", "what is a {t} like"),
        "the {t}", "fur voice eyes mood tail home"),
    "food": (
        "pizza soup bread pasta salad cake rice cheese coffee tea curry noodles pie chocolate apples tacos "
        "sushi pancakes cookies stew",
        ("what do you think of the {t}", "describe the {t}", "give me a review of the {t}"),
        "the {t}", "taste smell texture color crust sauce"),
    "place": (
        "park beach museum library market garden station harbor castle village forest river lake mountain "
        "cafe school hotel bridge stadium theater",
        ("tell me about the {t}", "describe your visit to the {t}", "how was your day at the {t}"),
        "the {t}", "view crowd path music staff light"),
    "object": (
        "chair lamp phone bicycle camera guitar jacket clock backpack kettle sofa piano umbrella laptop watch "
        "mirror blanket boots table radio",
        ("write a review of the {t}", "describe the {t}", "what do you think of the {t}"),
        "the {t}", "design color handle sound finish price"),
}
PREFIXES = ("", "please ", "can you ", "i want you to ")  # before a request, not before a question
SUFFIXES = ("", " today", " briefly", " in a few words")
OPENINGS = ("{s} is {a}", "{s} is {a} and {a}", "i think {s} is {a}", "{s} seems {a}", "honestly {s} was {a}")
EXTRAS = ("the {asp} was {a}", "the {asp} felt {a} and {a}", "it made me feel {a}", "everyone said it was {a}",
          "overall it was {a}", "my friend found it {a}", "we had a {a} time")
CONNECTORS = ("and", "but", "so")


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (prompt, category, topic) of the task, in a fixed order."""
    out = []
    for category, (topics, templates, _, _) in CATEGORIES.items():
        for topic in topics.split():
            for template in templates:
                question = template.split()[0] in ("how", "what")
                for prefix in PREFIXES[:1] if question else PREFIXES:
                    for suffix in SUFFIXES:
                        out.append((prefix + template.format(t=topic) + suffix, category, topic))
    return out


def fill(pattern: str, rng: random.Random, p_positive: float, **slots: str) -> str:
    """`pattern` with each {a} replaced by a sentiment word, positive with chance p_positive."""
    parts = pattern.format(**slots, a="\0").split("\0")
    words = [rng.choice(POSITIVE if rng.random() < p_positive else NEGATIVE) for _ in parts[1:]]
    return parts[0] + "".join(w + rest for w, rest in zip(words, parts[1:]))


def response(category: str, topic: str, rng: random.Random, p_positive: float) -> str:
    """One 8-16 word response about `topic`, two to five of its words from the sentiment lists."""
    _, _, subject, aspects = CATEGORIES[category]
    while True:
        clauses = [fill(rng.choice(OPENINGS), rng, p_positive, s=subject.format(t=topic))]
        for extra in rng.sample(EXTRAS, rng.choice((1, 2))):
            clauses.append(rng.choice(CONNECTORS) + " " + fill(extra, rng, p_positive, asp=rng.choice(aspects.split())))
        text = " ".join(clauses)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text


def make_rows(seed: int) -> dict[str, list[dict[str, str]]]:
    """The three files' rows; one random.Random(seed) makes every choice, in this fixed order."""
    rng = random.Random(seed)
    prompts = all_prompts()
    sft = []
    for _ in range(SFT_ROWS):
        prompt, category, topic = rng.choice(prompts)
        sft.append({"prompt": prompt, "response": response(category, topic, rng, SFT_POSITIVE)})
    reward = []
    for _ in range(REWARD_ROWS):
        prompt, category, topic = rng.choice(prompts)
        a = response(category, topic, rng, PAIR_POSITIVE)
        b = response(category, topic, rng, PAIR_POSITIVE)
        while rule_score(prompt, b) == rule_score(prompt, a):
            b = response(category, topic, rng, PAIR_POSITIVE)
        chosen, rejected = (a, b) if rule_score(prompt, a) > rule_score(prompt, b) else (b, a)
        reward.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    ppo = [{"prompt": prompt} for prompt, _, _ in rng.sample(prompts, PPO_ROWS)]
    return {"sft": sft, "reward": reward, "ppo": ppo}


def vocabulary() -> list[str]:
    """Every word the task can use, sorted: the topics, the templates' words and the sentiment lists."""
    words = set(POSITIVE) | set(NEGATIVE) | set(CONNECTORS)
    for topics, templates, subject, aspects in CATEGORIES.values():
        words |= set(topics.split()) | set(aspects.split()) | set(subject.split())
        words |= {w for t in templates for w in t.split()}
    words |= {w for text in PREFIXES + SUFFIXES + OPENINGS + EXTRAS for w in text.split()}
    return sorted(w for w in words if not w.startswith("{"))


def build_tokenizer(vocab: list[str]):
    """A WordLevel tokenizer over `vocab`: lower-cased, split on white space, special tokens first."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    ids = {token: i for i, token in enumerate(SPECIAL + tuple(vocab))}
    tokenizer = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tokenizer


def tokenizer_config() -> dict:
    """tokenizer_config.json: the class, the special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "padding_side": "right",
    }


def write(out: Path, seed: int) -> dict[str, list[dict[str, str]]]:
    """Write the demo into `out` and return its rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(seed)
    for name, file_rows in rows.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in file_rows)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8", newline="\n")
    vocab = vocabulary()
    tokenizer = build_tokenizer(vocab)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8", newline="\n")
    config = tokenizer_config()
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")
    known = set(vocab)
    unknown = {w for r in rows.values() for row in r for text in row.values() for w in text.split()} - known
    if unknown:
        raise RuntimeError(f"words missing from the vocabulary: {sorted(unknown)}")
    return rows


def summary(rows: dict[str, list[dict[str, str]]]) -> str:
    """Sizes and mean rule scores, for the log."""
    sft = mean(rule_score(r["prompt"], r["response"]) for r in rows["sft"])
    chosen = mean(rule_score(r["prompt"], r["chosen"]) for r in rows["reward"])
    rejected = mean(rule_score(r["prompt"], r["rejected"]) for r in rows["reward"])
    return (f"sft {len(rows['sft'])} rows (mean rule score {sft:.3f}), reward {len(rows['reward'])} pairs "
            f"(chosen {chosen:.3f}, rejected {rejected:.3f}), ppo {len(rows['ppo'])} prompts, "
            f"vocabulary {len(vocabulary()) + len(SPECIAL)} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder to write (default: the package's)")
    parser.add_argument("--seed", type=int, default=0, help="the one seed of every random choice")
    args = parser.parse_args(argv)
    rows = write(args.out, args.seed)
    print(f"wrote {args.out}: {summary(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
