"""A vision preference task that cannot be solved without looking: name the square's colour.

Writes a tiny random Qwen2-VL (the one the tests build) and preference pairs whose chosen
answer names the colour of the row's picture and whose rejected answer names another
colour: the same words in both, so only the image tells them apart. Also the held-out
pairs with each image swapped for the next pair's (``eval_swapped.jsonl``), where a model
that reads the pictures must do worse than chance. The README's vision-language example
trains on it.

    python examples/colour_squares.py runs/colour-squares [--train 96] [--eval 32]
"""

from __future__ import annotations

# isort: off
import mlx_pref  # noqa: F401  (loads the fast BLAS before anything imports mlx.core)

# isort: on
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _tiny_vlm import png, write_tiny_qwen2_vl  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 40)}


def rows(folder: Path, start: int, n: int) -> list[dict]:
    names, out = list(COLOURS), []
    for i in range(start, start + n):
        colour, other = names[i % 3], names[(i + 1 + i // 3 % 2) % 3]
        size = (56 + 28 * (i % 2), 56 + 28 * (i // 2 % 2))
        (folder / "images" / f"{i}.png").write_bytes(png(COLOURS[colour], size, seed=i))
        question = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
        out.append(
            {
                "images": [f"images/{i}.png"],
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": f"The square is {colour}."}],
                "rejected": [{"role": "assistant", "content": f"The square is {other}."}],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--eval", type=int, default=32)
    args = parser.parse_args()
    model = write_tiny_qwen2_vl(args.output / "model")
    data = args.output / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    train, held_out = rows(data, 0, args.train), rows(data, args.train, args.eval)
    swapped = [{**r, "images": held_out[(i + 1) % len(held_out)]["images"]}
               for i, r in enumerate(held_out)]  # fmt: skip
    for name, part in (("train", train), ("eval", held_out), ("eval_swapped", swapped)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"wrote {model} and {args.train} + {args.eval} pairs in {data}")


if __name__ == "__main__":
    main()
