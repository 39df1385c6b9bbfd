"""Export the model weights of any checkpoint as a plain safetensors file.

A training checkpoint (last.pth.tar, model_best.pth.tar, ...) also holds optimizer state, the
arguments and other Python objects; a downloaded .pth may even hide code that runs when it is
unpickled. A .safetensors file holds tensors only and cannot run anything, so it is the format
to share and to load weights from. The input is read with models.weights.safe_load, which refuses
files that need arbitrary code to load.

    python tools/export_weights.py output/train/run/model_best.pth.tar van_b0.safetensors [--ema]
"""
import argparse
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.weights import UnsafeFileError, extract_state_dict, safe_load  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="any checkpoint or weight file models.weights can read")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (state_dict_ema) instead")
    return parser


def model_weights(checkpoint, source: str, ema: bool = False) -> dict:
    """The model's tensors under reference names, each a contiguous CPU copy (safetensors refuses
    tensors that share memory or are views)."""
    if ema:
        if not isinstance(checkpoint, dict) or "state_dict_ema" not in checkpoint:
            raise ValueError(f"{source} holds no EMA weights ('state_dict_ema'); train with --model-ema or drop --ema")
        checkpoint = checkpoint["state_dict_ema"]
    state = extract_state_dict(checkpoint, source=source)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def export_weights(checkpoint_path: str, output_path: str, ema: bool = False) -> int:
    """Write the weights of `checkpoint_path` to `output_path`; return the number of tensors."""
    checkpoint = safe_load(checkpoint_path)
    state = model_weights(checkpoint, checkpoint_path, ema=ema)
    metadata = {"format": "pt", "source": os.path.basename(checkpoint_path)}
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("arch"), str):
        metadata["arch"] = checkpoint["arch"]
    output = Path(output_path)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, output)  # a reader never sees a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return len(state)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        count = export_weights(args.checkpoint, args.output, ema=args.ema)
    except (UnsafeFileError, FileNotFoundError, ValueError, OSError) as e:
        print(f"export_weights: {e}", file=sys.stderr)
        return 1
    print(f"wrote {count} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
