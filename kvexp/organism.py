"""The model organisms (issues 8, 18): 2-layer models trained to recall what their context holds, shipped.

With no Hub access every model kvexp can load has random weights, and accuracy deltas between quantization
settings mean nothing. These models are trained on multi-query associative recall (MQAR, Arora et al. 2023,
arXiv:2312.04927): records `k07: 17 04 88 .` hidden among filler words, then `?` and some of the records'
keys again, each followed by its value. One record in filler is the passkey test (Mohtashami & Jaggi 2023).
Answering reads the record back through attention, so at decode every answer token after the first reads
the (quantized) KV cache (and the first too with eval.kv_faithful=on); values are three words.

Two organisms, each a recipe (RECIPES) and weights shipped as package data (kvexp/data/<name>/, with the
recipe hash that made them), so every machine scores the same model: training is deterministic per kind of
machine, not across them. `builtin:organism` is trained on documents up to 256 tokens (on a 2-core CPU, 80 to
140 s); `builtin:organism-long` up to 4096 (on a GPU: `python -m kvexp.organism --long --device cuda OUT`).
`python -m kvexp.organism OUT` retrains on request; a builtin whose shipped weights are of another recipe
(the recipe was edited and not retrained) is trained on first use and cached, as before issue 18.

The task is solved by an induction circuit (Olsson et al. 2022): a previous-token head in layer 0 and a
head in layer 1 that finds where the current word occurred before and copies the word after it. Every value
word is unique within a document, so that circuit alone answers. It forms abruptly after a plateau whose
length varies with the seed; short documents first, copy documents and a scaffold for the previous-token
head (`_previous_token_loss`) make it form within the step budget (seeds 0-3 all recall >= 94% at 256 tokens).

The vocabulary is the task's own: one token per word (a WordLevel tokenizer), so the documents are exact
in tokens and text alike. Everything here but `train` is plain Python: kvexp.checkpoint imports this module.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KEYS = tuple(f"k{i:02d}:" for i in range(32))
VALUES = tuple(f"{i:02d}" for i in range(96))
FILLER = ("the", "a", "river", "village", "farmer", "train", "garden", "market", "bridge", "window", "road",
          "engine", "old", "quiet", "bright", "small", "green", "heavy", "warm", "busy", "calm", "early",
          "crossed", "watched", "opened", "passed", "near", "after", "before", "in", "and", "then")
ASK, END = "?", "."
SPECIALS = ("<s>", "</s>", "<unk>", "<pad>")
VALUE_LEN = 3  # words per value
RECORD = 1 + VALUE_LEN + 1  # key, value words, END
MAX_QUERIES = 16

# Heads of 16 dims: 166 tokens share each head's space, so keys and values sit close together and the error a
# quantized cache adds can flip a match, as in a real model's crowded heads. With heads of 32 dims the model
# shrugged off int4 KV (measured: per-tensor int4 within 1.5 points of fp16); at 16 it costs about ten.
# Hidden and intermediate are multiples of 128: AWQ's groups. GQA, 2 query heads per KV head, as in Llama 3.
ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)
# (document length in tokens, steps): short documents first, where the induction circuit forms fastest.
PHASES = ((24, 300), (32, 300), (64, 300), (128, 200), (256, 200))
TRAIN = dict(seed=0, threads=2, lr=2e-3, min_lr=0.1, warmup=50, weight_decay=0.01, clip=1.0, copy_frac=0.3,
             passkey_frac=0.1, aux_steps=300, aux_weight=0.1, tokens_per_step=2048, max_batch=32, phases=PHASES)
TRAIN_LEN = PHASES[-1][0]  # the longest documents trained on: beyond it is out of the training range
RECIPE = dict(arch=ARCH, train=TRAIN, vocab=[*SPECIALS, ASK, END, *KEYS, *VALUES, *FILLER], value_len=VALUE_LEN)

# The long-context organism: the same task and model, trained on documents up to 4096 tokens. RoPE's base is
# Llama 3's: with base 10000 only one of a 16-dim head's 8 frequency pairs turns less than a radian over 4096
# positions, too little room to match a key's content that far back. Training takes under two minutes on one
# H200 and far longer on a 2-core CPU (docs/benchmarks.md).
LONG_ARCH = dict(ARCH, max_position_embeddings=8192, rope_theta=500000.0)
LONG_PHASES = PHASES + ((512, 200), (1024, 200), (2048, 300), (4096, 400))
LONG_TRAIN = dict(TRAIN, tokens_per_step=16384, phases=LONG_PHASES)
LONG_RECIPE = dict(RECIPE, arch=LONG_ARCH, train=LONG_TRAIN)
RECIPES = {"organism": RECIPE, "organism-long": LONG_RECIPE}  # builtin name -> recipe
VERSION = 1  # bump when anything not in RECIPE changes what is trained (the data generators, the loop)


def recipe_hash(recipe: dict = RECIPE) -> str:
    blob = json.dumps({"version": VERSION, **recipe}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


MODEL_PATH = "builtin:organism"
LONG_PATH = "builtin:organism-long"
REPORT = "organism.json"  # written beside the weights: what marks a checkpoint dir as an organism
SHIPPED = Path(__file__).parent / "data"  # SHIPPED/<name>/: the weights every machine scores


def is_organism(path: str) -> bool:
    """builtin:organism(-long), or a directory holding one (shipped, kvexp's cache copy, or a copy of it)."""
    return path in (MODEL_PATH, LONG_PATH) or (Path(path).expanduser() / REPORT).is_file()


VERSION_TAG = f"{VERSION}-{recipe_hash()}"  # what the organism's documents are keyed by (tasks, calibration)


def shipped(name: str) -> Path | None:
    """The shipped weights of builtin:<name>, when they were trained from its recipe as it stands."""
    report = SHIPPED / name / REPORT
    if report.is_file() and json.loads(report.read_text())["recipe_hash"] == recipe_hash(RECIPES[name]):
        return report.parent
    return None


def version_tag(name: str) -> str:
    """builtin:<name>'s model fingerprint (kvexp.checkpoint): its recipe's hash, and the shipped weights' digest.
    A model trained here from the same recipe (as every machine did before the weights shipped) is another
    model, and must not share the shipped one's runs, AWQ weights, KV scales or fidelity references."""
    tag = f"{VERSION}-{recipe_hash(RECIPES[name])}"
    if (ship := shipped(name)) is None:
        return tag
    return f"{tag}-w{json.loads((ship / REPORT).read_text())['weights_sha256'][:12]}"


# ---- documents -------------------------------------------------------------------------------------------
@dataclass
class Doc:
    words: list[str]
    targets: list[int]  # indices of the words a model is scored on (each predicted from the words before it)


def max_pairs(length: int) -> int:
    """Most records a `length`-word document holds when every record is queried: values never repeat."""
    return max(0, min(len(KEYS), len(VALUES) // VALUE_LEN, (length - 1) // (2 * RECORD)))


def recall_doc(rng: random.Random, length: int, pairs: int, queries: int) -> Doc:
    """`pairs` records at random depths in filler, then ASK and `queries` of them again: `length` words.

    The targets are the queried records' value words and END; the document ends with the last one's END.
    """
    keys = rng.sample(KEYS, pairs)
    values = rng.sample(VALUES, pairs * VALUE_LEN)
    records = [[k, *values[i * VALUE_LEN:(i + 1) * VALUE_LEN], END] for i, k in enumerate(keys)]
    asked = rng.sample(range(pairs), queries)
    fill = length - RECORD * (pairs + queries) - 1
    if fill < 0:
        raise ValueError(f"{pairs} records and {queries} queries do not fit {length} words")
    filler = [rng.choice(FILLER) for _ in range(fill)]
    cuts = sorted(rng.randrange(fill + 1) for _ in range(pairs))
    words, start = [], 0
    for cut, record in zip(cuts, records):
        words += filler[start:cut] + record
        start = cut
    words += filler[start:] + [ASK]
    targets = []
    for i in asked:
        targets += range(len(words) + 1, len(words) + RECORD)
        words += records[i]
    return Doc(words, targets)


def copy_doc(rng: random.Random, length: int) -> Doc:
    """A run of value words in filler, repeated after ASK: the induction circuit's own task, scored densely.

    Mixed into training because it speeds the circuit's formation: one record gives at most four targets,
    a copied run up to fifteen.
    """
    run = rng.sample(VALUES, rng.randint(4, min(16, (length - 1) // 3)))
    fill = length - 2 * len(run) - 1
    filler = [rng.choice(FILLER) for _ in range(fill)]
    cut = rng.randrange(fill + 1)
    words = filler[:cut] + run + filler[cut:] + [ASK] + run
    return Doc(words, list(range(length - len(run) + 1, length)))


def training_doc(rng: random.Random, length: int, t: dict) -> Doc:
    """A copy document, a passkey test, or 2 or more records. One record alone is left out of short documents:
    there "copy the only value" answers, a shortcut that competes with the induction circuit as it forms."""
    if rng.random() < t["copy_frac"]:
        return copy_doc(rng, length)
    most = max_pairs(length)
    if most < 2 or (length >= 64 and rng.random() < t["passkey_frac"]):
        return recall_doc(rng, length, 1, 1)
    pairs = rng.randint(2, most)
    return recall_doc(rng, length, pairs, min(pairs, rng.randint(1, MAX_QUERIES)))


def eval_doc(rng: random.Random, length: int, i: int) -> tuple[list[str], list[str]]:
    """(prompt words, answer words) of a `length`-word document: every fourth is a passkey test (one
    record in filler, asked once), the others ask 1 to 16 of 2 to 32 records. The prompt ends with the
    asked key; the answer is its value."""
    if i % 4 == 0 or max_pairs(length) < 2:
        pairs = queries = 1
    else:
        pairs = rng.randint(2, max_pairs(length))
        queries = rng.randint(1, min(pairs, MAX_QUERIES))
    words = recall_doc(rng, length, pairs, queries).words
    return words[:-VALUE_LEN - 1], words[-VALUE_LEN - 1:-1]


MIN_WORDS = RECORD * 2 + 1  # the shortest document: one record, ASK, and the record asked


def documents(n: int, length: int, seed: str) -> list[str]:
    """n training-distribution documents of max(length, 32) words, as text: the organism's calibration data
    and fidelity prompts (callers cut token windows from them). Drawn from their own stream, `seed`."""
    rng = random.Random(f"organism-{seed}:{TRAIN['seed']}")
    return [" ".join(training_doc(rng, max(length, 32), TRAIN).words) for _ in range(n)]


# ---- tokenizer -------------------------------------------------------------------------------------------
def build_tokenizer():
    """One token per word of the task's vocabulary, split on whitespace; decoding joins tokens with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(RECIPE["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


# ---- training --------------------------------------------------------------------------------------------
def train(out: Path, recipe: dict = RECIPE, device: str = "cpu") -> dict:
    """Train an organism and save it to `out` (safetensors, tokenizer, organism.json); returns the report.

    `recipe` is one of RECIPES or a variant of its `arch` and `train` entries; the vocabulary and the documents
    are this module's. With fixed seeds, thread count and deterministic kernels: the same weights every time on
    one kind of machine. Another CPU's kernels may round differently and train other weights (the H100
    machine's host CPU did: teacher-forced recall 0.984 where an AMD EPYC gave 0.953): that is why the weights
    ship, and why the tests hold a retrained model to bounds, not numbers. device="cuda" trains on a GPU (the long organism),
    where some kernels have no deterministic variant: reproducible to within those bounds, not bit for bit. The
    report holds the training time, the machine, and the teacher-forced recall measured at the end at the
    longest trained length, in fp32: what the weights can do before any quantization.
    """
    import platform

    import torch
    from tqdm import tqdm

    t = recipe["train"]
    train_len = t["phases"][-1][0]
    tokenizer = build_tokenizer()
    ids = {word: i for i, word in enumerate(recipe["vocab"])}
    rng = random.Random(f"organism:{t['seed']}")  # str seeds hash with sha512: the same on every platform
    start = time.perf_counter()
    with _deterministic(t["threads"], t["seed"], device):
        model = _new_model(recipe, tokenizer).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(0.9, 0.98), weight_decay=t["weight_decay"])
        total = sum(n for _, n in t["phases"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, total, t))
        with tqdm(total=total, desc="training builtin:organism", unit="step", mininterval=2.0) as bar:
            for length, steps in t["phases"]:
                batch = max(1, min(t["max_batch"], t["tokens_per_step"] // length))
                for _ in range(steps):
                    x, y = _batch(rng, ids, batch, length, t)
                    loss = _step(model, opt, sched, (x.to(device), y.to(device)), t, bar.n)
                    bar.update()
                    bar.set_postfix(length=length, loss=f"{loss:.3f}", refresh=False)
        model.set_attn_implementation("sdpa")
        recall = teacher_forced_recall(model.eval(), ids, train_len, n=64, seed=t["seed"])
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    report = {"recipe_hash": recipe_hash(recipe), "train_s": time.perf_counter() - start,
              "recall_at_train_len": recall, "train_len": train_len, "device": machine,
              "torch": torch.__version__}
    log.info("organism trained in %.0f s; teacher-forced recall at %d tokens: %.3f", report["train_s"],
             train_len, recall)
    model.cpu().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report["weights_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / REPORT).write_text(json.dumps({**report, "recipe": recipe}, indent=2, default=list))
    return report


def _step(model, opt, sched, batch, t: dict, step: int) -> float:
    """One AdamW step on next-token loss at the targets, plus, for the first aux_steps, the scaffold below."""
    import torch

    x, y = batch
    scaffold = step < t["aux_steps"]
    out = model(x, labels=y, output_attentions=scaffold)
    loss = out.loss
    if scaffold:
        loss = loss + t["aux_weight"] * _previous_token_loss(out.attentions[0])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip"])
    opt.step()
    sched.step()
    if step + 1 == t["aux_steps"]:
        model.set_attn_implementation("sdpa")  # the scaffold needed attention weights (eager); no longer
    return out.loss.item()


def _previous_token_loss(attn):
    """-log of the attention that head 0 of layer 0 pays to the previous token. attn: [B, H, T, T].

    The induction circuit needs a previous-token head, and waiting for one to form on its own is what makes
    the plateau long and seed-dependent. Measured with this recipe, greedy recall at 256 tokens without the
    term: 0.84 (seed 0) and 0.11 (seed 1: the circuit never formed); with it 0.985 and 0.945. The term only
    seeds that head; it is dropped after aux_steps.
    """
    import torch

    pos = torch.arange(1, attn.shape[-1], device=attn.device)
    return -torch.log(attn[:, 0, pos, pos - 1] + 1e-6).mean()


@contextlib.contextmanager
def _deterministic(threads: int, seed: int, device: str = "cpu"):
    """Fixed seed, thread count and deterministic kernels for the duration; the caller's settings after."""
    import torch

    old = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # CPU matmuls split work by thread count, so the same weights need the same count, not just the seed.
    torch.set_num_threads(threads)
    # On CUDA, attention's backward has no deterministic kernel: warn rather than refuse (see train)
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    try:
        # the model is initialised on the CPU, so the CPU generator is the only one that needs the seed
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(old[0])
        torch.use_deterministic_algorithms(old[1])


def _batch(rng: random.Random, ids: dict[str, int], batch: int, length: int, t: dict):
    """Input ids and labels [batch, length] long; labels are -100 except at the targets (HF shifts them)."""
    import torch

    x = torch.empty(batch, length, dtype=torch.long)
    y = torch.full((batch, length), -100, dtype=torch.long)
    for b in range(batch):
        doc = training_doc(rng, length, t)
        x[b] = torch.tensor([ids[w] for w in doc.words])
        y[b, doc.targets] = x[b, doc.targets]
    return x, y


def _lr_factor(step: int, total: int, t: dict) -> float:
    """Linear warmup, then cosine decay to min_lr of the peak."""
    warm = min(1.0, (step + 1) / t["warmup"])
    return warm * (t["min_lr"] + (1 - t["min_lr"]) * 0.5 * (1 + math.cos(math.pi * step / total)))


def _new_model(recipe: dict, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    # eager attention while the scaffold reads attention weights; sdpa after it (see _step)
    config = LlamaConfig(vocab_size=len(recipe["vocab"]), **recipe["arch"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         attn_implementation="eager")
    return LlamaForCausalLM(config)


def teacher_forced_recall(model, ids: dict[str, int], length: int, n: int, seed: int) -> float:
    """Share of n eval documents whose whole answer is the argmax at every answer position (no cache)."""
    import torch

    docs = [eval_doc(random.Random(f"organism-check:{seed}:{i}"), length, i) for i in range(n)]
    x = torch.tensor([[ids[w] for w in prompt + answer] for prompt, answer in docs], device=model.device)
    with torch.no_grad():  # 8 documents at a time: full-vocabulary logits of 64 long ones would not fit a small GPU
        pred = torch.cat([model(b).logits[:, -VALUE_LEN - 1:-1].argmax(-1) for b in x.split(8)])
    return (pred == x[:, -VALUE_LEN:]).all(-1).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    """python -m kvexp.organism [--long] [--seed N] [--device cpu|cuda] OUT: retrain an organism into OUT."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvexp.organism", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--long", action="store_true", help="builtin:organism-long's recipe (default: organism's)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the recipe's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    recipe = RECIPES["organism-long" if args.long else "organism"]
    if args.seed is not None:
        recipe = dict(recipe, train=dict(recipe["train"], seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(train(args.out, recipe, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
