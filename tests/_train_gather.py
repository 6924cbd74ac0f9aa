"""Run under ``torchrun --nproc_per_node 2``: gathered losses on 2 ranks equal the 1-process loss.

Each rank takes its part of one global batch of features made by a small linear "encoder"
(same weights on every rank), computes the loss module under the process group, and then
averages loss and parameter gradients over ranks the way DistributedDataParallel does. Rank
0 compares that with the plain loss function on the whole batch in one process (value and
gradients) and writes the results as JSON to the path given as the first argument. The
``*_uneven`` cases split the 8 rows 3 + 5, as a loader that skipped bad samples leaves them.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from stcorpus.training.losses import ClipLoss, SigLipLoss, clip_loss, siglip_loss


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    global_batch, dim, local = 8, 5, 8 // world
    x_img = torch.randn(global_batch, 6)
    x_gene = torch.randn(global_batch, 7)
    w_img = torch.randn(6, dim)
    w_gene = torch.randn(7, dim)
    scale = torch.tensor(3.0)
    bias = torch.tensor(-2.0)

    def features(rows: slice, wi: torch.Tensor, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.nn.functional.normalize(x_img[rows] @ wi, dim=-1)
        b = torch.nn.functional.normalize(x_gene[rows] @ wg, dim=-1)
        return a, b

    results: dict[str, object] = {"world_size": world}
    cases = {
        "clip_local": (ClipLoss(local_loss=True), clip_loss),
        "clip_global": (ClipLoss(local_loss=False), clip_loss),
        "siglip": (SigLipLoss(), siglip_loss),
        "clip_local_uneven": (ClipLoss(local_loss=True), clip_loss),
        "clip_global_uneven": (ClipLoss(local_loss=False), clip_loss),
        "siglip_uneven": (SigLipLoss(), siglip_loss),
    }
    bounds = [0, 3, 8] if world == 2 else [global_batch * r // world for r in range(world + 1)]
    for name, (module, reference) in cases.items():
        wi, wg = w_img.clone().requires_grad_(), w_gene.clone().requires_grad_()
        rows = slice(bounds[rank], bounds[rank + 1]) if "uneven" in name else slice(rank * local, (rank + 1) * local)
        a, b = features(rows, wi, wg)
        if name.startswith("siglip"):
            out = module(a, b, scale, bias)
        else:
            out = module(a, b, scale)
        out.loss.backward()
        # DistributedDataParallel: gradients (and here the loss, for the comparison) averaged over ranks.
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world
        assert wi.grad is not None and wg.grad is not None
        grads = torch.cat([wi.grad.flatten(), wg.grad.flatten()])
        dist.all_reduce(grads)
        grads /= world

        ri, rg = w_img.clone().requires_grad_(), w_gene.clone().requires_grad_()
        fa, fb = features(slice(None), ri, rg)
        ref = reference(fa, fb, scale, bias) if name.startswith("siglip") else reference(fa, fb, scale)  # type: ignore[operator]
        ref.backward()
        assert ri.grad is not None and rg.grad is not None
        ref_grads = torch.cat([ri.grad.flatten(), rg.grad.flatten()])
        results[name] = {
            "logits_shape": list(out.logits_shape),
            "loss": float(loss),
            "reference": float(ref.detach()),
            "max_grad_diff": float((grads - ref_grads).abs().max()),
            "grad_scale": float(ref_grads.abs().max()),
        }
    if rank == 0:
        with open(path, "w") as handle:  # noqa: PTH123 - a test helper script
            json.dump(results, handle)
    dist.barrier()  # no rank tears down its connections while another still finishes a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter finalization, which gloo's threads can race (see training.pretrain).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
