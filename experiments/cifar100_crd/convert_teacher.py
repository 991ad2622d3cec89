"""Turn a RepDistiller teacher checkpoint into a state dict that ``teacher.ckpt_path`` loads.

RepDistiller saves ``{"epoch", "model": state_dict, "accuracy", "optimizer"}`` (train_teacher.py); its released
teachers (scripts/fetch_pretrained_teachers.sh) are such files. kd-lab's zoo uses RepDistiller's module names,
so the weights load unchanged; this script extracts them, checks that they fit the named architecture, and
writes a plain state dict:

    python experiments/cifar100_crd/convert_teacher.py save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \
        resnet32x4 teachers/resnet32x4_repdistiller.pt
    kd-lab experiment=cifar100_crd/resnet32x4-resnet8x4 teacher.ckpt_path=teachers/resnet32x4_repdistiller.pt
"""

import argparse
import sys
from pathlib import Path

import torch

from kd_lab.models.cifar import ZOO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="RepDistiller's ckpt_epoch_240.pth (or any {'model': ...})")
    parser.add_argument("arch", choices=sorted(ZOO), help="the architecture that wrote it")
    parser.add_argument("output", type=Path, help="where to write the plain state dict")
    parser.add_argument("--num-classes", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        obj = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        print(f"cannot read {args.checkpoint}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        print(f"{args.checkpoint} has no 'model' state dict of tensors", file=sys.stderr)
        return 1
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from nn.DataParallel
    model = ZOO[args.arch](num_classes=args.num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        print(f"does not fit {args.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.output)
    accuracy = obj.get("accuracy") if isinstance(obj, dict) else None
    note = f" (RepDistiller's test accuracy {float(accuracy):.2f})" if accuracy is not None else ""
    print(f"{args.arch} weights -> {args.output}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
