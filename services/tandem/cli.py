"""The `tandem` command line."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

BUNDLED_MODEL = "tiny"


def bundled_model_dir() -> Path:
    """The tiny Llama-architecture model shipped with the package, trained on Python source."""
    return Path(str(files("tandem.assets") / BUNDLED_MODEL))


def _demo(args: argparse.Namespace) -> int:
    import torch

    from tandem.core.pipeline import LocalPipeline
    from tandem.core.tokenizer import Tokenizer

    model_dir = Path(args.model) if args.model else bundled_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    pipe = LocalPipeline(model_dir, num_stages=args.stages, device=args.device)
    prompt_ids = tokenizer.encode(args.prompt)
    generator = torch.Generator().manual_seed(args.seed)

    def sample(logits: torch.Tensor, step: int) -> torch.Tensor:
        if args.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / args.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    detok = tokenizer.detokenizer(prompt_ids)
    ranges = ", ".join(f"[{r.start}, {r.end})" for r in pipe.layer_ranges)
    print(f"# {model_dir.name}: {pipe.config.num_hidden_layers} layers in {len(pipe.stages)} stages {ranges}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def stream(tokens: list[int | None]) -> None:
        if tokens[0] is not None and tokens[0] not in pipe.config.eos_token_ids:
            sys.stdout.write(detok.add(tokens[0]))
            sys.stdout.flush()

    pipe.generate([prompt_ids], args.max_tokens, sample=sample, on_tokens=stream)
    sys.stdout.write(detok.flush() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate in process with the bundled model, streaming text")
    demo.add_argument("--model", help="Hugging Face model directory (default: the bundled tiny model)")
    demo.add_argument("--prompt", default="def parse_args(", help="text to continue")
    demo.add_argument("--max-tokens", type=int, default=96, help="tokens to generate")
    demo.add_argument("--stages", type=int, default=2, help="pipeline stages to split the model into")
    demo.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
