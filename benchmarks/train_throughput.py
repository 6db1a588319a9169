"""Training throughput: our training step against one written the way the paper's code trains.

Baseline (Su et al. / Rice et al. style): a DataLoader over a CPU TensorDataset, fp32, NCHW,
normalisation applied to every batch before the model, PGD written with ``loss.backward()`` on a
``delta`` leaf (parameter gradients computed and discarded at every attack step).
Ours: ``ncrobust.training.train.train_segment`` — the dataset is one resident tensor and batches are index
slices, normalisation is the model's first layer, the attack takes gradients w.r.t. the input only;
on a GPU also channels_last, bf16 autocast and the step replayed from a CUDA graph (``--eager``:
without the graph, to measure what it gives).

    .venv/bin/python benchmarks/train_throughput.py            # PreActResNet18, CIFAR-shaped data
    .venv/bin/python benchmarks/train_throughput.py --quick    # a narrow net, for a smoke test

Prints images/s of one `st` and one `pgd-linf` epoch for both (median over rounds that run the
two back to back in alternating order) and the ratio ours / baseline, also as the median of the
ratios within a round. An epoch of ours is a whole ``train_segment`` call: loading the
checkpoint state and snapshotting it at the end are counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ncrobust.attacks import ThreatModel
from ncrobust.jobs.pipeline import place
from ncrobust.losses import get_loss
from ncrobust.models import create_model
from ncrobust.training.train import Recipe, initial_checkpoint, train_segment

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
EPS, STEP, STEPS = 8 / 255, 2 / 255, 10


def paper_style_epoch(model, x, y, adversary: str, batch_size: int, device) -> None:
    """One epoch as the paper's code does it (see module docstring)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        if adversary == "pgd-linf":
            delta = torch.empty_like(xb).uniform_(-EPS, EPS)
            delta = (torch.clamp(xb + delta, 0, 1) - xb).requires_grad_(True)
            for _ in range(STEPS):
                loss = F.cross_entropy(model((xb + delta - mean) / std), yb)
                loss.backward()
                d = delta + STEP * delta.grad.detach().sign()
                d = torch.clamp(torch.clamp(d, -EPS, EPS) + xb, 0, 1) - xb
                delta.data = d.data
                delta.grad.zero_()
            xb = (xb + delta).detach()
        loss = F.cross_entropy(model((xb - mean) / std), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def build(name: str, width: int | None, normalise_inside: bool):
    kwargs = {"width": width} if width else {}
    mean, std = (MEAN, STD) if normalise_inside else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_chans=3, image_size=32, mean=mean, std=std, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="narrow network and few images (smoke test)")
    parser.add_argument("--images", type=int, default=None, help="images per epoch (default: CPU st 512, pgd-linf 128; GPU 10240)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (ours and baseline back to back, alternating order)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="ours; default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--eager", action="store_true", help="ours without the CUDA graph (GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    width = 16 if args.quick else None
    batch = 128
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    print(f"device {device}, {torch.get_num_threads()} threads, 3x32x32 images, batch {batch}, "
          f"PreActResNet18{' (width 16)' if width else ''}, ours in {precision}"
          f"{' eager' if args.eager or device.type == 'cpu' else ' with CUDA graphs'}; {args.repeats} rounds")
    print(f"{'adversary':<10} {'images':>6} {'baseline img/s':>15} {'ours img/s':>12} {'ratio':>7} {'ratio (paired)':>15}")
    for adversary in ("st", "pgd-linf"):
        default_n = (128 if args.quick else (512 if adversary == "st" else 128)) if device.type == "cpu" else 10240
        n = args.images or default_n
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        runs = {}
        for who in ("baseline", "ours"):
            model = build("preact_resnet18", width, normalise_inside=who == "ours")
            if who == "baseline":
                model = model.to(device)
                runs[who] = lambda model=model: paper_style_epoch(model, x, y, adversary, batch, device)
            else:
                model, xd, yd = place(model, device, x, y)
                recipe = Recipe(
                    adversary=adversary, loss=get_loss("ce"), threat=ThreatModel("linf", EPS, STEP, STEPS), epochs=2,
                    batch_size=batch, log_test_accuracy=False,
                    autocast_dtype=torch.bfloat16 if precision == "bf16" else None, cuda_graph=not args.eager,
                )
                ckpt = initial_checkpoint(model, recipe)
                runs[who] = lambda model=model, xd=xd, yd=yd, recipe=recipe, ckpt=ckpt: train_segment(
                    model, ckpt, xd, yd, recipe=recipe, end_epoch=1, seed=0
                )
            runs[who]()  # warm-up (allocator, cudnn autotune, lazy imports)
        times = {"baseline": [], "ours": []}
        for r in range(args.repeats):
            for who in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                runs[who]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[who].append(time.perf_counter() - start)
        base, ours = n / statistics.median(times["baseline"]), n / statistics.median(times["ours"])
        paired = statistics.median(b / o for b, o in zip(times["baseline"], times["ours"]))
        print(f"{adversary:<10} {n:>6} {base:>15.1f} {ours:>12.1f} {ours / base:>7.2f} {paired:>15.2f}")


if __name__ == "__main__":
    main()
