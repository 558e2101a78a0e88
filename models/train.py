"""Train pagedserve's bundled model: a tiny Llama that writes Python, with its own tokenizer.

Everything runs offline on CPU. The corpus is the Python standard library's own source (the
interpreter running this script ships it), plus chat turns made from its documented functions
(user: the docstring's first line, assistant: the function), so the chat template is not an
empty promise. The steps:

1. corpus      read *.py files in sorted order (deterministic), up to --max-corpus-bytes;
2. tokenizer   byte-level BPE (`tokenizers`) with bos/eos/pad and chat special tokens,
               wrapped as a transformers fast tokenizer with a Jinja chat template;
3. model       `LlamaForCausalLM` with grouped-query attention and tied embeddings;
4. train       AdamW, linear warm-up then cosine decay, random windows of --seq-len tokens;
5. save        safetensors weights, tokenizer, generation config and TRAINING.{md,json}.

Example (the command that made models/tiny-py)::

    python models/train.py --out models/tiny-py --steps 1100 --time-budget-s 1320
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, END] + [f"<|{role}|>" for role in ROLES]

# Every turn is `<|role|>\n{content}<|end|>\n`; the prompt for a reply ends with `<|assistant|>\n`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT_SYSTEM_PROMPT = "You write Python."

# Directories of the stdlib that are not library code, or not code we want to imitate.
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def build_corpus(root: Path, max_bytes: int | None) -> list[str]:
    """Return the text of every *.py file under `root`, in sorted path order, up to `max_bytes`."""
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            break
        texts.append(text)
        total += len(text)
    if not texts:
        raise SystemExit(f"no readable *.py files under {root}")
    return texts


def chat_examples(texts: list[str], rng: random.Random, max_examples: int) -> list[list[dict[str, str]]]:
    """Conversations asking for a documented top-level function by its docstring's first line."""
    conversations: list[list[dict[str, str]]] = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            source = ast.get_source_segment(text, node) if doc else None
            if not doc or not source or len(source) > 1500:
                continue
            request = doc.strip().splitlines()[0]
            conversations.append(
                [
                    {"role": "system", "content": CHAT_SYSTEM_PROMPT},
                    {"role": "user", "content": f"Write a Python function: {request}"},
                    {"role": "assistant", "content": source},
                ]
            )
    rng.shuffle(conversations)
    return conversations[:max_examples]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any byte string round-trips); encoding prepends `<|bos|>`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_corpus(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], chats: list[list[dict[str, str]]]
) -> torch.Tensor:
    """One stream of token ids: `<|bos|> file <|eos|>` per file, then the rendered chats."""
    eos_id = tokenizer.eos_token_id
    ids: list[int] = []
    for encoding in tokenizer(texts)["input_ids"] if texts else []:
        ids.extend(encoding)
        ids.append(eos_id)
    for conversation in chats:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids.extend(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)  # [num_tokens]


def model_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A small Llama: GQA, RoPE, SwiGLU, tied input/output embeddings, float32."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len` tokens from the stream: [batch_size, seq_len]."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def learning_rate(progress: float, peak: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine down to `floor * peak`."""
    if progress < warmup:
        return peak * progress / warmup
    decay = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * decay)))


def train(model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Train in place; stop after --steps or --time-budget-s, whichever comes first.

    The schedule's progress is the larger of steps done and time spent, so a run cut short by
    the time budget still ends with a decayed learning rate rather than at the peak.
    """
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start = time.monotonic()
    smoothed = float("nan")
    step = 0
    while step < args.steps:
        elapsed = time.monotonic() - start
        if args.time_budget_s is not None and elapsed >= args.time_budget_s:
            print(f"time budget of {args.time_budget_s:.0f}s reached after {step} steps", flush=True)
            break
        progress = step / args.steps
        if args.time_budget_s is not None:
            progress = max(progress, elapsed / args.time_budget_s)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, args.lr)
        batch = sample_batch(stream, args.batch_size, args.seq_len, gen)  # [B, S]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  smoothed {smoothed:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.monotonic() - start:7.1f}s",
                flush=True,
            )
    return {
        "steps": step,
        "final_loss": loss.item() if step else float("nan"),
        "smoothed_loss": smoothed,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "train_wall_s": time.monotonic() - start,
    }


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, max_windows: int = 32
) -> float | None:
    """Mean loss over up to `max_windows` consecutive windows of `stream`; None if it is too short."""
    model.eval()
    windows = min(max_windows, len(stream) // seq_len)
    if windows < 1:
        return None
    batch = stream[: windows * seq_len].view(windows, seq_len)  # [windows, S]
    return sum(model(input_ids=row[None], labels=row[None]).loss.item() for row in batch) / windows


def save(
    out: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, record: dict[str, object]
) -> None:
    """Weights (transformers 5 always writes safetensors), tokenizer, generation config, record."""
    out.mkdir(parents=True, exist_ok=True)
    # Greedy by default; a chat reply ends at `<|end|>`, a plain completion at `<|eos|>`.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    # The chat template goes inline in tokenizer_config.json, where every loader looks for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Training record", ""] + [f"- **{key}**: `{value}`" for key, value in record.items()]
    (out / "TRAINING.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny-py")
    p.add_argument("--corpus-dir", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--max-corpus-bytes", type=int, default=None)
    p.add_argument("--max-chat-examples", type=int, default=3000)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=None, help="stop training after this long")
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(num_threads)

    texts = build_corpus(args.corpus_dir, args.max_corpus_bytes)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    # Hold out every 50th file (and the chats made from it) to report a loss on unseen text;
    # a corpus of fewer than 50 files (a test's) is all training data.
    held_out_ids = set(range(0, len(texts), 50)) if len(texts) >= 50 else set()
    train_texts = [t for i, t in enumerate(texts) if i not in held_out_ids]
    held_out_texts = [texts[i] for i in sorted(held_out_ids)]
    rng = random.Random(args.seed)
    chats = chat_examples(train_texts, rng, args.max_chat_examples)
    stream = encode_corpus(tokenizer, train_texts, chats)
    held_out = encode_corpus(tokenizer, held_out_texts, chat_examples(held_out_texts, rng, 100))
    if len(stream) <= args.seq_len:
        raise SystemExit(f"corpus is {len(stream)} tokens, need more than --seq-len {args.seq_len}")
    print(
        f"corpus: {len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} MB, {len(chats)} chats; "
        f"{len(stream)} train + {len(held_out)} held-out tokens; vocab {len(tokenizer)}; {num_threads} threads",
        flush=True,
    )

    model = LlamaForCausalLM(model_config(args, tokenizer))
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters", flush=True)
    result = train(model, stream, args)
    record: dict[str, object] = {
        **result,
        "held_out_loss": evaluate(model, held_out, args.seq_len),
        "parameters": num_params,
        "corpus_files": len(texts),
        "corpus_tokens": len(stream),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "peak_lr": args.lr,
        "threads": num_threads,
        "total_wall_s": time.monotonic() - started,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": shlex.join(["python", "models/train.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    save(args.out, model, tokenizer, record)
    print(json.dumps(record, indent=2), flush=True)


if __name__ == "__main__":
    main()
