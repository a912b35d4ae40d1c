"""RoPE against ALiBi: speed and memory against context, and length extrapolation after training.

1. Speed and memory: the built-in ``tiny-llama`` (rotary positions) and ``tiny-bloom``
   (ALiBi), about the same size, at each context length: prefill tokens/s, one decode
   step with a KV cache, and the peak tensor memory of each.
2. Extrapolation, the result ALiBi is known for (Press et al., "Train Short, Test Long",
   ICLR 2022): a Llama-style and a BLOOM-style model of the same size, built here with
   the same seed, trained on the same bytes (the Python standard library's own source,
   byte-level tokens) at a short training length with the same optimizer and steps, then
   evaluated on held-out standard-library files at 1x, 2x, 4x and 8x that length.
   Perplexity is per byte-token, over non-overlapping windows of each length, the same
   number of tokens at every length.

The Hugging Face ``Trainer`` saves ``checkpoint-*`` folders (tokenizer included) and a
``trainer_state.json`` under ``<out>/checkpoints/<arch>/`` (``--checkpoints-dir``), with
the held-out text beside them as ``heldout.txt``: the input of ``bench.checkpoint_eval``.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from loadtest.measure.plots import line_plot, pyplot
from loadtest.measure.report_folder import Report

from .memory import peak_bytes

ARCHITECTURES = ("llama", "bloom")
POSITIONS = {"llama": "RoPE", "bloom": "ALiBi"}


# ---- data ----------------------------------------------------------------------------


def byte_tokenizer():
    """A 257-token byte-level tokenizer (256 bytes + end of text), saved with every checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tokenizer


def stdlib_files() -> list[Path]:
    import sysconfig

    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def corpus(train_bytes: int, eval_bytes: int) -> tuple[str, str]:
    """Every tenth standard-library module (sorted by name) is held out for evaluation."""
    train, held_out = [], []
    for i, path in enumerate(stdlib_files()):
        (held_out if i % 10 == 0 else train).append(path.read_text(errors="replace"))
    return "".join(train)[:train_bytes], "".join(held_out)[:eval_bytes]


# ---- models --------------------------------------------------------------------------


def model_config(architecture: str, hidden: int, layers: int, heads: int, vocab: int, max_positions: int):
    from transformers import BloomConfig, LlamaConfig

    common = dict(
        vocab_size=vocab,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        tie_word_embeddings=True,
    )
    if architecture == "bloom":
        return BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, **common)
    # 8/3 x hidden for the gated MLP's three matrices matches BLOOM's two 4 x hidden ones in size.
    intermediate = 8 * math.ceil(8 * hidden / 3 / 8)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        **common,
    )


def build(architecture: str, hidden: int, layers: int, heads: int, vocab: int, max_positions: int, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(architecture, hidden, layers, heads, vocab, max_positions))
    # BLOOM's config has no context length; ALiBi needs none, but servers and evaluators ask.
    model.config.max_position_embeddings = max_positions
    return model


class Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, length: int) -> None:
        count = len(ids) // length
        self.windows = ids[: count * length].view(count, length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        window = self.windows[i]
        return {"input_ids": window, "labels": window}


def train(
    model,
    tokenizer,
    train_ids: torch.Tensor,
    out: Path,
    *,
    length: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    saves: int,
    max_seconds: float | None,
):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class TimeLimit(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if max_seconds and time.perf_counter() - started > max_seconds:
                control.should_training_stop = True
                control.should_save = True

    arguments = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, steps // 50),
        save_steps=max(1, steps // saves),
        save_strategy="steps",
        seed=seed,
        data_seed=seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=True,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Windows(train_ids, length),
        processing_class=tokenizer,
        callbacks=[TimeLimit()],
    )
    started = time.perf_counter()
    result = trainer.train()
    trainer.save_state()  # the run's own trainer_state.json beside the checkpoints
    return result, time.perf_counter() - started


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int, tokens: int, batch: int = 8) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``length`` covering ``tokens`` tokens."""
    model.eval()
    count = max(1, tokens // length)
    windows = ids[: count * length].view(-1, length)
    total, n = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        n += chunk[:, 1:].numel()
    return math.exp(total / n)


# ---- speed ---------------------------------------------------------------------------


@torch.inference_mode()
def speed_row(name: str, model, context: int, repeats: int) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    forward = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    forward()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward()
        times.append(time.perf_counter() - started)
    prefill = sorted(times)[len(times) // 2]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    step = lambda: model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1)  # noqa: E731
    step_times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - started)
        cache.crop(-1)  # back to context - 1 tokens, so every timed step sees the same context
    step_peak = peak_bytes(step)
    return {
        "model": name,
        "positions": POSITIONS.get(model.config.model_type, model.config.model_type),
        "params": sum(p.numel() for p in model.parameters()),
        "attention": model.config._attn_implementation,
        "context": context,
        "prefill_tok_s": context / prefill,
        "decode_step_ms": 1000 * sorted(step_times)[len(step_times) // 2],
        "prefill_peak_mib": peak_bytes(forward) / 2**20,
        "decode_peak_mib": step_peak / 2**20,
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-contexts", default="128,256,512,1024")
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--train-length", type=int, default=64)
    parser.add_argument("--factors", default="1,2,4,8", help="evaluation lengths as multiples of the training length")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-minutes", type=float, default=8.0, help="per model; training stops early past it")
    parser.add_argument("--saves", type=int, default=6, help="checkpoints saved per training run")
    parser.add_argument("--train-bytes", type=int, default=3_000_000)
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--checkpoints-dir",
        help="where the training runs go (default <out>/checkpoints); "
        "the held-out text is written there too, as heldout.txt",
    )
    parser.add_argument("--out", help="report folder (default reports/rope-vs-alibi-<time>)")
    args = parser.parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from engines.models import resolve_model

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    report = Report("rope-vs-alibi", args.out, "bench.rope_vs_alibi", argv)
    report.text(__doc__.split("\n", 2)[2])

    if not args.skip_speed:
        speed = []
        for name in ("tiny-llama", "tiny-bloom"):
            model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).eval()
            for context in tqdm(_ints(args.speed_contexts), desc=f"{name}: speed", unit="context"):
                row = speed_row(name, model, context, args.speed_repeats)
                speed.append(row)
                tqdm.write(
                    f"  {name} context {context:5d}: prefill {row['prefill_tok_s']:9.0f} tok/s, decode step "
                    f"{row['decode_step_ms']:6.2f} ms, peaks {row['prefill_peak_mib']:.1f} / "
                    f"{row['decode_peak_mib']:.1f} MiB"
                )
        report.table(
            "speed",
            speed,
            headers={
                "prefill_tok_s": "prefill tok/s",
                "decode_step_ms": "decode step (ms)",
                "prefill_peak_mib": "prefill peak (MiB)",
                "decode_peak_mib": "decode step peak (MiB)",
            },
            title="Speed and memory against context (built-in tiny models, float32)",
        )

    tokenizer = byte_tokenizer()
    train_text, eval_text = corpus(args.train_bytes, args.eval_tokens * 2)
    train_ids = torch.tensor(tokenizer(train_text).input_ids)
    eval_ids = torch.tensor(tokenizer(eval_text).input_ids)
    checkpoints = Path(args.checkpoints_dir) if args.checkpoints_dir else report.dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "heldout.txt").write_text(eval_text)
    factors = _ints(args.factors)
    max_positions = max(factors) * args.train_length * 2
    eval_tokens = min(
        args.eval_tokens, len(eval_ids) // (max(factors) * args.train_length) * max(factors) * args.train_length
    )
    print(
        f"# corpus: {len(train_ids)} training byte-tokens, {eval_tokens} held-out tokens per evaluation length",
        flush=True,
    )
    results, training = [], []
    for arch in ARCHITECTURES:
        model = build(arch, args.hidden, args.layers, args.heads, len(tokenizer), max_positions, args.seed)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"# training {arch} ({POSITIONS[arch]}), {params} parameters, length {args.train_length}, "
            f"{args.steps} steps of {args.batch}",
            flush=True,
        )
        folder = checkpoints / arch
        result, seconds = train(
            model,
            tokenizer,
            train_ids,
            folder,
            length=args.train_length,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            saves=args.saves,
            max_seconds=args.max_minutes * 60,
        )
        training.append(
            {
                "model": arch,
                "positions": POSITIONS[arch],
                "params": params,
                "steps": result.global_step,
                "seconds": seconds,
                "final_train_loss": result.training_loss,
                "checkpoints": str(folder),
            }
        )
        for factor in tqdm(factors, desc=f"{arch}: perplexity", unit="length"):
            length = factor * args.train_length
            ppl = perplexity(model, eval_ids, length, eval_tokens)
            results.append(
                {"model": arch, "positions": POSITIONS[arch], "factor": factor, "length": length, "perplexity": ppl}
            )
            tqdm.write(f"  {arch} at {factor}x ({length} tokens): perplexity {ppl:.3f}")
    report.table("training", training, title="Training (same data, seed, steps and optimizer)")
    for r in results:
        base = next(x["perplexity"] for x in results if x["model"] == r["model"] and x["factor"] == factors[0])
        r["vs_1x"] = r["perplexity"] / base
    report.table(
        "extrapolation",
        results,
        headers={"factor": "x training length", "vs_1x": "ppl / ppl at 1x"},
        title="Perplexity on held-out text against evaluation length",
        note=verdict(results, factors),
    )
    plot(report, results, speed if not args.skip_speed else [])
    print(f"\nreport: {report.markdown_path}")


def verdict(results: list[dict], factors: list[int]) -> str:
    top = max(factors)
    at = {(r["model"], r["factor"]): r["vs_1x"] for r in results}
    rope, alibi = at.get(("llama", top)), at.get(("bloom", top))
    if rope is None or alibi is None:
        return ""
    if alibi <= 1.05 and rope > alibi * 1.1:
        return (
            f"At {top}x the training length RoPE's perplexity is {rope:.2f}x its own 1x value and ALiBi's "
            f"{alibi:.2f}x: the paper's effect (ALiBi flat, rotary degrading) reproduces at this scale."
        )
    return (
        f"At {top}x the training length RoPE's perplexity is {rope:.2f}x its own 1x value and ALiBi's "
        f"{alibi:.2f}x: this tiny run does not cleanly reproduce the paper's effect "
        "(ALiBi flat past the training length while rotary degrades)."
    )


def plot(report: Report, results: list[dict], speed: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if speed else 1, figsize=(16 if speed else 6, 4.5), squeeze=False)
    line_plot(
        axes[0][0],
        results,
        "length",
        "perplexity",
        ("positions",),
        logx=True,
        xlabel="evaluation length (tokens)",
        ylabel="perplexity (per byte)",
        title="length extrapolation",
    )
    if results:
        train_length = min(r["length"] for r in results)
        axes[0][0].axvline(train_length, color="grey", ls="--", lw=0.8)
    if speed:
        line_plot(
            axes[0][1],
            speed,
            "context",
            "prefill_tok_s",
            ("model", "positions"),
            logx=True,
            logy=True,
            xlabel="context",
            ylabel="prefill tokens/s",
            title="speed",
        )
        line_plot(
            axes[0][2],
            speed,
            "context",
            "prefill_peak_mib",
            ("model", "positions"),
            logx=True,
            logy=True,
            xlabel="context",
            ylabel="prefill peak memory (MiB)",
            title="memory",
        )
    report.figure(
        "rope_vs_alibi", fig, "Perplexity against evaluation length (dashed: training length); speed and memory"
    )


if __name__ == "__main__":
    main()
