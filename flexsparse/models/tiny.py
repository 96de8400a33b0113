"""Tiny random LLaMA-family models and tokenizers, built locally (never downloaded).

Tests and ``flexsparse ensemble --demo`` use them: a byte-level BPE tokenizer trained in
memory with the ``tokenizers`` library on a few sentences, wrapped in
``PreTrainedTokenizerFast``, and a randomly initialised model from a small config, saved
with ``save_pretrained`` so that it loads back like any local checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch

from .._checks import check_choice, check_int

#: Special tokens of the tiny tokenizer (ids 0..3).
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
#: A minimal chat template (user turn, then the assistant's turn to answer).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_BASE_TEXT = [
    "Answer the question in a few words.",
    "The quick brown fox jumps over the lazy dog.",
    "Which city is the capital of France? Paris is the capital of France.",
    "How many legs does a spider have? A spider has eight legs.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Question: what is the largest planet? Answer: Jupiter.",
    "Rephrased: name the biggest planet of the solar system.",
]


def demo_questions() -> list[dict]:
    """The questions shipped with the package (``flexsparse/data/questions.jsonl``)."""
    text = resources.files("flexsparse").joinpath("data/questions.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _corpus() -> list[str]:
    lines = list(_BASE_TEXT)
    try:
        for q in demo_questions():
            lines += q.get("paraphrases", []) + q.get("answers", [])
    except (FileNotFoundError, ModuleNotFoundError):  # pragma: no cover - broken install
        pass
    return lines


def build_tokenizer(
    texts: Iterable[str] | None = None, *, vocab_size: int = 400, chat_template: bool = False
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory on ``texts``
    (default: a few sentences and the shipped questions). Adds ``<s>`` (BOS) to encoded
    text like LLaMA tokenizers; ``chat_template=True`` sets ``CHAT_TEMPLATE``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = check_int("vocab_size", vocab_size, minimum=64)
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else _corpus(), trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], padding_side="left",
    )
    if chat_template:
        out.chat_template = CHAT_TEMPLATE
    return out


def build_config(
    arch: str = "llama",
    *,
    vocab_size: int = 400,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 4096,
    **overrides,
):
    """A small transformers config of ``arch`` (``ARCHITECTURES``), GQA by default."""
    check_choice("arch", arch, ARCHITECTURES)
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        # Larger weights than the default 0.02 keep the logits of a random model apart, so
        # greedy decoding is not decided by rounding noise.
        initializer_range=0.1,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "qwen3":
        kwargs["head_dim"] = hidden // heads
    kwargs.update(overrides)
    return cls(**kwargs)


def build_model(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa"):
    """A randomly initialised causal LM for ``config`` (default ``build_config()``)."""
    from transformers import AutoModelForCausalLM

    config = build_config() if config is None else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        ) if _accepts_dtype() else AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, torch_dtype=dtype
        )
    return model.eval()


def _accepts_dtype() -> bool:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return major >= 5


def save_tiny(
    path: str | os.PathLike, arch: str = "llama", *, chat_template: bool = False, seed: int = 0,
    **config_kwargs,
) -> Path:
    """Build a tiny tokenizer + random model of ``arch`` and ``save_pretrained`` both to
    ``path``; returns the path (load with ``AutoModelForCausalLM.from_pretrained``)."""
    path = Path(path)
    tokenizer = build_tokenizer(chat_template=chat_template)
    config = build_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    model = build_model(config, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def default_cache_dir() -> Path:
    """Where ``tiny_model_dir`` builds models: ``$FLEXSPARSE_CACHE`` or
    ``~/.cache/flexsparse``."""
    root = os.environ.get("FLEXSPARSE_CACHE") or Path.home() / ".cache" / "flexsparse"
    return Path(root)


def tiny_model_dir(cache_dir: str | os.PathLike | None = None, arch: str = "llama") -> Path:
    """Directory of the tiny demo model (built on first use, then reused)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-{arch}-chat"
    if not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
        save_tiny(path, arch, chat_template=True, layers=2, hidden=64, heads=4, kv_heads=2)
    return path


def load(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
         attn_implementation: str = "sdpa", device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a local directory (no network access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in model directory {str(path)!r}")
    kw = {"dtype": dtype} if _accepts_dtype() else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, local_files_only=True, **kw
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer
